"""Files from outside are data, not code: every loader uses weights_only=True / allow_pickle=False (checked in the
source), a pickle that would run code is refused before it runs, truncated images and archives are detected,
downloads are checksum-verified. And the numerical guards: the logvar clamp, and NaN losses named by term."""
import ast, io, json, os, pickle, shutil, zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from seqdis_nb.core import seed_everything
from seqdis_nb.data import make_shapes
from seqdis_nb.train import CHECKPOINT_FORMAT, CheckpointError, NonFiniteLossError, Trainer, build_model, \
    load_checkpoint, load_model

PKG = Path(__file__).resolve().parents[1] / 'seqdis_nb'


def _calls(name: str):
    "(file, line, ast.Call) of every call to `<something>.{name}` in the package sources."
    for p in sorted(PKG.glob('*.py')):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == name:
                yield p.name, node.lineno, node


def test_every_loader_refuses_pickled_code_in_the_source():
    loads = list(_calls('load'))
    torch_loads = [(f, l, c) for f, l, c in loads if isinstance(c.func.value, ast.Name) and c.func.value.id == 'torch']
    assert torch_loads, 'no torch.load found: the scan is broken'
    for f, l, c in torch_loads:
        kw = {k.arg: k.value for k in c.keywords}
        assert 'weights_only' in kw and isinstance(kw['weights_only'], ast.Constant) and kw['weights_only'].value is True, \
            f'{f}:{l}: torch.load without weights_only=True'
    for f, l, c in loads:
        for k in c.keywords:
            assert not (k.arg == 'allow_pickle' and getattr(k.value, 'value', None) is True), f'{f}:{l}: allow_pickle=True'
    for mod in ('pickle', 'dill', 'joblib', 'cloudpickle'):
        for p in PKG.glob('*.py'):
            assert f'import {mod}' not in p.read_text(), f'{p.name} imports {mod}'


class Evil:
    "Unpickling this runs `open(path, 'w')`: the marker file appears if the loader executes pickled code."
    def __init__(self, path): self.path = str(path)
    def __reduce__(self): return (open, (self.path, 'w'))


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
    "A real checkpoint of a tiny run (1 epoch, 2 steps)."
    out = tmp_path_factory.mktemp('run')
    torch.set_num_threads(1); seed_everything(0)
    m = build_model('dbse', 'shapes-quick', image_size=16, batch_size=16)
    Trainer(m, make_shapes(size=16), out, device='cpu', steps_per_epoch=2, val_batches=1, progress=False).fit(1)
    return out / 'last.pt'


def _evil_files(tmp, ckpt, marker):
    "Files that execute code when unpickled: inside a real checkpoint, as a whole file, and as a legacy pickle."
    good = torch.load(ckpt, weights_only=True)
    files = {}
    good['metrics']['hook'] = Evil(marker); torch.save(good, tmp / 'inside.pt'); files['inside.pt'] = tmp / 'inside.pt'
    torch.save(Evil(marker), tmp / 'whole.pt'); files['whole.pt'] = tmp / 'whole.pt'
    with open(tmp / 'legacy.pt', 'wb') as f: pickle.dump({'format': CHECKPOINT_FORMAT, 'x': Evil(marker)}, f)
    files['legacy.pt'] = tmp / 'legacy.pt'
    return files


def test_malicious_checkpoint_is_refused_without_running_it(ckpt, tmp_path):
    marker = tmp_path / 'pwned'
    for name, p in _evil_files(tmp_path, ckpt, marker).items():
        with pytest.raises(CheckpointError, match=f'{name} is truncated or corrupt'): load_checkpoint(p)
        with pytest.raises(CheckpointError): load_model(p, 'cpu')
        assert not marker.exists(), f'{name}: the pickled code ran'
    # and resuming a run from a malicious last.pt
    run = tmp_path / 'run'; run.mkdir()
    shutil.copy(tmp_path / 'inside.pt', run / 'last.pt')
    seed_everything(0)
    m = build_model('dbse', 'shapes-quick', image_size=16, batch_size=16)
    t = Trainer(m, make_shapes(size=16), run, device='cpu', steps_per_epoch=2, progress=False)
    with pytest.raises(CheckpointError, match='last.pt is truncated or corrupt'): t.fit(2, resume=True)
    assert not marker.exists()


