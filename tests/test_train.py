import importlib.util, json, random

import numpy as np
import pytest
import torch
from torch.utils.data.distributed import DistributedSampler

from seqdis_nb.core import seed_everything
from seqdis_nb.data import DatasetInfo, make_shapes
from seqdis_nb.train import (CHECKPOINT_FORMAT, CheckpointError, NonFiniteLossError, Trainer, _check_fits,
                             atomic_write, build_model, epoch_order, load_checkpoint, load_model, model_class,
                             prepare_batch, rng_state, save_checkpoint, set_rng_state, validation_loss)


@pytest.fixture(scope='module')
def shapes16():
    return make_shapes(size=16)


def make_trainer(data, out, init=0, **kw):
    "A tiny DBSE on 16x16 Shapes: 4 steps of 16 sequences per epoch, one thread."
    torch.set_num_threads(1)
    seed_everything(init)
    m = build_model('dbse', 'shapes-quick', image_size=16, batch_size=16)
    kw = dict(dict(device='cpu', checkpoint_every=3, steps_per_epoch=4, val_batches=1, progress=False), **kw)
    return Trainer(m, data, out, **kw)


def same(u, v):
    "Exact equality of nested dicts / lists / tensors."
    if isinstance(u, torch.Tensor): return isinstance(v, torch.Tensor) and u.dtype == v.dtype and torch.equal(u, v)
    if isinstance(u, dict): return isinstance(v, dict) and u.keys() == v.keys() and all(same(u[k], v[k]) for k in u)
    if isinstance(u, (list, tuple)): return len(u) == len(v) and all(same(p, q) for p, q in zip(u, v))
    return u == v


class Crash(Exception): pass


def crash_at(trainer, step):
    "Make `trainer` raise Crash when it is about to take step `step + 1`."
    real = trainer.train_step
    def train_step(x):
        if trainer.step == step: raise Crash()
        return real(x)
    trainer.train_step = train_step


@pytest.fixture(scope='module')
def reference(shapes16, tmp_path_factory):
    "An uninterrupted 3-epoch run (12 steps)."
    out = tmp_path_factory.mktemp('ref')
    make_trainer(shapes16, out).fit(3)
    return out


def test_few_steps_reduce_the_loss(reference):
    m = json.loads((reference / 'metrics.json').read_text())
    assert len(m['step_loss']) == 12 and m['steps'] == list(range(1, 13))
    assert np.mean(m['step_loss'][-3:]) < 0.75 * np.mean(m['step_loss'][:3]), m['step_loss']
    ep = m['epochs']
    assert [r['epoch'] for r in ep] == [1, 2, 3] and ep[-1]['val']['loss'] < ep[0]['val']['loss']
    assert set(ep[0]['train']) == {'loss', 'recon', 'recon_first', 'kl_s', 'kl_d'}
    assert all(r['wall_time'] > 0 and r['seqs_per_s'] > 0 for r in ep)
    assert sorted(p.name for p in reference.iterdir()) == ['best.pt', 'last.pt', 'loss.png', 'metrics.json']
    assert (reference / 'loss.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    best = load_checkpoint(reference / 'best.pt')
    assert best['epoch'] == m['best']['epoch'] and m['best']['on'] == 'val'
    assert m['best']['loss'] == min(r['val']['loss'] for r in ep)


@pytest.mark.parametrize('crash_step, last_step', [(7, 6), (5, 4), (10, 9)])
def test_crash_and_resume_is_bit_identical(shapes16, reference, tmp_path, crash_step, last_step):
    "Interrupted mid-epoch (7: last.pt from step 6; 10: from 9) or right after an epoch end (5: from 4)."
    t = make_trainer(shapes16, tmp_path)
    crash_at(t, crash_step)
    with pytest.raises(Crash): t.fit(3)
    assert load_checkpoint(tmp_path / 'last.pt')['step'] == last_step
    # a new process would build a fresh model: other initial weights, other global RNG state
    t2 = make_trainer(shapes16, tmp_path, init=123)
    torch.manual_seed(99); np.random.seed(99); random.seed(99)
    t2.fit(3, resume=True)
    a, b = load_checkpoint(reference / 'last.pt'), load_checkpoint(tmp_path / 'last.pt')
    assert a['step'] == b['step'] == 12 and a['epoch'] == b['epoch'] == 3
    assert same(a['model'], b['model'])
    assert same(a['optimizer'], b['optimizer'])
    assert same(a['rng'], b['rng'])
    assert a['metrics']['step_loss'] == b['metrics']['step_loss']
    for ra, rb in zip(a['metrics']['epochs'], b['metrics']['epochs']):
        assert ra['train'] == rb['train'] and ra['val'] == rb['val']
    assert same(load_checkpoint(reference / 'best.pt')['model'], load_checkpoint(tmp_path / 'best.pt')['model'])


def test_resume_checks_the_run(shapes16, reference, tmp_path):
    import shutil
    shutil.copy(reference / 'last.pt', tmp_path / 'last.pt')
    with pytest.raises(CheckpointError, match=r"different config \(fields \['z_dim'\]\)"):
        seed_everything(0)
        m = build_model('dbse', 'shapes-quick', image_size=16, batch_size=16, z_dim=8)
        Trainer(m, shapes16, tmp_path, device='cpu', steps_per_epoch=4, progress=False).fit(4, resume=True)
    with pytest.raises(CheckpointError, match='trained with seed=0, this run has 1'):
        make_trainer(shapes16, tmp_path, seed=1).fit(4, resume=True)
    with pytest.raises(ValueError, match='already holds a run'):
        make_trainer(shapes16, tmp_path).fit(4)
    t = make_trainer(shapes16, tmp_path)           # nothing more to do: 3 epochs are already complete
    t.fit(3, resume=True)
    assert t.step == 12


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(shapes16, tmp_path):
    t = make_trainer(shapes16, tmp_path)
    real = t.model.training_loss
    def poisoned(x, epoch=0, n_data=None):
        loss, terms = real(x, epoch, n_data)
        if t.step == 7:
            terms['recon_first'] = terms['recon_first'] + float('inf'); loss = loss + float('inf')
        return loss, terms
    t.model.training_loss = poisoned
    with pytest.raises(NonFiniteLossError, match=r"step 8 \(epoch 2\): term 'recon_first' is inf"):
        t.fit(3)
    assert all(torch.isfinite(v).all() for v in t.model.state_dict().values())   # the bad step was not taken
    ck = load_checkpoint(tmp_path / 'last.pt')
    assert ck['step'] == 6
    assert load_checkpoint(tmp_path / 'best.pt')['step'] == 4
    model = load_model(tmp_path / 'last.pt', 'cpu')
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())


