"Data layer: Shapes, Sprites (generation, cache, download), offline and user-brought sequence datasets."
import numpy as np
import pytest
import torch

from seqdis_nb.data import DataBundle, DatasetInfo, SeqSplit, make_shapes, show_sequences


# ---------------------------------------------------------------- Shapes
@pytest.fixture(scope='module')
def shapes32():
    return make_shapes(size=32, seed=3)


def test_shapes_layout(shapes32):
    b = shapes32
    assert isinstance(b, DataBundle) and b.info.kind == 'video'
    assert len(b.info.static_factors) >= 3 and b.info.dynamic_classes[0] >= 6
    assert b.info.frame_shape == (3, 32, 32) and b.info.seq_len == 8
    n_id = int(np.prod(b.info.static_classes))
    assert sum(len(s) for s in b.splits().values()) == n_id * b.info.dynamic_classes[0]
    for s in b.splits().values():
        assert s.x.dtype == np.uint8 and s.x.shape[1:] == (8, 32, 32, 3)
        assert s.static.shape == (len(s), len(b.info.static_factors)) and s.dynamic.shape == (len(s),)
        # every identity performs every motion once
        ids, counts = np.unique(s.char, return_counts=True)
        assert (counts == b.info.dynamic_classes[0]).all()
        # an identity's static labels are the same in all its sequences
        for c in ids[:20]:
            assert (s.static[s.char == c] == s.static[s.char == c][0]).all()
    tr, va, te = (set(s.char.tolist()) for s in (b.train, b.val, b.test))
    assert not (tr & va) and not (tr & te) and not (va & te)
    assert len(va) > 0 and len(te) > 0


def test_shapes_determinism():
    a, b, c = make_shapes(size=16, seed=7), make_shapes(size=16, seed=7), make_shapes(size=16, seed=8)
    for k in ('train', 'val', 'test'):
        np.testing.assert_array_equal(getattr(a, k).x, getattr(b, k).x)
        np.testing.assert_array_equal(getattr(a, k).char, getattr(b, k).char)
    assert set(a.test.char.tolist()) != set(c.test.char.tolist())


def test_shapes_bad_args():
    with pytest.raises(ValueError, match='size must be'): make_shapes(size=5)
    with pytest.raises(ValueError, match='T must be'): make_shapes(size=16, T=1)
    with pytest.raises(ValueError, match='test_frac and val_frac'): make_shapes(size=16, test_frac=0.7, val_frac=0.4)


def test_dataset_protocol(shapes32):
    s = shapes32.train
    x, st, dy = s[3]
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert st.dtype == torch.int64 and st.shape == (4,) and dy.dtype == torch.int64 and dy.dim() == 0
    xb, sb, db = s.batch(np.array([3, 0, 5]))
    assert xb.shape == (3, 8, 3, 32, 32)
    torch.testing.assert_close(xb[0], x)
    assert torch.equal(sb[0], st) and int(db[0]) == int(dy)
    # the reference x/256 scaling
    s256 = SeqSplit(s.x, s.static, s.dynamic, s.char, s.info, scale=256)
    torch.testing.assert_close(s256.batch([3])[0][0], torch.from_numpy(s.x[3]).permute(0, 3, 1, 2).float() / 256)
    loader = torch.utils.data.DataLoader(s, batch_size=4)
    xl, sl, dl = next(iter(loader))
    assert xl.shape == (4, 8, 3, 32, 32) and sl.shape == (4, 4) and dl.shape == (4,)


def test_seqsplit_bad_input(shapes32):
    s = shapes32.train
    with pytest.raises(ValueError, match=r'must be uint8 \(N, T, 32, 32, 3\)'):
        SeqSplit(s.x[:, :, :16], s.static, s.dynamic, s.char, s.info)
    with pytest.raises(ValueError, match='static must have shape'):
        SeqSplit(s.x, s.static[:, :2], s.dynamic, s.char, s.info)
    with pytest.raises(ValueError, match='scale must be a positive number'):
        SeqSplit(s.x, s.static, s.dynamic, s.char, s.info, scale=0)
    with pytest.raises(TypeError, match='idx must hold integers'):
        s.batch(np.array([0.5]))
    with pytest.raises(ValueError, match="kind must be 'video' or 'sequence'"):
        DatasetInfo('x', 'image', [], [], ['a'], [2], 8, (3, 4, 4))


