import re

import pytest
import torch

import seqdis_nb


def test_info_prints_versions_and_device(cli):
    r = cli('info')
    assert r.returncode == 0, r.stderr
    assert re.search(r'^torch\s+2\.13\.0', r.stdout, re.M), r.stdout
    assert re.search(rf'^seqdis_nb\s+{re.escape(seqdis_nb.__version__)}', r.stdout, re.M), r.stdout
    dev = 'cuda' if torch.cuda.is_available() else 'cpu'
    assert re.search(rf'^device\s+{dev}', r.stdout, re.M), r.stdout


def test_help_and_bad_command(cli):
    r = cli('--help')
    assert r.returncode == 0 and 'info' in r.stdout
    r = cli('frobnicate')
    assert r.returncode == 2 and "invalid choice: 'frobnicate'" in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason='asking for CUDA is only an error without a CUDA device')
def test_bad_device_env_is_a_clear_error(cli):
    r = cli('info', env={'SEQDIS_DEVICE': 'cuda'})
    assert r.returncode != 0 and 'no CUDA device' in r.stderr


@pytest.mark.parametrize('argv', [
    ['eval', '--checkpoint', 'x.pt', '--repeats', '0'],
    ['eval', '--checkpoint', 'x.pt', '--limit', '-3'],
    ['judge', 'train', '--dataset', 'shapes', '--out', 'j.pt', '--epochs', '-1'],
    ['judge', 'train', '--dataset', 'shapes', '--out', 'j.pt', '--size', 'nan'],
    ['train', '--dataset', 'shapes', '--preset', 'shapes-quick', '--epochs', '0', '--out', 'x'],
])
def test_counts_must_be_positive(argv, capsys):
    from seqdis_nb.cli import main
    with pytest.raises(SystemExit) as e: main(argv)
    assert e.value.code == 2
    assert 'must be a positive int' in capsys.readouterr().err
