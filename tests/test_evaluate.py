import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import pytest
import torch
from torch import nn

from seqdis_nb.data import DatasetInfo, SeqSplit, make_shapes
from seqdis_nb.dbse import DBSE, DBSEConfig
from seqdis_nb.evaluate import (balanced_subset, entropy_y, entropy_y_given_x, eer, evaluate, generation_scores,
                                inception_score, paper_protocol, report_markdown, speaker_eer, two_factor_score,
                                write_report)
from seqdis_nb.judge import Judge, JudgeConfig


pytestmark = pytest.mark.usefixtures('one_thread')   # tests/conftest.py

# ------------------------------------------------------------------ IS / H on hand-made probability matrices

@pytest.mark.parametrize('K', [2, 5, 9])
def test_scores_of_uniform_and_confident_matrices(K):
    u = torch.full((7, K), 1 / K)
    assert inception_score(u) == pytest.approx(1) and entropy_y_given_x(u) == pytest.approx(math.log(K))
    assert entropy_y(u) == pytest.approx(math.log(K))
    eye = torch.eye(K).repeat(4, 1)                                  # confident and balanced: the maxima
    assert inception_score(eye) == pytest.approx(K) and entropy_y_given_x(eye) == pytest.approx(0)
    assert entropy_y(eye) == pytest.approx(math.log(K))
    one = torch.zeros(6, K); one[:, 0] = 1                           # confident, one class only (mode collapse)
    assert inception_score(one) == pytest.approx(1) and entropy_y(one) == pytest.approx(0)


def test_scores_by_hand():
    p = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.0, 0.25, 0.75]])
    hyx = (math.log(2) + 0 + -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))) / 3
    py = np.array([1.5, 0.75, 0.75]) / 3
    hy = -(py * np.log(py)).sum()
    kl = [0.5 * math.log(0.5 / py[0]) + 0.5 * math.log(0.5 / py[1]), math.log(1 / py[0]),
          0.25 * math.log(0.25 / py[1]) + 0.75 * math.log(0.75 / py[2])]
    assert entropy_y_given_x(p) == pytest.approx(hyx)
    assert entropy_y(p) == pytest.approx(hy)
    assert inception_score(p) == pytest.approx(math.exp(np.mean(kl)))
    assert inception_score(p) == pytest.approx(math.exp(hy - hyx))


def test_balanced_subset_and_generation_scores():
    y = [2, 0, 0, 1, 2, 0, 1, 2]
    assert balanced_subset(y).tolist() == [0, 1, 2, 3, 4, 6]        # first 2 of each class
    with pytest.raises(ValueError, match='no samples'): balanced_subset([0, 0, 1], n_classes=3)
    p = torch.eye(3)[[2, 0, 0, 1, 2, 0, 1, 2]]
    p[5] = torch.tensor([0., 1., 0.])                                 # the extra class-0 sample is left out
    s = generation_scores(p, y)
    assert s['n'] == 6 and s['IS'] == pytest.approx(3) and s['ln_K'] == pytest.approx(math.log(3))
    with pytest.raises(ValueError, match='sum to 1'): inception_score(torch.ones(2, 3))
    with pytest.raises(ValueError, match='matrix'): inception_score(torch.ones(3))

# ------------------------------------------------------------------ EER

def _crossing_brute_force(s, y):
    "FPR and FNR at every distinct threshold; EER where |FPR - FNR| is smallest, by a direct sweep."
    ts = np.unique(s)
    fpr = np.array([(s[~y] >= t).mean() for t in ts]); fnr = np.array([(s[y] < t).mean() for t in ts])
    i = np.argmin(np.abs(fpr - fnr))
    return (fpr[i] + fnr[i]) / 2, ts[i]


