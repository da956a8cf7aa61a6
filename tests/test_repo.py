"The repository's own guarantees: the package is exported from the notebooks, and the notebooks are clean."
import json, os, shutil, subprocess, sys
from pathlib import Path

import pytest

from conftest import ROOT

BIN = Path(sys.executable).parent


def _copy_repo(dst: Path) -> Path:
    files = subprocess.run(['git', 'ls-files', '--cached', '--others', '--exclude-standard'], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if not (ROOT / f).is_file(): continue
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dst / f)
    git = lambda *a: subprocess.run(['git', *a], cwd=dst, check=True, capture_output=True)
    git('init', '-q'); git('add', '-A')
    git('-c', 'user.name=t', '-c', 'user.email=t@t', 'commit', '-qm', 'copy')
    return dst


def _check(repo: Path):
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run(['bash', '.ci/check_sync'], cwd=repo, capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope='module')
def repo(tmp_path_factory):
    return _copy_repo(tmp_path_factory.mktemp('repo'))


def _edit_nb(path: Path, fn):
    nb = json.loads(path.read_text()); fn(nb); path.write_text(json.dumps(nb, indent=1) + '\n')


def test_clean_copy_passes(repo):
    r = _check(repo)
    assert r.returncode == 0, r.stdout + r.stderr
    assert 'in sync' in r.stdout


def test_edited_notebook_without_export_fails(repo):
    nb = repo / 'nbs' / '00_core.ipynb'
    old = nb.read_text()
    def edit(nb):
        cell = next(c for c in nb['cells'] if c['cell_type'] == 'code' and 'def seed_everything' in ''.join(c['source']))
        cell['source'] = [l.replace('random.seed(seed)', 'random.seed(seed + 1)') for l in cell['source']]
    try:
        _edit_nb(nb, edit)
        subprocess.run(['git', 'commit', '-qam', 'edit', '--no-verify'], cwd=repo, check=True, capture_output=True,
                       env=dict(os.environ, GIT_AUTHOR_NAME='t', GIT_AUTHOR_EMAIL='t@t', GIT_COMMITTER_NAME='t',
                                GIT_COMMITTER_EMAIL='t@t'))
        r = _check(repo)
        assert r.returncode == 1 and 'out of sync with the notebooks' in r.stdout, r.stdout + r.stderr
        assert 'seqdis_nb/core.py' in r.stdout
    finally:
        subprocess.run(['git', 'reset', '-q', '--hard', 'HEAD~1'], cwd=repo, check=True)
        assert nb.read_text() == old


def test_notebook_with_outputs_fails(repo):
    nb = repo / 'nbs' / 'index.ipynb'
    def dirty(nb):
        cell = next(c for c in nb['cells'] if c['cell_type'] == 'code')
        cell['execution_count'] = 7
        cell['metadata'] = {'scrolled': True}
    _edit_nb(nb, dirty)
    r = _check(repo)
    assert r.returncode == 1 and 'notebooks are not clean' in r.stdout, r.stdout + r.stderr
