import json
from pathlib import Path

import numpy as np
import pytest
import torch

from seqdis_nb.data import make_shapes
from seqdis_nb.judge import (Judge, JudgeConfig, JudgeError, check_judge, judge_accuracy, load_judge, resize_video,
                             save_judge, split_at_size, train_judge)

FIX = Path(__file__).parent / 'fixtures'


pytestmark = pytest.mark.usefixtures('one_thread')   # tests/conftest.py




@pytest.fixture(scope='module')
def tiny_judge(shapes):
    torch.manual_seed(0)
    return Judge.for_dataset(shapes.info, 'tiny', meta={'note': 'untrained'}).eval()


def test_official_layout_matches_the_authors_state_dict():
    spec = json.loads((FIX / 'sprites_judge_state_dict.json').read_text())['state_dict']
    j = Judge('official')
    assert {k: list(v.shape) for k, v in j.state_dict().items()} == spec
    assert list(j.state_dict()) == list(spec)                       # same order too
    assert j.config.input_scale == pytest.approx(255 / 256)
    out = j.eval()(torch.rand(2, 8, 3, 64, 64))
    assert [o.shape for o in out] == [(2, 9), (2, 6), (2, 6), (2, 6), (2, 6)]


def test_input_scale_is_applied(shapes):
    torch.manual_seed(0)
    a = Judge.for_dataset(shapes.info, 'tiny').eval()
    b = Judge.for_dataset(shapes.info, JudgeConfig.preset('tiny', input_scale=0.5)).eval()
    b.load_state_dict(a.state_dict())
    x = torch.rand(2, 4, 3, 16, 16)
    for la, lb in zip(a(x * 0.5), b(x)): torch.testing.assert_close(la, lb)


@pytest.mark.parametrize('size', [8, 16, 32])
def test_other_resolutions_have_fewer_blocks(size):
    j = Judge(JudgeConfig.preset('tiny', image_size=size))
    blocks = [n for n, _ in j.encoder.named_children()]
    assert blocks == [f'c{i}' for i in range(1, int(np.log2(size)) - 1 + 1)]
    assert j(torch.rand(1, 3, 3, size, size))[0].shape == (1, 9)