@pytest.mark.parametrize('seed,delta', [(0, 1.0), (1, 2.0), (2, 3.0)])
def test_eer_is_the_roc_crossing(seed, delta):
    from scipy.stats import norm
    rng = np.random.default_rng(seed)
    y = rng.random(4000) < 0.4
    s = rng.normal(size=y.size) + delta * y
    e, t = eer(s, y)
    bf, _ = _crossing_brute_force(s, y)
    assert e == pytest.approx(bf, abs=1.5e-3)
    assert (s[~y] >= t).mean() == pytest.approx((s[y] < t).mean(), abs=3e-3)
    assert e == pytest.approx(norm.cdf(-delta / 2), abs=0.02)      # theory for equal-variance Gaussians


def test_eer_edge_cases():
    assert eer([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1])[0] == pytest.approx(0)
    assert eer([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1])[0] == pytest.approx(1)
    with pytest.raises(ValueError, match='both'): eer([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match='same length'): eer([0.1, 0.2, 0.3], [1, 0])

# ------------------------------------------------------------------ two-factor score: oracle and a model ignoring s

CLASSES = {'motion': 4, 'a': 6, 'b': 5}


def test_two_factor_score_function():
    assert two_factor_score({'motion': 1, 'a': 1 / 6, 'b': 1 / 5}, ['motion'], CLASSES) == pytest.approx(1)
    assert two_factor_score({'motion': 1 / 4, 'a': 1, 'b': 1}, ['a', 'b'], CLASSES) == pytest.approx(1)
    assert two_factor_score({'motion': 1 / 4, 'a': 1 / 6, 'b': 1 / 5}, ['a', 'b'], CLASSES) < 0.6
    with pytest.raises(ValueError, match='proper subset'): two_factor_score({'motion': 1.}, ['motion'], {'motion': 4})


def _code(label, K): return (label + 0.5) / K


def _synthetic(n=1200, T=4, seed=0):
    "Video whose frame pixel (0, 0) of channels 0/1/2 codes factors a, b (static) and motion (dynamic)."
    rng = np.random.default_rng(seed)
    a, b, m = rng.integers(0, 6, n), rng.integers(0, 5, n), rng.integers(0, 4, n)
    x = np.zeros((n, T, 8, 8, 3), np.uint8)
    x[:, :, 0, 0, 0] = np.round(_code(a, 6) * 255)[:, None]
    x[:, :, 0, 0, 1] = np.round(_code(b, 5) * 255)[:, None]
    x[:, :, 0, 0, 2] = np.round(_code(m, 4) * 255)[:, None]
    info = DatasetInfo('synthetic', 'video', ['a', 'b'], [6, 5], ['motion'], [4], T, (3, 8, 8))
    return SeqSplit(x, np.stack([a, b], 1), m, np.arange(n), info)


class OracleJudge(Judge):
    "Reads the coded pixel of frame 0 exactly."
    def __init__(self):
        super().__init__(JudgeConfig.preset('tiny', image_size=8), ['motion', 'a', 'b'], [4, 6, 5], 1,
                         meta={'dataset': 'synthetic', 'image_size': 8})
    def forward(self, x):
        v = x[:, 0, :, 0, 0]                                          # (B, 3)
        return tuple(20 * torch.nn.functional.one_hot((v[:, c] * k).long().clamp(0, k - 1), k).float()
                     for c, k in ((2, 4), (0, 6), (1, 5)))


class Post(NamedTuple):
    s_mean: torch.Tensor; s_logvar: torch.Tensor; s: torch.Tensor
    d_mean: torch.Tensor; d_logvar: torch.Tensor; d: torch.Tensor


@dataclass
class _Cfg:
    frame_shape: tuple = (3, 8, 8)
    def to_dict(self): return {'frame_shape': list(self.frame_shape)}


class CodeModel(nn.Module):
    """s = the static codes, d = the motion code (oracle); with ignore_s=True every code lives in d and s is unused."""
    kind = 'oracle'
    def __init__(self, ignore_s=False):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1)); self.config = _Cfg(); self.ignore_s = ignore_s

    def encode(self, x, generator=None):
        c = x[:, :, :, 0, 0]                                          # (B, T, 3)
        s, d = (torch.zeros_like(c[:, 0, :2]), c) if self.ignore_s else (c[:, 0, :2], c[:, :, 2:])
        return Post(s, torch.zeros_like(s), s, d, torch.zeros_like(d), d)

    def decode(self, s, d):
        B, T = d.shape[:2]
        y = torch.zeros(B, T, 3, 8, 8)
        if self.ignore_s: y[:, :, :, 0, 0] = d
        else: y[:, :, :2, 0, 0] = s[:, None]; y[:, :, 2, 0, 0] = d[..., 0]
        return y

    def _rand_codes(self, n, ks, g):
        return torch.stack([(torch.randint(0, k, (n,), generator=g) + 0.5) / k for k in ks], 1)

    def prior_rollout(self, n, T, generator=None):
        ks = (6, 5, 4) if self.ignore_s else (4,)
        d = self._rand_codes(n, ks, generator)[:, None].expand(n, T, len(ks))
        return SimpleNamespace(d=d, mean=d, logvar=torch.zeros_like(d))