def test_show_sequences(shapes32):
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig = show_sequences(shapes32.test, n=3)
    grid = fig.axes[0].images[0].get_array()
    assert grid.shape == (3 * 34 - 2, 8 * 34 - 2, 3)
    np.testing.assert_array_equal(grid[68:100, 34 * 7:34 * 7 + 32], shapes32.test.x[2, 7])
    plt.close(fig)
    fig = show_sequences(torch.rand(2, 5, 7), n=2)  # features over time: one line plot per sequence
    assert len(fig.axes) == 2
    plt.close(fig)
    with pytest.raises(TypeError, match='x must be a SeqSplit'): show_sequences([1, 2, 3])


# ---------------------------------------------------------------- Sprites
import functools, http.server, json, shutil, threading
from pathlib import Path

from PIL import Image

from seqdis_nb import data as D
from seqdis_nb.data import load_sprites

# The spec, written out independently of the package: (action, direction) -> sheet row; action -> frame columns.
ROWS = {('walk', 'front'): 10, ('walk', 'left'): 9, ('walk', 'right'): 11,
        ('spellcast', 'front'): 2, ('spellcast', 'left'): 1, ('spellcast', 'right'): 3,
        ('slash', 'front'): 14, ('slash', 'left'): 13, ('slash', 'right'): 15}
COLS = {'walk': [8, 1, 2, 3, 4, 5, 6, 7], 'spellcast': [0, 1, 2, 3, 4, 5, 4, 6], 'slash': [0, 1, 2, 3, 4, 5, 4, 0]}


@pytest.fixture(scope='module')
def assets():
    "The layer folder: $SEQDIS_SPRITES_ASSETS when set, else the package's checked download."
    return D.sprites_assets()


@pytest.fixture(scope='module')
def sprites_cache(tmp_path_factory, assets):
    "A fresh cache folder for this module, deleted afterwards (the frames take 1.1 GB)."
    d = tmp_path_factory.mktemp('cache')
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope='module')
def sprites(sprites_cache, assets):
    return load_sprites(assets=assets, cache=sprites_cache)