def test_malicious_judge_is_refused_without_running_it(ckpt, tmp_path):
    J = pytest.importorskip('seqdis_nb.judge')
    marker = tmp_path / 'pwned'
    for name, p in _evil_files(tmp_path, ckpt, marker).items():
        with pytest.raises(J.JudgeError, match='not readable'): J.load_judge(p)
        assert not marker.exists(), f'{name}: the pickled code ran'
    # a judge-format dict that lacks entries, or with a tampered tensor, is an error naming the file
    judge = J.Judge(J.JudgeConfig.preset('small'), ['a', 'b'], [3, 2], 1)
    J.save_judge(tmp_path / 'j.pt', judge)
    d = torch.load(tmp_path / 'j.pt', weights_only=True)
    k = next(iter(d['state_dict'])); d['state_dict'][k] = d['state_dict'][k] + 1
    torch.save(d, tmp_path / 'tampered.pt')
    with pytest.raises(J.JudgeError, match='fails its SHA-256'): J.load_judge(tmp_path / 'tampered.pt')
    del d['factors']; torch.save(d, tmp_path / 'partial.pt')
    with pytest.raises(J.JudgeError, match='partial.pt'): J.load_judge(tmp_path / 'partial.pt')


def test_truncated_checkpoint_at_every_cut_is_a_checkpoint_error(ckpt, tmp_path):
    data = ckpt.read_bytes()
    for frac in np.linspace(0, 0.999, 25):
        p = tmp_path / f'cut{frac:.3f}.pt'
        p.write_bytes(data[:int(len(data) * frac)])
        with pytest.raises(CheckpointError, match='truncated or corrupt'): load_checkpoint(p)


# ------------------------------------------------------------------------------------------- the data layer
import seqdis_nb.data as D


@pytest.fixture(scope='module')
def assets():
    a = os.environ.get('SEQDIS_SPRITES_ASSETS')
    if not a or not Path(a).is_dir(): pytest.skip('needs the LPC sprite layers ($SEQDIS_SPRITES_ASSETS)')
    return Path(a)


def test_truncated_png_layer_is_detected(assets, tmp_path):
    bad = tmp_path / 'layers'
    shutil.copytree(assets, bad, ignore=shutil.ignore_patterns('*LICENSE*'))
    data = (bad / 'body/2.png').read_bytes()
    for frac in (0.1, 0.5, 0.95):
        (bad / 'body/2.png').write_bytes(data[:int(len(data) * frac)])
        with pytest.raises(ValueError, match='differ from the upstream files'): D.load_sprite_layers(bad)
        with pytest.raises(ValueError, match='body/2.png is not a readable PNG'): D.load_sprite_layers(bad, verify=False)


def test_download_checks_the_checksum_file_url(assets, tmp_path):
    "A file:// mirror holding a different file: refused, not kept; the right file is accepted."
    mirror = tmp_path / 'mirror'
    shutil.copytree(assets, mirror, ignore=shutil.ignore_patterns('*LICENSE*'))
    (mirror / 'hair/1.png').write_bytes((mirror / 'hair/0.png').read_bytes())       # a valid PNG, the wrong one
    url = mirror.as_uri() + '/'
    with pytest.raises(ValueError, match='checksum mismatch for sprite layer hair/1.png'):
        D.download_sprites_assets(tmp_path / 'dl', base_url=url, files=['hair/0.png', 'hair/1.png'])
    assert D._sha256(tmp_path / 'dl/hair/0.png') == D.sprites_checksums()['hair/0.png']
    assert not (tmp_path / 'dl/hair/1.png').exists() and not list((tmp_path / 'dl').rglob('*.part'))


def _fake_cache(folder, n=3, static=None):
    "A tiny stand-in for the Sprites cache (x.npy, labels.npz, manifest.json) to exercise the cache checks."
    folder.mkdir(parents=True)
    np.save(folder / 'x.npy', np.zeros((n, 8, 4, 4, 3), np.uint8))
    with open(folder / 'labels.npz', 'wb') as f:
        np.savez(f, static=np.zeros((n, 4), np.int64) if static is None else static, dynamic=np.zeros(n, np.int64),
                 char=np.zeros(n, np.int64))
    return D._write_manifest(folder, {})