@pytest.fixture(scope='module')
def synthetic():
    return _synthetic()


def test_oracle_scores_one_and_a_model_ignoring_s_scores_low(synthetic):
    good = paper_protocol(CodeModel(), OracleJudge(), synthetic, repeats=5, batch_size=300)
    acc = good['accuracy']
    assert acc['swap_static']['a']['mean'] == 1 and acc['fix_dynamics']['motion']['mean'] == 1
    assert abs(acc['fix_dynamics']['a']['mean'] - 1 / 6) < 0.04                   # resampled: chance
    for v in ('sample', 'swap'):
        assert good['msd'][v]['mean']['mean'] > 0.97, good['msd'][v]
    bad = paper_protocol(CodeModel(ignore_s=True), OracleJudge(), synthetic, repeats=5, batch_size=300)
    for v in ('sample', 'swap'):
        for grp in ('static', 'dynamic'):
            assert bad['msd'][v][grp]['mean'] < 0.65, (v, grp, bad['msd'][v])
    # the judge protocol's IS on the kept dynamic factor of the oracle is the maximum K
    assert good['scores']['fix_dynamics']['motion']['IS']['mean'] == pytest.approx(4, rel=1e-3)
    md = report_markdown(evaluate(CodeModel(), OracleJudge(), synthetic.subset(range(200)), repeats=2))
    assert 'MSD two-factor score' in md and 'motion (chance 25.0)' in md


def test_protocol_refuses_a_judge_of_other_data(synthetic):
    j = OracleJudge(); j.meta['dataset'] = 'sprites'
    with pytest.raises(ValueError, match='dataset'): paper_protocol(CodeModel(), j, synthetic, repeats=1)
    with pytest.raises(ValueError, match='repeats'): paper_protocol(CodeModel(), OracleJudge(), synthetic, repeats=0)


def test_protocol_is_reproducible_and_leaves_the_training_rng_alone(shapes):
    torch.manual_seed(0)
    model = DBSE(DBSEConfig.preset('shapes-quick', image_size=16, nf=8, g_dim=16, rnn_dim=8, f_dim=8, z_dim=4))
    judge = Judge.for_dataset(shapes.info, 'tiny').eval()
    split = shapes.test.subset(range(40))
    state = torch.get_rng_state()
    r1 = paper_protocol(model, judge, split, repeats=3, seed=7, batch_size=16)
    assert torch.equal(state, torch.get_rng_state())                              # the training RNG is untouched
    assert model.training                                                          # mode restored
    r2 = paper_protocol(model, judge, split, repeats=3, seed=7, batch_size=16)
    assert r1['accuracy'] == r2['accuracy'] and r1['scores'] == r2['scores']
    assert r1['seeds'] == [7, 8, 9] and r1['n'] == 40
    r3 = paper_protocol(model, judge, split, repeats=2, seed=7, batch_size=16, swaps=False)
    assert set(r3['accuracy']) == {'fix_dynamics', 'fix_static'} and set(r3['msd']) == {'sample'}
    other = Judge.for_dataset(make_shapes(size=32).info, JudgeConfig.preset('tiny', image_size=32))
    with pytest.raises(ValueError, match='image_size'): paper_protocol(model, other, split, repeats=1)

