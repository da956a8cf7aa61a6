"""SPYL (nbs/07_spyl.ipynb): the authors' layout, the MWS mutual information, InfoNCE, training, the shared API."""
import io, json, math
from pathlib import Path

import pytest
import torch
import torch.distributions as D

from seqdis_nb.dbse import DBSE, Posterior
from seqdis_nb.spyl import (SPYL, SPYL_PRESETS, SPYLConfig, hardest_negatives, info_nce, mws_mutual_info,
                            pairwise_gauss_kl)

FIXTURES = Path(__file__).parent / 'fixtures'


pytestmark = pytest.mark.usefixtures('one_thread')   # tests/conftest.py


def gen(seed=0): return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- the authors' model
def test_sprites_parameter_count():
    m = SPYL('sprites')
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == 11_031_683


def test_state_dict_keys_order_and_shapes_equal_the_interop_listing():
    want = json.loads((FIXTURES / 'spyl_sprites_state_dict.json').read_text())['state_dict']
    sd = SPYL('sprites').state_dict()
    assert list(sd) == list(want)
    assert {k: list(v.shape) for k, v in sd.items()} == want


def test_state_dict_round_trip_through_weights_only_load():
    m = SPYL('shapes-quick')
    buf = io.BytesIO(); torch.save({'config': m.config.to_dict(), 'model': m.state_dict()}, buf); buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    m2 = SPYL(SPYLConfig.from_dict(ck['config'])); m2.load_state_dict(ck['model'])
    x = torch.rand(2, 8, 3, 32, 32)
    m.eval(); m2.eval()
    torch.testing.assert_close(m2.encode(x).s_mean, m.encode(x).s_mean)


def test_generic_protocol_is_dbses():
    for name in ('encode', 'decode', 'sample', 'swap', 'fix_static_sample_dynamics', 'fix_dynamics_sample_static',
                 'validate_input', 'prior_rollout'):
        assert getattr(SPYL, name) is getattr(DBSE, name), name
    assert SPYL.kind == 'spyl' and SPYL.config_class is SPYLConfig


# ---------------------------------------------------------------- MI
def mi_brute(s, s_mean, s_logvar, d, d_mean, d_logvar, N):
    "Loops over samples i, frames t and batch members j, with torch.distributions densities."
    B, T = d.shape[:2]
    out = []
    for i in range(B):
        for t in range(T):
            ls = [D.Normal(s_mean[j], (0.5 * s_logvar[j]).exp()).log_prob(s[i]).sum() for j in range(B)]
            ld = [D.Normal(d_mean[j, t], (0.5 * d_logvar[j, t]).exp()).log_prob(d[i, t]).sum() for j in range(B)]
            c = math.log(B * N)
            joint = torch.stack([a + b for a, b in zip(ls, ld)]).logsumexp(0) - c
            qs, qd = torch.stack(ls).logsumexp(0) - c, torch.stack(ld).logsumexp(0) - c
            out.append(torch.relu(joint - qs - qd))
    return torch.stack(out).mean()


@pytest.mark.parametrize('B,T,f,z,N', [(4, 3, 5, 2, 1000), (3, 2, 1, 3, 3), (6, 4, 2, 2, 60000)])
def test_mi_equals_brute_force(B, T, f, z, N):
    g = gen(B * T)
    s_mean, d_mean = torch.randn(B, f, generator=g), torch.randn(B, T, z, generator=g)
    s_logvar, d_logvar = torch.randn(B, f, generator=g) * .5, torch.randn(B, T, z, generator=g) * .5
    s = s_mean + (0.5 * s_logvar).exp() * torch.randn(B, f, generator=g)
    d = d_mean + (0.5 * d_logvar).exp() * torch.randn(B, T, z, generator=g)
    args = (s.double(), s_mean.double(), s_logvar.double(), d.double(), d_mean.double(), d_logvar.double())
    got, want = mws_mutual_info(*args, n_data=N), mi_brute(*args, N)
    assert got > 0
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_model_mi_term_uses_n_data_and_defaults_to_the_batch():
    torch.manual_seed(0)
    m = SPYL('shapes-quick'); x = torch.rand(4, 8, 3, 32, 32)
    out = m(x)
    args = (out.s, out.s_mean, out.s_logvar, out.d, out.d_mean, out.d_logvar)
    torch.testing.assert_close(m.loss_terms(x, out, n_data=500)['mi'], mws_mutual_info(*args, 500))
    torch.testing.assert_close(m.loss_terms(x, out)['mi'], mws_mutual_info(*args, 4))