def test_truncated_or_swapped_cache_files_are_detected(tmp_path):
    folder = tmp_path / 'sprites-v1'
    _fake_cache(folder)
    assert D._check_sprites_cache(folder, {}) is None
    for name in ('labels.npz', 'x.npy'):
        good = (folder / name).read_bytes()
        (folder / name).write_bytes(good[:len(good) // 2])
        assert f'{name} has {len(good) // 2} bytes' in D._check_sprites_cache(folder, {})
        (folder / name).write_bytes(good[:-1] + bytes([good[-1] ^ 1]))                  # same size, one bit off
        assert f'{name} does not match its SHA-256' in D._check_sprites_cache(folder, {})
        (folder / name).write_bytes(good)
    assert D._check_sprites_cache(folder, {}) is None
    # a truncated .npz read directly is an error, not garbage
    good = (folder / 'labels.npz').read_bytes()
    (tmp_path / 'cut.npz').write_bytes(good[:len(good) // 2])
    with pytest.raises((zipfile.BadZipFile, ValueError, OSError, EOFError)):
        with np.load(tmp_path / 'cut.npz') as z: z['static']


def test_pickled_object_arrays_in_the_cache_never_run(tmp_path):
    "Even a cache whose manifest matches (an attacker rewrote it too): labels.npz with a pickle is refused."
    marker = tmp_path / 'pwned'
    folder = tmp_path / 'sprites-v1'
    evil = np.empty((3, 4), object); evil[0, 0] = Evil(marker)
    _fake_cache(folder, static=evil)
    assert D._check_sprites_cache(folder, {}) is None          # sizes and hashes agree: the loader opens it
    with pytest.raises(ValueError, match='allow_pickle'):
        with np.load(folder / 'labels.npz') as z: z['static']     # what load_sprites does
    assert not marker.exists()


# ------------------------------------------------------------------------------------------- numerical guards
def test_logvar_clamp_keeps_exp_finite_and_nan_losses_name_their_term(tmp_path):
    """A prior log-variance head driven to -200 overflows exp(-logvar) in the dynamic KL (float32: exp(89) is
    inf). With the default clamp (|logvar| <= 30) the loss stays finite; without it the trainer stops on the
    non-finite term, names it and the step, and writes nothing after the last good checkpoint."""
    data = make_shapes(size=16)
    x = data.train.batch(np.arange(4))[0]
    for clamp in (30.0, None):
        seed_everything(0)
        m = build_model('dbse', 'shapes-quick', image_size=16, batch_size=16, logvar_clamp=clamp)
        with torch.no_grad(): m.z_prior_logvar.bias.fill_(-200.)    # prior variance e^-200: KL weight e^200
        loss, terms = m.training_loss(x)
        if clamp is not None:
            assert torch.isfinite(loss) and all(torch.isfinite(v) for v in terms.values()), terms
            post = m.encode(x, generator=torch.Generator().manual_seed(0))
            assert float(m.prior(post.d)[1].min().detach()) == -clamp
            continue
        assert not torch.isfinite(terms['kl_d']) and torch.isfinite(terms['recon']) and torch.isfinite(terms['kl_s'])
        t = Trainer(m, data, tmp_path, device='cpu', steps_per_epoch=2, progress=False)
        with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 1 \(epoch 1\): term 'kl_d' is inf.*"
                                                     r"nothing was written after the last good checkpoint \(none yet\)"):
            t.fit(1)
        assert not (tmp_path / 'last.pt').exists()


def test_nan_loss_names_the_first_term_in_the_cli(tmp_path, capsys, monkeypatch):
    "Through `seqdis train`: exit status 3 and the term and step on stderr; last.pt is the last good one."
    from seqdis_nb.cli import main
    from seqdis_nb.dbse import DBSE
    real = DBSE.loss_terms
    def poisoned(self, x, out):
        terms = real(self, x, out)
        if self.training and getattr(self, '_n', 0) == 3: terms['kl_d'] = terms['kl_d'] * float('nan')
        self._n = getattr(self, '_n', 0) + self.training
        return terms
    monkeypatch.setattr(DBSE, 'loss_terms', poisoned)
    argv = ['train', '--dataset', 'shapes', '--preset', 'shapes-quick', '--size', '16', '--batch-size', '16',
            '--steps-per-epoch', '2', '--checkpoint-every', '1', '--threads', '1', '--device', 'cpu', '--quiet',
            '--epochs', '3', '--out', str(tmp_path)]
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert "non-finite loss at step 4 (epoch 2): term 'kl_d' is nan" in err, err
    assert load_checkpoint(tmp_path / 'last.pt')['step'] == 3
