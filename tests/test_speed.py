"""The fast DBSE path (DBSEConfig.fast, 03a_speed) against the plain path: the same function, parameters and keys."""
import copy, json, subprocess, sys
from pathlib import Path

import pytest
import torch
from torch import nn

from seqdis_nb.dbse import DBSE, DBSEConfig, ConvFrameDecoder, ConvFrameEncoder
from seqdis_nb.speed import conv_decode, conv_encode, prior_lstm

ROOT = Path(__file__).resolve().parents[1]


def twins(preset='shapes-quick', **kw):
    "A fast and a plain DBSE with the same weights (and a check that a seed gives them the same init)."
    torch.manual_seed(0)
    fast = DBSE(DBSEConfig.preset(preset, fast=True, **kw))
    torch.manual_seed(0)
    plain = DBSE(DBSEConfig.preset(preset, fast=False, **kw))
    for (k, a), (_, b) in zip(fast.state_dict().items(), plain.state_dict().items()): assert torch.equal(a, b), k
    return fast, plain


def step(m, x, seed=1):
    "Loss terms and gradients of one training_loss backward with a fixed posterior noise."
    m.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss, terms = m.training_loss(x)
    up = torch.randn((), generator=torch.Generator().manual_seed(seed)).abs() + 0.5   # not all-ones upstream
    (loss * up).backward()
    return terms, {k: p.grad.clone() for k, p in m.named_parameters()}


def assert_same_step(fast, plain, x, tol=2e-5):
    (tf, gf), (tp, gp) = step(fast, x), step(plain, x)
    for k in tp: torch.testing.assert_close(tf[k], tp[k], rtol=tol, atol=tol * float(tp[k].abs()) + 1e-7)
    # biases right before a train-mode BatchNorm have a zero gradient up to rounding: compare on one global scale
    scale = max(float(g.abs().max()) for g in gp.values())
    worst = max(float((gf[k] - gp[k]).abs().max()) for k in gp)
    assert worst <= tol * scale, f'max |grad fast - grad plain| = {worst:.3g}, max |grad| = {scale:.3g}'
    for k, v in plain.state_dict().items():     # BatchNorm running statistics and counters
        torch.testing.assert_close(fast.state_dict()[k], v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('mode', ['train', 'eval'])
@pytest.mark.parametrize('preset,shape', [('shapes-quick', (3, 5, 3, 32, 32)), ('audio-quick', (3, 7, 12)),
                                          ('series', (2, 6, 10))])
def test_fast_equals_plain(preset, shape, mode):
    fast, plain = twins(preset)
    fast.train(mode == 'train'); plain.train(mode == 'train')
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(2))
    assert_same_step(fast, plain, x)
    assert_same_step(fast, plain, x)            # a second step: running statistics updated twice per step


def test_fast_equals_plain_irregular_conv():
    "A 16x16 conv model (two stride-2 blocks), odd widths, T=3."
    cfg = dict(image_size=16, nf=5, g_dim=11, rnn_dim=7, f_dim=6, z_dim=3)
    torch.manual_seed(0); fast = DBSE(DBSEConfig(fast=True, **cfg))
    plain = DBSE(DBSEConfig(fast=False, **cfg)); plain.load_state_dict(fast.state_dict())
    assert_same_step(fast, plain, torch.rand(2, 3, 3, 16, 16, generator=torch.Generator().manual_seed(4)))


def test_generation_protocol_same():
    fast, plain = twins()
    x = torch.rand(4, 8, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    g = lambda: torch.Generator().manual_seed(6)
    for name in ('sample', 'swap', 'fix_static_sample_dynamics', 'fix_dynamics_sample_static'):
        args = {'sample': (4,), 'swap': (x, x.flip(0))}.get(name, (x,))
        a, b = getattr(fast, name)(*args, generator=g()), getattr(plain, name)(*args, generator=g())
        for u, v in zip(a if isinstance(a, tuple) else [a], b if isinstance(b, tuple) else [b]):
            torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5)
    assert fast.training and plain.training


def test_sprites_parameters_and_keys():
    "The Sprites preset on the fast path: the authors' 14,900,163 parameters, the plain path's keys and shapes."
    fast, plain = DBSE(DBSEConfig.preset('sprites', fast=True)), DBSE(DBSEConfig.preset('sprites', fast=False))
    n = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert n(fast) == n(plain) == 14_900_163
    sf, sp = fast.state_dict(), plain.state_dict()
    assert list(sf) == list(sp)
    assert all(sf[k].shape == sp[k].shape and sf[k].dtype == sp[k].dtype for k in sp)


