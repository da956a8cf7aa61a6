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
    assert len(fig.axes) == 3 * 8
    plt.close(fig)
    fig = show_sequences(torch.rand(2, 5, 7), n=2)  # features over time: one line plot per sequence
    assert len(fig.axes) == 2
    plt.close(fig)
    with pytest.raises(TypeError, match='x must be a SeqSplit'): show_sequences([1, 2, 3])
