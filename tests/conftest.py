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