def test_sprites_layout(sprites, sprites_cache):
    tr, va, te = sprites.train, sprites.val, sprites.test
    assert (len(tr), len(va), len(te)) == (8100, 900, 2664) and len(tr) + len(va) == 9000
    assert sprites.info.static_factors == ['body', 'bottom', 'top', 'hair'] and sprites.info.static_classes == [6] * 4
    assert sprites.info.dynamic_classes == [9] and sprites.info.frame_shape == (3, 64, 64)
    for s in (tr, va, te):
        assert s.x.dtype == np.uint8 and s.x.shape[1:] == (8, 64, 64, 3)
        assert s.static.shape == (len(s), 4) and s.dynamic.shape == (len(s),)
        assert np.array_equal(np.bincount(s.dynamic), np.full(9, len(s) // 9))
        c = s.char
        assert np.array_equal(s.static, np.stack([c // 216, (c % 216) // 36, (c % 36) // 6, c % 6], 1))
        assert (np.unique(c, return_counts=True)[1] == 9).all()
    np.random.seed(423); perm = np.random.permutation(1296)
    assert set(tr.char) | set(va.char) == set(perm[:1000].tolist())
    assert set(te.char) == set(perm[1000:].tolist())
    assert not set(tr.char) & set(va.char)
    x, st, dy = te[0]
    assert x.shape == (8, 3, 64, 64) and x.dtype == torch.float32
    assert torch.equal(st, torch.from_numpy(te.static[0])) and int(dy) == te.dynamic[0]
    # the reference x/256 scaling
    s256 = load_sprites(cache=sprites_cache, scale=256).test         # a valid cache needs no assets
    torch.testing.assert_close(s256[0][0] * 256, x * 255)


@pytest.mark.parametrize('split,k', [('train', 0), ('test', 5)])
def test_sprites_frames_match_independent_composite(sprites, assets, split, k):
    s = getattr(sprites, split)
    char = int(np.unique(s.char)[k])
    b, bo, t, h = char // 216, (char % 216) // 36, (char % 36) // 6, char % 6
    sheet = Image.new('RGBA', (832, 1344), (0, 0, 0, 255))
    for f in [f'body/{b}.png', f'bottomwear/{bo}.png', f'topwear/{t}.png', f'hair/{h}.png', 'shoes/1.png']:
        sheet = Image.alpha_composite(sheet, Image.open(Path(assets) / f).convert('RGBA'))
    rows = np.flatnonzero(s.char == char)
    assert len(rows) == 9
    for ai, a in enumerate(['walk', 'spellcast', 'slash']):
        for di, d in enumerate(['front', 'left', 'right']):
            (i,) = rows[s.dynamic[rows] == 3 * ai + di]
            r = ROWS[a, d]
            want = np.stack([np.asarray(sheet.crop((64 * c, 64 * r, 64 * c + 64, 64 * r + 64)))[..., :3]
                             for c in COLS[a]])
            np.testing.assert_array_equal(s.x[i], want, err_msg=f'char {char} {a} {d}')
    assert s.x[rows].std() > 10  # not a blank canvas


def test_sprites_cache_corruption_rebuilt(sprites, sprites_cache, assets):
    folder = Path(sprites_cache) / 'sprites-v1'
    ref = np.array(sprites.test.x[:9])
    man = json.loads((folder / 'manifest.json').read_text())
    assert set(man['files']) == {'x.npy', 'labels.npz'}
    # flip one byte in the middle of the frames (the rebuild replaces the file; nothing reads these frames later)
    p = folder / 'x.npy'
    with open(p, 'r+b') as f:
        f.seek(p.stat().st_size // 2); b = f.read(1); f.seek(-1, 1); f.write(bytes([b[0] ^ 0xFF]))
    assert 'SHA-256' in D._check_sprites_cache(folder, None)
    with pytest.warns(UserWarning, match='not usable .*SHA-256.*rebuilding'):
        again = load_sprites(assets=assets, cache=sprites_cache)
    np.testing.assert_array_equal(again.test.x[:9], ref)
    assert D._check_sprites_cache(folder, None) is None
    # partial caches are detected without hashing: truncated frames, missing manifest
    with open(p, 'r+b') as f: size = f.seek(0, 2)
    man = json.loads((folder / 'manifest.json').read_text())
    assert man['files']['x.npy']['size'] == size == 11664 * 8 * 64 * 64 * 3 + 128
    (folder / 'manifest.json').rename(folder / 'manifest.bak')
    assert 'manifest.json is missing' in D._check_sprites_cache(folder, None)
    (folder / 'manifest.bak').rename(folder / 'manifest.json')
    (folder / 'manifest.json').write_text('{"format": "seqdis_nb sprites v1", "files": {')
    assert 'unreadable' in D._check_sprites_cache(folder, None)
    (folder / 'manifest.json').write_text(json.dumps(man))
    assert D._check_sprites_cache(folder, man['assets']) is None


@pytest.fixture
def served(tmp_path, assets):
    "A local http.server on 127.0.0.1 serving a copy of the layer folder: (folder, base_url)."
    mirror = tmp_path / 'mirror'
    shutil.copytree(assets, mirror, ignore=shutil.ignore_patterns('*LICENSE*'))
    h = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(mirror))
    h.log_message = lambda *a: None
    srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), h)
    th = threading.Thread(target=srv.serve_forever, daemon=True); th.start()
    yield mirror, f'http://127.0.0.1:{srv.server_address[1]}'
    srv.shutdown(); srv.server_close(); th.join()


def test_download_all_and_verify(served, tmp_path, monkeypatch):
    _, url = served
    monkeypatch.delenv('SEQDIS_SPRITES_ASSETS', raising=False)
    monkeypatch.setenv('SEQDIS_SPRITES_URL', url)
    folder = D.sprites_assets(cache=tmp_path / 'c')             # no assets given: download into the cache, checked
    assert folder == tmp_path / 'c' / 'lpc_sprites'
    sums = D.sprites_checksums()
    assert len(sums) == 39
    for rel, h in sums.items(): assert D._sha256(folder / rel) == h
    assert not list(folder.rglob('*.part'))
    # a second call finds the files and downloads nothing (the server is not needed)
    assert D.download_sprites_assets(folder, base_url='http://127.0.0.1:9/') == folder


def test_download_tampered_refused(served, tmp_path):
    mirror, url = served
    (mirror / 'topwear/4.png').write_bytes((mirror / 'topwear/4.png').read_bytes() + b'\0')
    with pytest.raises(ValueError, match='checksum mismatch for sprite layer topwear/4.png'):
        D.download_sprites_assets(tmp_path / 'dl', base_url=url, files=['topwear/3.png', 'topwear/4.png'])
    assert (tmp_path / 'dl/topwear/3.png').exists() and not (tmp_path / 'dl/topwear/4.png').exists()
    assert not (tmp_path / 'dl/topwear/4.png.part').exists()
    (mirror / 'topwear/5.png').unlink()
    with pytest.raises(ConnectionError, match='could not download sprite layer topwear/5.png'):
        D.download_sprites_assets(tmp_path / 'dl', base_url=url, files=['topwear/5.png'])
    with pytest.raises(ValueError, match='files must be upstream layer files'):
        D.download_sprites_assets(tmp_path / 'dl', base_url=url, files=['topwear/99.png'])


def test_sprites_bad_assets(tmp_path, assets):
    with pytest.raises(ValueError, match='does not exist or is not a folder'):
        D.sprites_assets(tmp_path / 'nope')
    bad = tmp_path / 'layers'
    shutil.copytree(assets, bad, ignore=shutil.ignore_patterns('*LICENSE*'))
    (bad / 'hair/3.png').unlink()
    with pytest.raises(ValueError, match=r"lacks 1 layer file\(s\): \['hair/3.png'\]"):
        D.sprites_assets(bad)
    (bad / 'hair/3.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'garbage' * 50)        # corrupt PNG
    with pytest.raises(ValueError, match='differ from the upstream files'):
        D.load_sprite_layers(bad)
    with pytest.raises(ValueError, match='hair/3.png is not a readable PNG'):
        D.load_sprite_layers(bad, verify=False)
    Image.new('RGBA', (64, 64)).save(bad / 'hair/3.png')                           # wrong sheet size
    with pytest.raises(ValueError, match='must be a 832x1344 sheet'):
        D.load_sprite_layers(bad, verify=False)
    with pytest.raises(ValueError, match='val_chars must be an integer'):
        load_sprites(assets=assets, cache=tmp_path / 'c', val_chars=1000)
    assert not (tmp_path / 'c' / 'sprites-v1').exists()


# ---------------------------------------------------------------- sequences
import csv, wave
from datetime import datetime, timedelta

from seqdis_nb import sequences as S


def _check_bundle(b, T, F, static_factors, dynamic_factors):
    assert b.info.kind == 'sequence' and b.info.frame_shape == (F,)
    assert b.info.static_factors == static_factors and b.info.dynamic_factors == dynamic_factors
    for s in b.splits().values():
        assert s.x.dtype == np.float32 and s.x.shape[1:] == (T, F) and np.isfinite(s.x).all()
        assert s.static.shape == (len(s), len(static_factors))
        if not dynamic_factors: assert (s.dynamic == -1).all()
        x, st, dy = s[0]
        assert x.shape == (T, F) and x.dtype == torch.float32 and dy.dim() == 0 and st.shape == (len(static_factors),)
    assert not set(b.val.char) & set(b.train.char) and not set(b.test.char) & (set(b.train.char) | set(b.val.char))


def test_japanese_vowels():
    b = S.load_japanese_vowels()
    _check_bundle(b, 29, 12, ['speaker'], [])
    assert b.info.seq_len is None and b.info.static_classes == [9]
    assert len(b.train) + len(b.val) == 270 and len(b.test) == 370
    lengths = np.concatenate([s.lengths for s in b.splits().values()])
    assert lengths.min() == 7 and lengths.max() == 29
    for s in b.splits().values():
        m = s.mask().numpy()
        assert (m.sum(1) == s.lengths).all() and (s.x[~m] == 0).all()
    assert set(np.unique(b.test.static)) == set(range(9))
    c = S.load_japanese_vowels(crop=20)
    _check_bundle(c, 20, 12, ['speaker'], [])
    n_long = sum(int((s.lengths >= 20).sum()) for s in b.splits().values())
    assert sum(len(s) for s in c.splits().values()) == n_long
    with pytest.raises(ValueError, match='crop must be None'): S.load_japanese_vowels(crop=0)


def test_italy_power_and_basic_motions():
    ipd = S.load_italy_power_demand()
    _check_bundle(ipd, 24, 1, ['season'], [])
    assert len(ipd.train) + len(ipd.val) == 67 and len(ipd.test) == 1029
    tr = np.concatenate([ipd.train.x, ipd.val.x])
    np.testing.assert_allclose(tr.mean((0, 1)), ipd.stats['mean'] * 0, atol=1e-5)  # standardised on training days
    bm = S.load_basic_motions(normalize=False)
    _check_bundle(bm, 100, 6, [], ['activity'])
    assert bm.info.dynamic_classes == [4] and np.bincount(bm.test.dynamic).tolist() == [10, 10, 10, 10]
    assert bm.stats is None and np.abs(bm.test.x).max() > 3     # raw accelerometer values


# TIMIT fixture: RIFF and NIST SPHERE files in the LDC layout
def _wav(path, a, sr=16000):
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), 'wb') as w:
        w.setnchannels(1); w.setsampwidth(2); w.setframerate(sr); w.writeframes((a * 32767).astype('<i2').tobytes())


def _sphere(path, a, sr=16000, coding='pcm'):
    path.parent.mkdir(parents=True, exist_ok=True)
    head = (f'NIST_1A\n   1024\nsample_count -i {len(a)}\nsample_rate -i {sr}\nchannel_count -i 1\n'
            f'sample_n_bytes -i 2\nsample_byte_format -s2 01\nsample_coding -s{len(coding)} {coding}\nend_head\n')
    path.write_bytes(head.encode().ljust(1024, b' ') + (a * 32767).astype('<i2').tobytes())


def _noise(sec, seed):
    return 0.2 * np.random.default_rng(seed).standard_normal(int(16000 * sec))


@pytest.fixture
def timit(tmp_path):
    root = tmp_path / 'timit'
    for i, (split, dr, spk) in enumerate([('train', 'dr1', 'fjsp0'), ('train', 'dr2', 'mrcz0'), ('train', 'dr5', 'fkms0'),
                                          ('train', 'dr8', 'mbma1'), ('test', 'dr3', 'fdac1'), ('test', 'dr7', 'mjsw0')]):
        _wav(root / split / dr / spk / 'si1.wav', _noise(0.43, i))              # 41 frames -> 2 chunks
        _sphere(root / split / dr / spk / 'sx2.wav', _noise(0.25, i + 10))     # 23 frames -> 1 chunk
        _sphere(root / split / dr / spk / 'sa1.wav', _noise(0.5, i + 20))      # SA sentences skipped by default
    return root


def test_timit(timit):
    b = S.load_timit(timit, val_frac=0.25)
    _check_bundle(b, 20, 201, ['speaker', 'sex', 'dialect'], [])
    assert b.info.static_classes == [6, 2, 8]
    assert len(b.train) + len(b.val) == 4 * 3 and len(b.test) == 2 * 3
    assert len(np.unique(b.val.char)) == 1
    # speakers sorted: fdac1 fjsp0 fkms0 mbma1 mjsw0 mrcz0; test speaker fdac1 is female from DR3
    assert b.test.static[b.test.char == 0][0].tolist() == [0, 0, 2]
    assert S.load_timit(timit, include_sa=True, val_frac=0.25).test.x.shape[0] == 2 * (3 + 2)  # SA1: 0.5 s -> 48 frames -> 2 chunks
    # the spectrogram: a windowed frame's rfft magnitude
    a, sr = S.read_wav(timit / 'test/dr3/fdac1/si1.wav')
    assert sr == 16000 and len(a) == int(16000 * 0.43)
    w = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)
    np.testing.assert_allclose(S.magnitude_spectrogram(a)[3], np.abs(np.fft.rfft(a[480:880] * w)), rtol=1e-4, atol=1e-5)


def test_timit_bad_input(timit, tmp_path):
    with pytest.raises(FileNotFoundError, match=r'does not exist; expected <root>/TRAIN/DR1\.\.DR8'):
        S.load_timit(tmp_path / 'nothing')
    with pytest.raises(FileNotFoundError, match='has no TRAIN folder'):
        S.load_timit(timit / 'train')  # the DR folders are not split folders
    _sphere(timit / 'train/dr1/fjsp0/sx9.wav', _noise(0.3, 1), coding='pcm,embedded-shorten-v2.00')
    with pytest.raises(ValueError, match='convert it to PCM WAV first'): S.load_timit(timit)
    (timit / 'train/dr1/fjsp0/sx9.wav').write_bytes(b'garbage' * 40)
    with pytest.raises(ValueError, match='neither a RIFF WAV nor a NIST SPHERE'): S.load_timit(timit)
    _wav(timit / 'train/dr1/fjsp0/sx9.wav', _noise(0.3, 1), sr=8000)
    with pytest.raises(ValueError, match='sample rate 8000; TIMIT is 16000'): S.load_timit(timit)


def _ett(path, hours):
    t0, r = datetime(2016, 7, 1), np.random.default_rng(1)
    with open(path, 'w', newline='') as f:
        w = csv.writer(f); w.writerow(['date', 'HUFL', 'HULL', 'MUFL', 'MULL', 'LUFL', 'LULL', 'OT'])
        for h in range(hours):
            w.writerow([(t0 + timedelta(hours=h)).strftime('%Y-%m-%d %H:%M:%S')] + [f'{v:.3f}' for v in r.normal(5, 2, 7)])


def test_etth1_standard_split(tmp_path):
    _ett(tmp_path / 'ETTh1.csv', 17420)
    b = S.load_etth1(tmp_path, seq_len=96, stride=1)
    assert all(s.x.shape[1:] == (96, 7) for s in b.splits().values())
    assert (len(b.train), len(b.val), len(b.test)) == (8640 - 96 + 1, 2880 + 1, 2880 + 1)
    assert b.train.char[-1] + 96 == 8640 and b.val.char[0] == 8640 - 96 and b.test.char[-1] + 96 == 14400
    # standardised with the training months only
    raw = np.loadtxt(tmp_path / 'ETTh1.csv', delimiter=',', skiprows=1, usecols=range(1, 8))
    np.testing.assert_allclose(b.stats['mean'], raw[:8640].mean(0), rtol=1e-5)
    np.testing.assert_allclose(b.test.x[0, 0], (raw[11520 - 96] - raw[:8640].mean(0)) / raw[:8640].std(0), rtol=1e-4, atol=1e-5)
    assert b.info.static_classes == [12] and b.info.dynamic_classes == [24]
    assert b.train.static[0, 0] == 6 and b.train.dynamic[5] == 5       # July; window starting at 05:00
    x, s, d = b.val[0]
    assert x.shape == (96, 7) and s.shape == (1,) and int(d) == b.val.dynamic[0]


def test_etth1_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match='ETTh1 expects the CSV file'): S.load_etth1(tmp_path)
    _ett(tmp_path / 'ETTh1.csv', 300)
    with pytest.raises(ValueError, match='standard ETTh1 split needs 14400'): S.load_etth1(tmp_path)
    with pytest.raises(ValueError, match='too short for windows of 200'): S.load_etth1(tmp_path, seq_len=200, split=(0.6, 0.2))
    with pytest.raises(ValueError, match='split fractions'): S.load_etth1(tmp_path, split=(0.9, 0.2))
    (tmp_path / 'bad.csv').write_text('date,HUFL,HULL\n2016-07-01 00:00:00,1,2\n')
    with pytest.raises(ValueError, match='must have the header date,HUFL'): S.load_etth1(tmp_path / 'bad.csv')
    lines = (tmp_path / 'ETTh1.csv').read_text().splitlines(); lines[5] = lines[5].replace(',', ',x', 1)
    (tmp_path / 'ETTh1.csv').write_text('\n'.join(lines))
    with pytest.raises(ValueError, match='malformed row'): S.load_etth1(tmp_path, split=(0.6, 0.2))