# ---------------------------------------------------------------- InfoNCE and negatives
def test_info_nce_equals_a_hand_computation():
    g = gen(1)
    B, k, Dm, tau = 3, 4, 5, 0.5
    a, p, n = torch.randn(B, Dm, generator=g), torch.randn(B, Dm, generator=g), torch.randn(B, k, Dm, generator=g)
    cos = lambda u, v: float(u @ v) / (float(u.norm()) * float(v.norm()))
    want = 0.0
    for i in range(B):
        num = math.exp(cos(a[i], p[i]) / tau)
        den = num + sum(math.exp(cos(a[i], n[i, j]) / tau) for j in range(k))
        want += -math.log(num / den) / B
    assert abs(info_nce(a, p, n, tau).item() - want) < 1e-5
    # scale-invariant (cosine), and a better-aligned positive gives a lower loss
    assert abs(info_nce(3 * a, 0.1 * p, 7 * n, tau).item() - want) < 1e-5
    assert info_nce(a, a, n, tau) < info_nce(a, p, n, tau)


def test_hardest_negatives_are_the_largest_kl_bank_items():
    g = gen(2)
    B, M, Dm, k = 3, 10, 4, 4
    mean, logvar = torch.randn(B, Dm, generator=g), torch.randn(B, Dm, generator=g) * .3
    bm, blv = torch.randn(M, Dm, generator=g), torch.randn(M, Dm, generator=g) * .3
    kl = pairwise_gauss_kl(mean, logvar, bm, blv)
    for i in range(B):
        for j in range(M):
            q = D.Normal(mean[i], (0.5 * logvar[i]).exp()); p = D.Normal(bm[j], (0.5 * blv[j]).exp())
            assert abs(kl[i, j].item() - D.kl_divergence(q, p).sum().item()) < 1e-4
    neg = hardest_negatives(mean, logvar, bm, blv, k)
    assert neg.shape == (B, k, Dm)
    for i in range(B):
        top = kl[i].argsort(descending=True)[:k]
        torch.testing.assert_close(neg[i], bm[top])
    assert hardest_negatives(mean, logvar, bm, blv, 256).shape == (B, M, Dm)   # fewer items than k: all of them


def test_contrastive_terms_off_before_the_start_epoch_and_views_not_built(monkeypatch):
    torch.manual_seed(0)
    m = SPYL(SPYLConfig.preset('shapes-quick', nce_start_epoch=3)); x = torch.rand(4, 8, 3, 32, 32)
    def boom(*a, **k): raise AssertionError('views built before nce_start_epoch')
    with monkeypatch.context() as mp:
        mp.setattr(SPYL, 'contrastive_terms', boom)
        _, parts = m.training_loss(x, epoch=2, n_data=100)
    assert parts['nce_s'] == 0 and parts['nce_d'] == 0
    _, parts = m.training_loss(x, epoch=3, n_data=100)
    assert parts['nce_s'] > 0 and parts['nce_d'] > 0
    assert set(parts) == {'recon', 'kl_s', 'kl_d', 'mi', 'nce_s', 'nce_d'}


def test_view_bank_has_no_gradient_and_views_do(monkeypatch):
    torch.manual_seed(0)
    m = SPYL(SPYLConfig.preset('shapes-quick', bank_factor=2, n_neg=5)); x = torch.rand(3, 8, 3, 32, 32)
    bank = m.view_bank(6, 8)
    assert [tuple(t.shape) for t in bank] == [(6, 32), (6, 32), (6, 8), (6, 8)]
    assert not any(t.requires_grad for t in bank)
    seen = {}
    orig = hardest_negatives
    import seqdis_nb.spyl as S
    def spy(mean, logvar, bank_mean, bank_logvar, k):
        seen.setdefault('sizes', []).append((bank_mean.shape[0], k)); return orig(mean, logvar, bank_mean, bank_logvar, k)
    monkeypatch.setattr(S, 'hardest_negatives', spy)
    nce_s, nce_d = m.contrastive_terms(m(x))
    assert seen['sizes'] == [(6, 5), (6, 5)]                        # bank of bank_factor * B, n_neg per anchor
    nce_s.backward()
    assert m.decoder.upc1[0].weight.grad.abs().sum() > 0           # through the static positive view
    assert m.d_prior_mean.weight.grad.abs().sum() > 0              # its dynamics come from the prior rollout


