import os, subprocess, sys
from pathlib import Path

import pytest
import torch

# As .ci/run does: no CUDA device -> Triton kernels run in the interpreter. It must be set before anything imports
# triton (tests/test_kernels.py needs it), so it is set here, before any test module is collected.
if not torch.cuda.is_available(): os.environ.setdefault('TRITON_INTERPRET', '1')

ROOT = Path(__file__).resolve().parents[1]

def run_cli(*args, timeout=600, env=None, **kw):
    "Run `python -m seqdis_nb.cli ARGS` in a subprocess; return the CompletedProcess."
    e = dict(os.environ, **(env or {}))
    e['PYTHONPATH'] = str(ROOT) + os.pathsep + e.get('PYTHONPATH', '')
    return subprocess.run([sys.executable, '-m', 'seqdis_nb.cli', *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=e, **kw)

@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope='module')
def one_thread():
    """One torch thread for a test module (tiny tensors: a second thread mostly spins on a shared 2-core machine);
    restored afterwards. Modules opt in with `pytestmark = pytest.mark.usefixtures('one_thread')`."""
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='session')
def shapes():
    "The procedural Shapes set at 16x16 (deterministic from its seed), built once and shared by the test modules."
    from seqdis_nb.data import make_shapes
    return make_shapes(size=16)