def _physionet(root, n, s='a'):
    (root / f'set-{s}').mkdir(parents=True)
    outc = ['RecordID,SAPS-I,SOFA,Length_of_stay,Survival,In-hospital_death']
    for k in range(n):
        rid = 140000 + k
        L = ['Time,Parameter,Value', f'00:00,RecordID,{rid}', '00:00,Age,70', f'00:00,Gender,{[0, 1, -1][k % 3]}',
             '00:00,Height,170.2', f'00:00,ICUType,{4 - k % 4}', '00:00,Weight,80', '00:05,HR,80', '00:50,HR,90',
             f'05:12,GCS,{8 + k % 7}', '47:59,Urine,100', '48:00,Urine,300', '12:00,Weight,-1']
        (root / f'set-{s}/{rid}.txt').write_text('\n'.join(L) + '\n')
        outc.append(f'{rid},12,4,9,200,{k % 2}')
    (root / f'Outcomes-{s}.txt').write_text('\n'.join(outc) + '\n')


def test_physionet2012(tmp_path):
    _physionet(tmp_path, 20)
    b = S.load_physionet2012(tmp_path, normalize=False)
    _check_bundle(b, 48, 37, ['icu_type', 'sex', 'in_hospital_death'], [])
    assert (len(b.train), len(b.val), len(b.test)) == (14, 2, 4)
    s = b.train
    V = S.PHYSIONET_VARIABLES
    k = s.char - 140000
    assert (s.static == np.stack([3 - k % 4, k % 3, k % 2], 1)).all()
    hr, gcs, urine, wt = (s.x[:, :, V.index(v)] for v in ('HR', 'GCS', 'Urine', 'Weight'))
    assert (hr == 85).all()                                              # mean in hour 0, carried to the end
    assert (gcs[:, :5] == 0).all() and (gcs[:, 5:] == (8 + k % 7)[:, None]).all()
    assert (urine[:, :47] == 0).all() and (urine[:, 47] == 200).all()   # 47:59 and 48:00 both in the last hour
    assert (wt == 80).all()                                              # -1 at 12:00 is missing, not a value
    m = S.load_physionet2012(tmp_path, with_mask=True)
    assert m.train.x.shape[1:] == (48, 74) and m.info.frame_shape == (74,)
    assert m.train.x[0, :, 37 + V.index('GCS')].sum() == 1


def test_physionet2012_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match='PhysioNet 2012 expects the folder .*set-a.* missing'):
        S.load_physionet2012(tmp_path)
    _physionet(tmp_path, 6)
    rec = tmp_path / 'set-a/140002.txt'
    rec.write_text(rec.read_text() + '01:00,Heartrate,70\n')
    with pytest.raises(ValueError, match="unknown parameter 'Heartrate'"): S.load_physionet2012(tmp_path)
    rec.write_text('time;parameter;value\n')
    with pytest.raises(ValueError, match='must start with the header Time,Parameter,Value'): S.load_physionet2012(tmp_path)
    rec.unlink()
    (tmp_path / 'Outcomes-a.txt').write_text('RecordID,In-hospital_death\n140000,0\n')
    with pytest.raises(ValueError, match='has no line in the Outcomes file'): S.load_physionet2012(tmp_path)