# ------------------------------------------------------------------ speaker EER on a synthetic sequence model

class SpeakerModel(nn.Module):
    "Static code: the speaker's direction plus noise; dynamic code: noise only."
    kind = 'speaker-oracle'
    def __init__(self, n_spk=5, dim=8):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1)); self.config = type('C', (), {'frame_shape': (3,), 'to_dict': lambda s: {}})()
        self.centres = torch.randn(n_spk, dim, generator=torch.Generator().manual_seed(0))
    def encode(self, x, generator=None):
        spk = x[:, 0, 0].round().long()
        s = self.centres[spk] + 0.3 * torch.randn(len(x), self.centres.shape[1], generator=generator)
        d = torch.randn(len(x), x.shape[1], 4, generator=generator)
        return Post(s, s, s, d, d, d)


def test_speaker_eer_static_low_dynamic_near_half():
    n, T = 200, 6
    spk = np.arange(n) % 5
    x = np.zeros((n, T, 3), np.float32); x[:, :, 0] = spk[:, None]
    info = DatasetInfo('voices', 'sequence', ['speaker'], [5], [], [], T, (3,))
    split = SeqSplit(x, spk[:, None], np.full(n, -1), np.arange(n), info)
    r = speaker_eer(SpeakerModel(), split)
    assert r['static_eer'] < 0.05 and abs(r['dynamic_eer'] - 0.5) < 0.05 and r['gap'] > 0.4
    assert r['pairs'] == n * (n - 1) // 2


def test_write_report_files(tmp_path, synthetic):
    res = evaluate(CodeModel(), OracleJudge(), synthetic.subset(range(100)), repeats=2)
    out = write_report(res, tmp_path / 'r')
    assert sorted(p.name for p in out.iterdir()) == ['report.json', 'report.md']
    assert 'below 99 %' in (out / 'report.md').read_text()            # an oracle with no recorded accuracy is flagged

# ------------------------------------------------------------------ seqdis eval end to end

def test_cli_eval_writes_report_and_pngs(cli, tmp_path, capsys, shapes):
    from seqdis_nb.judge import save_judge, train_judge
    from seqdis_nb.train import save_checkpoint
    torch.manual_seed(0)
    model = DBSE(DBSEConfig.preset('shapes-quick', image_size=16, nf=8, g_dim=16, rnn_dim=8, f_dim=8, z_dim=4))
    save_checkpoint(tmp_path / 'm.pt', model, None, dataset='shapes')
    save_judge(tmp_path / 'j.pt', train_judge(shapes, 'tiny', limit=64, progress=False, log=lambda *a: None))
    r = cli('eval', '--checkpoint', tmp_path / 'm.pt', '--judge', tmp_path / 'j.pt', '--out', tmp_path / 'rep',
            '--limit', '40', '--repeats', '2', '--tsne-n', '40', '--threads', '1', '--quiet')
    assert r.returncode == 0, r.stderr
    files = sorted(p.name for p in (tmp_path / 'rep').iterdir())
    assert files == ['fixed.png', 'reconstructions.png', 'report.json', 'report.md', 'samples.png', 'swap.png', 'tsne.png']
    import json
    rep = json.loads((tmp_path / 'rep' / 'report.json').read_text())
    assert rep['protocol']['n'] == 40 and rep['protocol']['repeats'] == 2 and rep['dataset'] == 'shapes'
    assert 'MSD two-factor score' in r.stdout
    # a judge of another resolution is refused with a clear message (exit 2)
    save_judge(tmp_path / 'j8.pt', Judge.for_dataset(shapes.info, JudgeConfig.preset('tiny', image_size=32)))
    from seqdis_nb.cli import main
    assert main(['eval', '--checkpoint', str(tmp_path / 'm.pt'), '--judge', str(tmp_path / 'j8.pt'), '--out',
                 str(tmp_path / 'x'), '--quiet']) == 2                               # in-process: no second start-up
    assert 'image_size' in capsys.readouterr().err