def test_bad_inputs_are_clear_errors(tiny_judge):
    with pytest.raises(ValueError, match='image_size 16'): tiny_judge(torch.rand(2, 8, 3, 32, 32))
    with pytest.raises(TypeError, match='float'): tiny_judge(torch.zeros(2, 8, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match='power of two'): JudgeConfig(image_size=24)
    with pytest.raises(ValueError, match='input_scale'): JudgeConfig(input_scale=0)
    with pytest.raises(ValueError, match='same length|equal length'): Judge('tiny', ['a', 'b'], [3])
    with pytest.raises(ValueError, match='only downsamples'): resize_video(torch.rand(1, 2, 3, 8, 8), 16)


def test_resize_is_an_area_mean():
    x = torch.rand(2, 3, 3, 8, 8)
    y = resize_video(x, 4)
    torch.testing.assert_close(y, x.unflatten(-1, (4, 2)).unflatten(-3, (4, 2)).mean((-1, -3)))


def test_save_load_round_trip(tmp_path, tiny_judge, shapes):
    sha = save_judge(tmp_path / 'j.pt', tiny_judge)
    j2 = load_judge(tmp_path / 'j.pt')
    assert j2.meta['sha256'] == sha and j2.meta['note'] == 'untrained' and j2.meta['dataset'] == 'shapes'
    assert j2.factors == tiny_judge.factors and j2.classes == tiny_judge.classes and not j2.training
    x = shapes.test.batch(range(5))[0]
    for a, b in zip(tiny_judge(x), j2(x)): torch.testing.assert_close(a, b)
    assert not list(tmp_path.glob('*.tmp*'))                        # atomic write left no temporary file


def test_checksum_and_corruption_are_refused(tmp_path, tiny_judge):
    p = tmp_path / 'j.pt'
    save_judge(p, tiny_judge)
    d = torch.load(p, weights_only=True)
    d['state_dict']['bilstm.bias_hh_l0'][0] += 1e-3                 # one edited weight
    torch.save(d, tmp_path / 'edited.pt')
    with pytest.raises(JudgeError, match='checksum'): load_judge(tmp_path / 'edited.pt')
    d = torch.load(p, weights_only=True); d['meta']['dataset'] = 'sprites'   # edited metadata
    torch.save(d, tmp_path / 'meta.pt')
    with pytest.raises(JudgeError, match='checksum'): load_judge(tmp_path / 'meta.pt')
    (tmp_path / 'trunc.pt').write_bytes(p.read_bytes()[:1000])
    with pytest.raises(JudgeError, match='trunc.pt.*not readable'): load_judge(tmp_path / 'trunc.pt')
    torch.save({'format': 'something else'}, tmp_path / 'other.pt')
    with pytest.raises(JudgeError, match='not a'): load_judge(tmp_path / 'other.pt')
    with pytest.raises(JudgeError, match='does not exist'): load_judge(tmp_path / 'missing.pt')
    assert issubclass(JudgeError, ValueError)


def test_mismatch_is_refused(tiny_judge, shapes):
    check_judge(tiny_judge, shapes.info, 16)
    with pytest.raises(ValueError, match='image_size'): check_judge(tiny_judge, shapes.info, 32)
    other = make_shapes(size=16).info
    other.name = 'sprites'
    with pytest.raises(ValueError, match='dataset'): check_judge(tiny_judge, other, 16)


def test_training_learns_and_resume_is_exact(tmp_path, shapes):
    kw = dict(limit=240, progress=False, seed=3)
    ref = train_judge(shapes, 'tiny', out=tmp_path / 'ref.pt', epochs=2, log=lambda *a: None, **kw)

    class Stop(Exception): pass
    def stop_at_second(msg):
        if msg.startswith('epoch 2'): raise Stop
    with pytest.raises(Stop): train_judge(shapes, 'tiny', out=tmp_path / 'cut.pt', epochs=2, log=stop_at_second, **kw)
    assert (tmp_path / 'cut.pt.state').exists() and not (tmp_path / 'cut.pt').exists()
    msgs = []
    res = train_judge(shapes, 'tiny', out=tmp_path / 'cut.pt', epochs=2, log=msgs.append, **kw)
    assert any('resumed' in m and 'after epoch 1' in m for m in msgs)
    assert not (tmp_path / 'cut.pt.state').exists()
    for (k, a), b in zip(ref.state_dict().items(), res.state_dict().values()): torch.testing.assert_close(a, b, msg=k)
    acc = load_judge(tmp_path / 'cut.pt').meta['test_accuracy']
    assert set(acc) == set(shapes.info.dynamic_factors + shapes.info.static_factors)
    x, y = split_at_size(shapes.test.subset(range(240)), 16)
    assert judge_accuracy(res, x, y) == pytest.approx(acc)


def test_cli_judge_train_and_show(cli, tmp_path, capsys):
    from seqdis_nb.cli import main
    r = cli('judge', 'train', '--dataset', 'shapes', '--size', '16', '--epochs', '1', '--limit', '100',
            '--threads', '1', '--quiet', '--out', tmp_path / 'j.pt')
    assert r.returncode == 0, r.stderr
    assert 'test accuracy' in r.stdout
    capsys.readouterr()
    assert main(['judge', 'show', str(tmp_path / 'j.pt')]) == 0                    # in-process: no second start-up
    out = capsys.readouterr().out
    assert 'dataset shapes at 16x16' in out and 'verified' in out and 'motion' in out
    (tmp_path / 'bad.pt').write_bytes(b'not a judge')
    assert main(['judge', 'show', str(tmp_path / 'bad.pt')]) == 2
    assert 'not readable' in capsys.readouterr().err


def test_corrupt_resume_state_and_failed_write(tmp_path, shapes, monkeypatch):
    "A truncated OUT.state is a clear error naming it; a write that fails leaves no temp file and the old file intact."
    from seqdis_nb import judge as J
    kw = dict(limit=240, progress=False, seed=3, log=lambda *a: None)
    class Stop(Exception): pass
    def stop(msg):
        if msg.startswith('epoch 2'): raise Stop
    with pytest.raises(Stop): train_judge(shapes, 'tiny', out=tmp_path / 'j.pt', epochs=2, **{**kw, 'log': stop})
    st = tmp_path / 'j.pt.state'
    good = st.read_bytes()
    st.write_bytes(good[:len(good) // 2])
    with pytest.raises(J.JudgeError, match=r'j\.pt\.state is truncated or corrupt'):
        train_judge(shapes, 'tiny', out=tmp_path / 'j.pt', epochs=2, **kw)
    st.write_bytes(good)
    def full(*a, **k): raise OSError(28, 'No space left on device')
    monkeypatch.setattr(J.torch, 'save', full)
    with pytest.raises(OSError, match='No space left'): J._atomic_torch_save({'a': 1}, st)
    assert st.read_bytes() == good and not [p for p in tmp_path.iterdir() if 'tmp' in p.name]