def test_checkpoint_across_paths(tmp_path):
    "A state_dict saved by one path loads into the other (weights_only) and gives the same outputs."
    fast, plain = twins()
    torch.save(fast.state_dict(), tmp_path / 'f.pt')
    other = DBSE(DBSEConfig.preset('shapes-quick', fast=False))
    other.load_state_dict(torch.load(tmp_path / 'f.pt', weights_only=True))
    torch.save(other.state_dict(), tmp_path / 'p.pt')
    back = DBSE(DBSEConfig.preset('shapes-quick', fast=True))
    back.load_state_dict(torch.load(tmp_path / 'p.pt', weights_only=True))
    assert back.decoder.upc2.main[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    for m in (back, other, fast): m.eval()
    g = lambda: torch.Generator().manual_seed(8)
    torch.testing.assert_close(back.encode(x, g()).d, other.encode(x, g()).d, rtol=1e-4, atol=1e-5)


def test_config_fast_flag():
    assert DBSEConfig.preset('sprites').fast is True
    assert DBSEConfig.from_dict(DBSEConfig.preset('sprites', fast=False).to_dict()).fast is False
    d = DBSEConfig.preset('sprites').to_dict(); d.pop('fast')
    assert DBSEConfig.from_dict(d).fast is True                # checkpoints written before the flag existed
    with pytest.raises(TypeError, match='fast must be a bool'): DBSEConfig(fast=1)


def test_conv_decode_like_module():
    "conv_decode against the module in train mode, twice (running statistics), and in eval mode."
    torch.manual_seed(0)
    dec = ConvFrameDecoder(9, 3, 16, 4)
    ref = copy.deepcopy(dec)
    for mode in (True, True, False):
        dec.train(mode); ref.train(mode)
        c = torch.randn(5, 9)
        torch.testing.assert_close(conv_decode(dec, c), ref(c), rtol=1e-5, atol=1e-6)
    for (k, a), (_, b) in zip(dec.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=k)


def test_conv_encode_gradients():
    torch.manual_seed(0)
    enc = ConvFrameEncoder(7, 3, 16, 4); ref = copy.deepcopy(enc)
    x = torch.rand(5, 3, 16, 16)
    up = torch.randn(5, 7)
    ga = torch.autograd.grad((conv_encode(enc, x) * up).sum(), list(enc.parameters()))
    gb = torch.autograd.grad((ref(x) * up).sum(), list(ref.parameters()))
    scale = max(float(g.abs().max()) for g in gb)
    assert max(float((a - b).abs().max()) for a, b in zip(ga, gb)) <= 1e-5 * scale


def test_prior_lstm_gradients_and_errors():
    torch.manual_seed(0)
    c1, c2 = nn.LSTMCell(4, 6), nn.LSTMCell(6, 6)
    d = torch.randn(3, 5, 4, requires_grad=True)
    def loop(d):
        h1 = s1 = h2 = s2 = torch.zeros(3, 6); prev, hs = torch.zeros(3, 4), []
        for t in range(d.shape[1]):
            h1, s1 = c1(prev, (h1, s1)); h2, s2 = c2(h1, (h2, s2)); hs.append(h2); prev = d[:, t]
        return torch.stack(hs, 1)
    up = torch.randn(3, 5, 6)
    params = [d, *c1.parameters(), *c2.parameters()]
    for a, b in zip(torch.autograd.grad((prior_lstm(c1, c2, d) * up).sum(), params),
                    torch.autograd.grad((loop(d) * up).sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match='hidden size'): prior_lstm(c1, nn.LSTMCell(5, 6), d)


def test_bench_smoke(tmp_path):
    out = tmp_path / 'rows.json'
    r = subprocess.run([sys.executable, str(ROOT / 'bench' / 'train_step.py'), '--smoke', '--json', str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert 'SMOKE RUN' in r.stdout and '| shapes-quick | fast |' in r.stdout
    rows = json.loads(out.read_text())
    assert [row['variant'] for row in rows] == ['plain', 'fast']
    for row in rows:
        assert row['s_per_step'] > 0 and row['gflops'] > 0 and row['peak_rss_mb'] > 50
    assert rows[0]['speedup'] == 1.0


@pytest.mark.parametrize('transposed', [False, True])
@pytest.mark.parametrize('chunk', [1 << 22, 200])          # one chunk; several chunks of the batch
def test_conv4x4s2_gemm(transposed, chunk, monkeypatch):
    import seqdis_nb.speed as S
    monkeypatch.setattr(S, '_IM2COL_FLOATS', chunk)
    torch.manual_seed(3)
    m = (nn.ConvTranspose2d if transposed else nn.Conv2d)(5, 3, 4, 2, 1)
    s = 3 if transposed else 6                              # odd maps: H, W not powers of two
    x = torch.randn(4, 5, s, s, requires_grad=True)
    y = m(x); up = torch.randn_like(y)
    got = S.conv4x4s2_gemm(m, x)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, y, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(got, [x, m.weight, m.bias], up), torch.autograd.grad(y, [x, m.weight, m.bias], up)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    m64, x64 = copy.deepcopy(m).double(), x.detach().double().requires_grad_()
    fn = S.ConvT4x4s2GEMM if transposed else S.Conv4x4s2GEMM
    assert torch.autograd.gradcheck(fn.apply, (x64, m64.weight, m64.bias))
    with pytest.raises(ValueError, match='4x4 stride-2'): S.conv4x4s2_gemm(nn.Conv2d(5, 3, 4, 1, 1), x)


def test_bench_profile_smoke():
    r = subprocess.run([sys.executable, str(ROOT / 'bench' / 'train_step.py'), '--smoke', '--profile'],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert 'shapes-quick / fast: one step' in r.stdout and 'aten::' in r.stdout