# ---------------------------------------------------------------- training
def test_a_few_steps_lower_the_loss():
    torch.manual_seed(0)
    m = SPYL(SPYLConfig.preset('shapes-quick', nce_start_epoch=0))
    opt = torch.optim.Adam(m.parameters(), lr=m.config.lr)
    x = torch.zeros(8, 8, 3, 32, 32)
    for i in range(8):                                             # squares moving right: colour, row per sequence
        for t in range(8): x[i, t, i % 3, 8 + i:16 + i, 2 * t:2 * t + 8] = 1
    losses = []
    for _ in range(6):
        loss, parts = m.training_loss(x, epoch=0, n_data=1000)
        opt.zero_grad(); loss.backward(); opt.step(); losses.append(loss.item())
        assert all(torch.isfinite(v) for v in parts.values())
    assert losses[-1] < 0.9 * losses[0], losses


# ---------------------------------------------------------------- the shared API
@pytest.mark.parametrize('name', ['shapes-quick', 'audio-quick', 'series'])
def test_encode_fields_and_generation_shapes(name):
    torch.manual_seed(0)
    m = SPYL(name); c = m.config
    x = torch.rand(3, 6, *c.frame_shape)
    post = m.encode(x, generator=gen())
    assert isinstance(post, Posterior) and post._fields == ('s_mean', 's_logvar', 's', 'd_mean', 'd_logvar', 'd')
    assert [tuple(t.shape) for t in post] == [(3, c.f_dim)] * 3 + [(3, 6, c.z_dim)] * 3
    assert m.decode(post.s, post.d).shape == x.shape
    assert m.sample(2, generator=gen()).shape == (2, c.seq_len, *c.frame_shape)
    assert m.sample(2, T=4, generator=gen(), prior_means=True).shape == (2, 4, *c.frame_shape)
    sw = m.swap(x, x.flip(0), generator=gen())
    assert sw._fields == ('sa_db', 'sb_da') and all(t.shape == x.shape for t in sw)
    assert m.fix_static_sample_dynamics(x, generator=gen()).shape == x.shape
    assert m.fix_static_sample_dynamics(x, generator=gen(), prior_means=True).shape == x.shape
    assert m.fix_dynamics_sample_static(x, generator=gen()).shape == x.shape
    assert m.prior_rollout(2, 5, generator=gen()).d.shape == (2, 5, c.z_dim)
    assert m.training


def test_generation_is_reproducible_and_leaves_the_global_rng_alone():
    m = SPYL('shapes-quick'); x = torch.rand(2, 8, 3, 32, 32)
    state = torch.get_rng_state()
    a = m.fix_static_sample_dynamics(x, generator=gen(5)); b = m.fix_static_sample_dynamics(x, generator=gen(5))
    s1, s2 = m.sample(3, generator=gen(7)), m.sample(3, generator=gen(7))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and torch.equal(s1, s2)
    assert not torch.equal(m.sample(3, generator=gen(8)), s1)


def test_static_code_reads_the_whole_sequence():
    torch.manual_seed(0)
    m = SPYL('shapes-quick').eval()
    x = torch.rand(2, 8, 3, 32, 32); y = x.clone(); y[:, -1] = torch.rand(2, 3, 32, 32)
    with torch.no_grad(): assert (m.encode(x).s_mean - m.encode(y).s_mean).abs().max() > 0


@pytest.mark.parametrize('make,exc,msg', [
    (lambda m: m(torch.rand(2, 3, 32, 32)), ValueError, 'must have 5 dimensions'),
    (lambda m: m(torch.rand(2, 1, 3, 32, 32)), ValueError, 'at least 2 steps'),
    (lambda m: m(torch.rand(2, 8, 1, 32, 32)), ValueError, 'must have 3 channels'),
    (lambda m: m(torch.rand(2, 8, 3, 16, 16)), ValueError, 'must be 32x32'),
    (lambda m: m(torch.full((2, 8, 3, 32, 32), float('inf'))), ValueError, 'NaN/Inf'),
    (lambda m: m(torch.zeros(2, 8, 3, 32, 32, dtype=torch.long)), TypeError, 'dtype'),
    (lambda m: m([[0.]]), TypeError, 'must be a torch.Tensor'),
    (lambda m: m.decode(torch.zeros(2, 32), torch.zeros(2, 8, 9)), ValueError, 'd must have size 8'),
    (lambda m: m.decode(torch.zeros(2, 32), torch.zeros(3, 8, 8)), ValueError, 'share the batch size'),
    (lambda m: m.swap(torch.rand(2, 8, 3, 32, 32), torch.rand(3, 8, 3, 32, 32)), ValueError, 'same shape'),
    (lambda m: m.sample(2, T=0), ValueError, 'T must be an int'),
    (lambda m: m.training_loss(torch.rand(2, 8, 3, 32, 32), epoch=1.5), ValueError, 'epoch must be'),
    (lambda m: m.training_loss(torch.rand(2, 8, 3, 32, 32), n_data=-3), ValueError, 'n_data must be'),
])
def test_bad_input_is_a_clear_error(make, exc, msg):
    m = SPYL('shapes-quick')
    with pytest.raises(exc, match=msg): make(m)