def test_checkpoint_errors(shapes16, reference, tmp_path):
    good = (reference / 'last.pt').read_bytes()
    with pytest.raises(CheckpointError, match='no checkpoint file at .*missing.pt'):
        load_checkpoint(tmp_path / 'missing.pt')
    cases = {'cut.pt': good[:len(good) // 3], 'empty.pt': b'', 'noise.pt': np.random.default_rng(0).bytes(5000)}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match=f'{name} is truncated or corrupt'): load_checkpoint(tmp_path / name)
        with pytest.raises(ValueError): load_model(tmp_path / name)          # CheckpointError is a ValueError
    torch.save({'state_dict': {}}, tmp_path / 'other.pt')
    torch.save(torch.zeros(3), tmp_path / 'tensor.pt')
    for name in ('other.pt', 'tensor.pt'):
        with pytest.raises(CheckpointError, match=f'{name} is not a seqdis_nb checkpoint'): load_checkpoint(tmp_path / name)
    ck = load_checkpoint(reference / 'last.pt'); del ck['optimizer']
    torch.save(ck, tmp_path / 'partial.pt')
    with pytest.raises(CheckpointError, match=r"lacks the checkpoint entries \['optimizer'\]"):
        load_checkpoint(tmp_path / 'partial.pt')
    ck = load_checkpoint(reference / 'last.pt'); ck['config']['z_dim'] = 8
    torch.save(ck, tmp_path / 'mismatch.pt')
    with pytest.raises(CheckpointError, match='do not fit the saved config'): load_model(tmp_path / 'mismatch.pt')
    # a pickled python object is refused by weights_only=True
    torch.save({'format': CHECKPOINT_FORMAT, 'evil': Crash()}, tmp_path / 'pickle.pt')
    with pytest.raises(CheckpointError, match='truncated or corrupt .*Unpickl'): load_checkpoint(tmp_path / 'pickle.pt')


def test_a_write_that_dies_keeps_the_previous_checkpoint(reference, tmp_path, monkeypatch):
    import shutil
    shutil.copy(reference / 'last.pt', tmp_path / 'last.pt')
    model, opt = load_model(tmp_path / 'last.pt', 'cpu'), None
    real_save = torch.save
    def dying_save(obj, f):
        real_save(obj, f); f.truncate(1000); raise OSError('No space left on device')
    monkeypatch.setattr(torch, 'save', dying_save)
    with pytest.raises(OSError, match='No space left'): save_checkpoint(tmp_path / 'last.pt', model, opt, step=99)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / 'last.pt')['step'] == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ['last.pt']
    atomic_write(tmp_path / 'x.txt', lambda f: f.write(b'new'))
    assert (tmp_path / 'x.txt').read_bytes() == b'new'


def test_load_model_eval_mode_and_device(reference):
    m = load_model(reference / 'best.pt', device='cpu')
    assert not m.training and next(m.parameters()).device.type == 'cpu'
    assert m.kind == 'dbse' and m.config.image_size == 16 and m.config.batch_size == 16


@pytest.mark.parametrize('n, ws, drop_last', [(10, 1, False), (10, 4, False), (10, 4, True), (3, 5, False), (16, 4, True)])
def test_epoch_order_is_distributed_sampler(n, ws, drop_last):
    for epoch in (0, 3):
        shards = []
        for r in range(ws):
            s = DistributedSampler(range(n), num_replicas=ws, rank=r, shuffle=True, seed=11, drop_last=drop_last)
            s.set_epoch(epoch)
            shards.append(epoch_order(n, 11, epoch, r, ws, drop_last))
            assert shards[-1].tolist() == list(s)
        if n % ws == 0: assert sorted(torch.cat(shards).tolist()) == list(range(n))   # a partition of the data
    with pytest.raises(ValueError, match='rank must be < world_size'): epoch_order(10, 0, 0, rank=2, world_size=2)
    with pytest.raises(ValueError, match='n must be an int >= 1'): epoch_order(0, 0, 0)


def test_rng_state_roundtrip_and_validation_leaves_training_rng_alone(shapes16):
    g = torch.Generator().manual_seed(5)
    st = rng_state({'g': g})
    draw = lambda: (torch.rand(4), np.random.rand(4), random.random(), torch.rand(4, generator=g))
    a = draw(); set_rng_state(st, {'g': g}); b = draw()
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2] and torch.equal(a[3], b[3])
    with pytest.raises(ValueError, match="no generator 'h'"): set_rng_state(st, {'h': g})
    seed_everything(0)
    m = build_model('dbse', 'shapes-quick', image_size=16)
    torch.manual_seed(1); before = torch.get_rng_state()
    v = validation_loss(m, shapes16.val, batch_size=64, max_batches=2)
    assert torch.equal(torch.get_rng_state(), before) and m.training
    assert v == validation_loss(m, shapes16.val, batch_size=64, max_batches=2)
    v2 = validation_loss(m, shapes16.val, batch_size=64, max_batches=2, generator=torch.Generator().manual_seed(3))
    assert v2['loss'] != v['loss'] and np.isfinite(v2['loss'])


