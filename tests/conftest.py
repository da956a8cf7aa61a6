import os, subprocess, sys
from pathlib import Path

import pytest

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