@pytest.mark.parametrize('kw,msg', [(dict(encoder='gru'), 'encoder must be'), (dict(tau=-1.), 'tau must be'),
                                    (dict(n_neg=0), 'n_neg must be'), (dict(w_mi=-1), 'w_mi must be'),
                                    (dict(encoder='mlp'), 'features must be'), (dict(nce_start_epoch=True), 'nce_start')])
def test_bad_config_is_a_clear_error(kw, msg):
    with pytest.raises(ValueError, match=msg): SPYLConfig(**kw)


def test_presets_build_and_round_trip():
    assert set(SPYL_PRESETS) >= {'sprites', 'sprites-cpu', 'shapes', 'shapes-quick', 'audio-quick', 'series'}
    for name in SPYL_PRESETS:
        cfg = SPYLConfig.preset(name)
        assert SPYLConfig.from_dict(cfg.to_dict()) == cfg and cfg.name == name
    with pytest.raises(ValueError, match='unknown SPYL preset'): SPYLConfig.preset('sprite')
    with pytest.raises(TypeError, match='config must be'): SPYL(1.0)


def test_bench_smoke(capsys):
    "bench/spyl_step.py --smoke, in-process (the script's main)."
    import runpy
    bench = runpy.run_path(str(Path(__file__).resolve().parents[1] / 'bench' / 'spyl_step.py'))
    assert bench['main'](['--smoke']) == 0
    out = capsys.readouterr().out
    assert 'load average' in out and 'shapes-quick' in out and '+views/DBSE' in out, out


# ---------------------------------------------------------------- the trainer and the evaluation, unchanged
def test_trainer_runs_spyl_with_the_views(tmp_path):
    "In-process: the trainer passes epoch and n_data; with nce_start_epoch=1 the second epoch trains on the views."
    from seqdis_nb.data import make_shapes
    from seqdis_nb.train import Trainer, build_model, load_model
    torch.manual_seed(0)
    m = build_model('spyl', 'shapes-quick', image_size=16, nce_start_epoch=1)
    assert isinstance(m, SPYL)
    t = Trainer(m, make_shapes(size=16), tmp_path, batch_size=8, steps_per_epoch=2, val_batches=1, device='cpu',
                progress=False)
    t.fit(2)
    ep = json.loads((tmp_path / 'metrics.json').read_text())['epochs']
    assert ep[0]['train']['nce_s'] == 0 and ep[1]['train']['nce_s'] > 0 and ep[1]['train']['nce_d'] > 0
    back = load_model(tmp_path / 'last.pt', device='cpu')
    assert isinstance(back, SPYL) and not back.training and back.config == m.config
    for k, v in back.state_dict().items(): torch.testing.assert_close(v, m.state_dict()[k])


def test_cli_train_spyl_then_eval(tmp_path, capsys):
    "`seqdis train --model spyl` writes a checkpoint that `seqdis eval` reads as it reads DBSE's (in-process `main`)."
    from seqdis_nb.cli import main
    from seqdis_nb.data import make_shapes
    from seqdis_nb.judge import save_judge, train_judge
    rc = main(['train', '--dataset', 'shapes', '--preset', 'shapes-quick', '--model', 'spyl', '--size', '16',
               '--batch-size', '16', '--steps-per-epoch', '2', '--epochs', '1', '--threads', '1', '--device', 'cpu',
               '--out', str(tmp_path / 'run'), '--quiet'])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert 'training spyl (shapes-quick' in out.out, out.out
    m = json.loads((tmp_path / 'run' / 'metrics.json').read_text())
    assert m['kind'] == 'spyl' and m['config']['z_dim'] == 8 and set(m['epochs'][0]['train']) >= {'mi', 'nce_s'}
    torch.manual_seed(0)
    save_judge(tmp_path / 'j.pt', train_judge(make_shapes(size=16), 'tiny', limit=64, progress=False,
                                              log=lambda *a: None))
    rc = main(['eval', '--checkpoint', str(tmp_path / 'run' / 'last.pt'), '--judge', str(tmp_path / 'j.pt'),
               '--out', str(tmp_path / 'rep'), '--limit', '32', '--repeats', '1', '--tsne-n', '32', '--threads', '1',
               '--quiet', '--no-figures'])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((tmp_path / 'rep' / 'report.json').read_text())
    assert rep['model']['kind'] == 'spyl' and rep['protocol']['n'] == 32
