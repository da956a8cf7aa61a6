"The latent explorer: plain functions against the model's own operations, and the widget's callbacks (no browser)."
import io

import numpy as np
import pytest
import torch
from PIL import Image

from seqdis_nb.data import make_shapes
from seqdis_nb.dbse import DBSE, DBSEConfig
from seqdis_nb.explorer import (Explorer, explore_frames, explore_path, mix_codes, pair_codes, prior_draw,
                                render_strip, to_png)

TINY = dict(image_size=16, nf=8, g_dim=16, rnn_dim=8, f_dim=8, z_dim=4)

pytestmark = pytest.mark.usefixtures('one_thread')   # tests/conftest.py


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    m = DBSE(DBSEConfig(**TINY))
    for mod in m.modules():                     # larger weights than the authors' init: outputs differ visibly
        if mod is not m and hasattr(mod, 'reset_parameters'): mod.reset_parameters()
    return m.eval()

def gen(seed): return torch.Generator().manual_seed(seed)

def pair(shapes, i=0, j=9):
    x, _, _ = shapes.test.batch([i, j])
    return x[0], x[1]

@pytest.mark.parametrize('seed', [0, 5])
def test_ends_are_swaps(model, shapes, seed):
    x_a, x_b = pair(shapes)
    with torch.no_grad(): sw = model.swap(x_a[None], x_b[None], generator=gen(seed))
    assert torch.equal(explore_frames(model, x_a, x_b, 1.0, 'static', seed=seed), sw.sb_da[0])
    assert torch.equal(explore_frames(model, x_a, x_b, 1.0, 'dynamics', seed=seed), sw.sa_db[0])
    assert not torch.equal(sw.sb_da, sw.sa_db)

@pytest.mark.parametrize('mode', ['static', 'dynamics'])
@pytest.mark.parametrize('alpha', [0.0, 0.3, 1.0])
def test_interpolation_holds_the_other_factor(model, shapes, mode, alpha):
    x_a, x_b = pair(shapes)
    c = pair_codes(model, x_a, x_b, seed=1)
    s, d = mix_codes(c, alpha, mode)
    if mode == 'static':
        assert torch.equal(d, c.d_a)
        torch.testing.assert_close(s, (1 - alpha) * c.s_a + alpha * c.s_b)
    else:
        assert torch.equal(s, c.s_a)
        torch.testing.assert_close(d, (1 - alpha) * c.d_a + alpha * c.d_b)
    with torch.no_grad(): want = model.decode(s, d)[0]
    assert torch.equal(explore_frames(model, x_a, x_b, alpha, mode, seed=1), want)

def test_frames_move_with_alpha(model, shapes):
    x_a, x_b = pair(shapes)
    alphas = (0, 0.25, 0.5, 1)
    for mode in ('static', 'dynamics'):
        path = explore_path(model, x_a, x_b, alphas=alphas, mode=mode)
        assert path.shape == (4, 8, 3, 16, 16)
        dist = [(p - path[0]).abs().sum().item() for p in path[1:]]
        assert 0 < dist[0] < dist[1] < dist[2], (mode, dist)     # further along the slider, further from a
        for k, a in enumerate(alphas): assert torch.equal(path[k], explore_frames(model, x_a, x_b, a, mode))

def test_resample_is_a_seeded_prior_draw(model, shapes):
    x_a, _ = pair(shapes)
    c = pair_codes(model, x_a, seed=0)
    with torch.no_grad():
        want_s = model.decode(torch.randn(1, 8, generator=gen(3)), c.d_a)[0]
        roll = model.prior_rollout(1, 8, gen(3))
        want_d, want_dm = model.decode(c.s_a, roll.d)[0], model.decode(c.s_a, roll.mean)[0]
    assert torch.equal(explore_frames(model, x_a, alpha=1, mode='static', resample_seed=3), want_s)
    assert torch.equal(explore_frames(model, x_a, alpha=1, mode='dynamics', resample_seed=3), want_d)
    assert torch.equal(explore_frames(model, x_a, alpha=1, mode='dynamics', resample_seed=3, prior_means=True),
                       want_dm)
    a, b = (explore_frames(model, x_a, alpha=1, resample_seed=s) for s in (3, 4))
    assert not torch.equal(a, b)
    assert torch.equal(prior_draw(model, c, 'static', 3).d_b, c.d_b)