def test_bad_inputs(shapes16, tmp_path):
    with pytest.raises(ValueError, match="model kind must be one of"): model_class('vae')
    if importlib.util.find_spec('seqdis_nb.spyl') is None:
        with pytest.raises(ValueError, match='seqdis_nb.spyl, which is not available'): build_model('spyl', 'x')
    with pytest.raises(TypeError, match='batch must be a tensor'): prepare_batch([np.zeros(3)])
    with pytest.raises(TypeError, match='floats or uint8 video'): prepare_batch(torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match='uint8 batch must be video'): prepare_batch(torch.zeros(2, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r'steps_per_epoch must be an int in \[1, 75\]'):
        make_trainer(shapes16, tmp_path, steps_per_epoch=76)
    with pytest.raises(ValueError, match='checkpoint_every must be a positive int'):
        make_trainer(shapes16, tmp_path, checkpoint_every=0)
    with pytest.raises(ValueError, match='epochs must be a positive int'): make_trainer(shapes16, tmp_path).fit(0)
    with pytest.raises(TypeError, match='data must be a DataBundle'):
        Trainer(build_model('dbse', 'shapes-quick'), shapes16.train, tmp_path)
    info = DatasetInfo('sprites', 'video', [], [], [], [], 8, (3, 48, 48))
    with pytest.raises(ValueError, match=r"preset 'shapes-quick' expects frames of shape \(3, 32, 32\), dataset "
                                         r"'sprites' has \(3, 48, 48\)"):
        _check_fits(build_model('dbse', 'shapes-quick'), info)


def _train_args(out, *extra):
    return ('train', '--dataset', 'shapes', '--preset', 'shapes-quick', '--size', '16', '--batch-size', '16',
            '--steps-per-epoch', '3', '--checkpoint-every', '2', '--threads', '1', '--device', 'cpu', '--out', out,
            *extra)


def test_cli_train_end_to_end_and_resume(cli, tmp_path):
    full, part = tmp_path / 'full', tmp_path / 'part'
    r = cli(*_train_args(full, '--epochs', '2'))
    assert r.returncode == 0, r.stderr
    assert f'outputs in {full}/' in r.stdout and 'best.pt' in r.stdout and 'epoch 2/2:' in r.stdout
    assert sorted(p.name for p in full.iterdir()) == ['best.pt', 'last.pt', 'loss.png', 'metrics.json']
    m = json.loads((full / 'metrics.json').read_text())
    assert len(m['epochs']) == 2 and m['batch_size'] == 16 and m['config']['image_size'] == 16
    r = cli(*_train_args(part, '--epochs', '1', '--quiet'))
    assert r.returncode == 0, r.stderr
    r = cli(*_train_args(part, '--epochs', '2', '--resume', '--quiet'))
    assert r.returncode == 0 and 'resuming' in r.stdout, r.stdout + r.stderr
    a, b = load_checkpoint(full / 'last.pt'), load_checkpoint(part / 'last.pt')
    assert a['step'] == b['step'] == 6 and same(a['model'], b['model']) and same(a['optimizer'], b['optimizer'])


def test_cli_train_errors(tmp_path, capsys):
    "In-process (`main`, as the console script): bad arguments are a message and exit status 2, not a traceback."
    from seqdis_nb.cli import main
    assert main(['train', '--dataset', 'shapes', '--preset', 'nope', '--epochs', '1', '--out', str(tmp_path)]) == 2
    assert "seqdis train: error: unknown DBSE preset 'nope'" in capsys.readouterr().err
    assert main(['train', '--dataset', 'japanese_vowels', '--preset', 'series', '--size', '16', '--epochs', '1',
                 '--out', str(tmp_path)]) == 2
    assert '--size applies to --dataset shapes or sprites only' in capsys.readouterr().err
    (tmp_path / 'last.pt').write_bytes(b'x')
    assert main(list(map(str, _train_args(tmp_path, '--epochs', '1', '--quiet')))) == 2   # no --resume: keep the run
    assert 'already holds a run (last.pt)' in capsys.readouterr().err
    assert main(list(map(str, _train_args(tmp_path, '--epochs', '1', '--quiet', '--resume')))) == 2
    assert f'{tmp_path}/last.pt is truncated or corrupt' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(['train', '--dataset', 'shapes', '--preset', 'shapes-quick', '--epochs', '1', '--out', 'x', '--model', 'vae'])
    assert "invalid choice: 'vae'" in capsys.readouterr().err


def test_resize_video(shapes16):
    from seqdis_nb.train import resize_video
    d = resize_video(shapes16, 4)
    assert d.info.frame_shape == (3, 4, 4) and d.train.x.shape == (len(shapes16.train), 8, 4, 4, 3)
    assert d.train.x.dtype == np.uint8 and np.array_equal(d.test.static, shapes16.test.static)
    want = shapes16.val.x[3, 5, 4:8, 8:12].astype(np.float32).mean((0, 1))
    assert np.array_equal(d.val.x[3, 5, 1, 2], np.rint(want).astype(np.uint8))
    assert np.array_equal(resize_video(shapes16, 16).train.x, shapes16.train.x)
    with pytest.raises(ValueError, match='the size must divide 16'): resize_video(shapes16, 5)
    with pytest.raises(ValueError, match='the size must divide 16'): resize_video(shapes16, 32)


def test_bench_trainer_steps_runs(capsys):
    "bench/trainer_steps.py end to end at a tiny size (its numbers are measured by hand, see the README)."
    import runpy, sys
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / 'bench' / 'trainer_steps.py'
    argv = sys.argv
    sys.argv = [str(path), '--presets', 'shapes-quick', '--batch-size', '4', '--steps', '1', '--warmup', '1',
                '--threads', '1', '--device', 'cpu']
    try:
        with pytest.raises(SystemExit) as e: runpy.run_path(str(path), run_name='__main__')
    finally: sys.argv = argv
    assert e.value.code == 0
    out = capsys.readouterr().out
    row = next(l for l in out.splitlines() if l.startswith('shapes-quick'))
    s_per_step, seq_per_s = map(float, row.split()[3:5])
    assert s_per_step > 0 and abs(seq_per_s - 4 / s_per_step) < 0.1 * seq_per_s + 0.1, row


def test_a_flipped_byte_in_the_weights_is_detected(reference, tmp_path):
    "torch.load does not check tensor data: the checkpoint's SHA-256 over its tensors catches a flipped weight byte."
    import zipfile
    src = reference / 'last.pt'
    assert load_checkpoint(src)['sha256']                                          # written with every checkpoint
    with zipfile.ZipFile(src) as z:
        info = max((i for i in z.infolist() if '/data/' in i.filename), key=lambda i: i.file_size)
        assert info.compress_type == zipfile.ZIP_STORED
    raw = bytearray(src.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)   # local header, then the data
    raw[start + info.file_size // 2] ^= 0x10
    bad = tmp_path / 'flipped.pt'; bad.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match='flipped.pt is corrupt: its weights do not match the checksum'):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError): load_model(bad)