def test_rng_and_mode_untouched(model, shapes):
    x_a, x_b = pair(shapes)
    model.train()
    try:
        state = torch.random.get_rng_state()
        explore_path(model, x_a, x_b, mode='dynamics', resample_seed=2)
        assert torch.equal(torch.random.get_rng_state(), state)
        assert model.training
    finally: model.eval()
    out = explore_frames(model, x_a, x_b, 0.5)
    assert out.is_inference() and not out.requires_grad

def test_sequence_models():
    torch.manual_seed(0)
    m = DBSE('series').eval()
    xa, xb = torch.randn(12, 10), torch.randn(1, 12, 10)      # (T, F) and a batch of one (1, T, F)
    out = explore_frames(m, xa, xb, 0.5, 'dynamics')
    assert out.shape == (12, 10)
    with torch.no_grad(): sw = m.swap(xa[None], xb, generator=gen(0))
    assert torch.equal(explore_frames(m, xa, xb, 1.0, 'dynamics'), sw.sa_db[0])
    with pytest.raises(ValueError, match='Explorer shows video'): Explorer(m, torch.randn(3, 12, 10))

@pytest.mark.parametrize('kw, exc, msg', [
    (dict(alpha=-0.1), ValueError, 'alpha must be a number in'),
    (dict(alpha=True), ValueError, 'alpha must be a number in'),
    (dict(alpha='0.5'), ValueError, 'alpha must be a number in'),
    (dict(mode='both'), ValueError, 'mode must be one of'),
    (dict(seed=1.5), ValueError, 'seed must be a non-negative int'),
    (dict(resample_seed=-2), ValueError, 'seed must be a non-negative int'),
    (dict(x_b=None), ValueError, 'x_b is required unless resample_seed'),
    (dict(x_b='frames'), TypeError, 'x_b must be a torch.Tensor'),
])
def test_bad_arguments(model, shapes, kw, exc, msg):
    x_a, x_b = pair(shapes)
    args = dict(x_b=x_b, alpha=0.5, mode='static', seed=0, resample_seed=None) | kw
    with pytest.raises(exc, match=msg): explore_frames(model, x_a, **args)

@pytest.mark.parametrize('bad, exc, msg', [
    (lambda x: x[:, :, :8], ValueError, 'frames must be 16x16'),
    (lambda x: x[None, None], ValueError, 'must be one sequence'),
    (lambda x: x[:1], ValueError, 'at least 2 steps'),
    (lambda x: (x * 255).to(torch.uint8), TypeError, 'x_a must have a dtype'),
    (lambda x: x.masked_fill(torch.zeros_like(x, dtype=torch.bool).index_fill_(0, torch.tensor([2]), True),
                             float('nan')), ValueError, 'NaN'),
])
def test_bad_sequences(model, shapes, bad, exc, msg):
    x_a, x_b = pair(shapes)
    with pytest.raises(exc, match=msg): explore_frames(model, bad(x_a), None, 1.0, resample_seed=0)

def test_render_strip_layout():
    fr = torch.rand(2, 3, 3, 4, 5)                          # (K, T, C, H, W)
    img = render_strip(fr, scale=2, gap=1)
    assert img.shape == (2 * 9 - 1, 3 * 11 - 1, 3) and img.dtype == np.uint8
    want = (fr[1, 2].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy().repeat(2, 0).repeat(2, 1)
    np.testing.assert_array_equal(img[9:17, 22:32], want)   # row 1, frame 2
    assert (img[8] == 255).all() and (img[:, 10] == 255).all()
    grey = render_strip(torch.rand(4, 1, 6, 6))
    assert grey.shape == (6, 4 * 8 - 2, 1)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(to_png(grey)))), grey[..., 0])
    for bad in (torch.rand(3, 2, 4, 4), torch.rand(3, 3, 4)):
        with pytest.raises(ValueError, match='frames must be video'): render_strip(bad)
    with pytest.raises(ValueError, match='scale must be an int >= 1'): render_strip(fr, scale=0)
    with pytest.raises(ValueError, match='img must be uint8'): to_png(img.astype(np.float32))

def expected(ex):
    want = explore_frames(ex.model, ex.x_a, ex.x_b, ex.alpha.value, ex.mode.value, ex.encode_seed, ex.resample_seed,
                          ex.prior_means)
    strip = to_png(render_strip(torch.stack([ex.x_a, ex.x_b, want]), ex.scale))
    movie = to_png(render_strip(want[ex.frame.value:ex.frame.value + 1], 2 * ex.scale))
    return want, strip, movie

def assert_shows(ex):
    want, strip, movie = expected(ex)
    assert torch.equal(ex.frames, want)
    assert ex.strip.value == strip and ex.movie.value == movie

def test_widget_callbacks(model, shapes):
    ex = Explorer(model, shapes.test, a=2, b=4, mode='dynamics', alpha=0.25, seed=20, encode_seed=3, scale=1)
    assert_shows(ex)
    x_a, x_b = pair(shapes, 2, 4)
    assert torch.equal(ex.frames, explore_frames(model, x_a, x_b, 0.25, 'dynamics', seed=3))
    seen = [ex.strip.value]
    for a in (0.0, 0.5, 1.0):
        ex.alpha.value = a; assert_shows(ex); seen.append(ex.strip.value)
    assert len(set(seen)) == len(seen)                     # each slider value redraws a different picture
    ex.mode.value = 'static'; assert_shows(ex)
    ex.index_a.value = 7; assert_shows(ex)
    assert torch.equal(ex.x_a, shapes.test.batch([7])[0][0])
    ex.resample.click(); assert ex.resample_seed == 20 and ex.seed.value == 21; assert_shows(ex)
    first = ex.frames
    ex.resample.click(); assert ex.resample_seed == 21; assert_shows(ex)
    assert not torch.equal(first, ex.frames)               # a new seed, a new draw
    ex.seed.value = 20; ex.resample.click(); assert torch.equal(ex.frames, first)   # the same seed again
    ex.index_b.value = 1; assert ex.resample_seed == 20; assert_shows(ex)          # b changes, the draw stays
    ex.use_b.click(); assert ex.resample_seed is None; assert_shows(ex)
    for t in (3, 7, 0):
        ex.play.value = t; assert ex.frame.value == t; assert_shows(ex)
    ex.frame.value = 6; assert ex.play.value == 6
    assert 'application/vnd.jupyter.widget-view+json' in ex._repr_mimebundle_()   # displays as a live widget

def test_widget_on_a_tensor_and_bad_arguments(model, shapes):
    x = shapes.test.batch(range(5))[0]                     # (5, T, C, H, W) float
    ex = Explorer(model, x, a=1, b=3)
    assert torch.equal(ex.frames, explore_frames(model, x[1], x[3], 0.5, 'static'))
    assert 'a #1' in ex.status.value
    for kw, msg in ((dict(b=5), 'b must be an index in'), (dict(alpha=2), 'alpha must be a number'),
                    (dict(mode='x'), 'mode must be one of'), (dict(fps=0), 'fps must be an int')):
        with pytest.raises(ValueError, match=msg): Explorer(model, x, **kw)
    with pytest.raises(ValueError, match='data must have 5 dimensions'): Explorer(model, x[0])
