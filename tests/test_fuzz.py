"""Bad-input fuzzing with hypothesis over the public entry points. Every generated call either works correctly
(finite output of the right shape; a non-contiguous, channels-last or broadcast input gives what its contiguous copy
gives) or raises a ValueError / TypeError whose message names the argument: never an IndexError or RuntimeError
from deep inside, never a silent NaN. Tiny models keep 200+ cases per entry point within seconds."""
import argparse, math
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from seqdis_nb.dbse import DBSE, DBSEConfig
from seqdis_nb.ops import gauss_kl, gauss_kl_ref, sub_first

N = 200
FUZZ = settings(max_examples=N, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
COUNTS = Counter()          # cases run per entry point (printed by the last test)

OK, SAME, EITHER, BAD = 'ok', 'same', 'either', 'bad'   # what a case must do (see `check`)
BAD_DTYPES = (torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64)
FLOATS = (torch.float16, torch.bfloat16, torch.float64)


def _layout(draw, x):
    "x with another memory layout, same values: permuted storage (channels-last and the like), strided, broadcast."
    how = draw(st.sampled_from(['permute', 'stride', 'expand'] if x.dim() else ['stride']))
    if how == 'permute':
        perm = draw(st.permutations(range(x.dim())))
        inv = [perm.index(i) for i in range(x.dim())]
        y = x.permute(*perm).contiguous().permute(*inv)               # same shape, permuted strides
    elif how == 'stride':
        y = torch.stack([x, torch.full_like(x, float('nan')) if x.is_floating_point() else x], -1)[..., 0]
    else:
        if x.shape[0] == 0: return x, 'same'
        y = x[:1].expand(x.shape) if x.dim() else x                   # stride 0 along the batch
        x = y.contiguous()
    if x.dim() == 5 and draw(st.booleans()):                           # the real channels-last layout of frames
        y = x.flatten(0, 1).contiguous(memory_format=torch.channels_last).view(x.shape)
    return x, y


@st.composite
def mutated(draw, shape, name, lo=0., hi=1.):
    """(x, contiguous twin or None, expectation, note): a valid float32 tensor of `shape` with values in [lo, hi],
    then at most one mutation of it."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = lo + (hi - lo) * torch.rand(shape, generator=g)
    kind = draw(st.sampled_from(['valid', 'layout', 'layout', 'rank', 'size', 'dtype', 'float', 'nonfinite',
                                 'huge', 'type', 'device', 'empty']))
    if kind == 'valid': return x, None, OK, kind
    if kind == 'layout':
        x, y = _layout(draw, x)
        return (y, x, SAME, kind) if isinstance(y, torch.Tensor) else (x, None, OK, kind)
    if kind == 'rank':
        if draw(st.booleans()) and x.dim() > 1: return x[..., 0], None, BAD, 'rank-1'
        return x.unsqueeze(draw(st.integers(0, x.dim()))), None, BAD, 'rank+1'
    if kind == 'size':            # a wrong size in one fixed dimension (the caller says which ones are free)
        return x, None, 'size', kind
    if kind == 'dtype':
        dt = draw(st.sampled_from(BAD_DTYPES))
        return (x * 255).to(dt) if dt != torch.complex64 else x.to(dt), None, BAD, f'dtype {dt}'
    if kind == 'float':
        dt = draw(st.sampled_from(FLOATS))
        return x.to(dt), None, EITHER, f'dtype {dt}'
    if kind == 'nonfinite':
        if x.numel() == 0: return x, None, 'size', kind
        v = draw(st.sampled_from([float('nan'), float('inf'), -float('inf')]))
        x = x.clone(); x.view(-1)[draw(st.integers(0, x.numel() - 1))] = v
        return x, None, BAD, kind
    if kind == 'huge':
        v = draw(st.sampled_from([1e4, 1e15, 1e30, 3e38, -3e38]))
        if x.numel() == 0: return x, None, 'size', kind
        x = x.clone(); x.view(-1)[draw(st.integers(0, x.numel() - 1))] = v
        return x, None, EITHER, kind
    if kind == 'type':
        return draw(st.sampled_from([x.numpy(), x.tolist(), None, 1.0, 'x'])), None, BAD, kind
    if kind == 'device':
        return x.to('meta'), None, BAD, kind
    return x[:0], None, 'size', kind            # batch 0


def finite(out):
    "All tensors in `out` (a tensor, NamedTuple, tuple or dict) are finite."
    if isinstance(out, torch.Tensor): return bool(torch.isfinite(out).all())
    if isinstance(out, dict): return all(finite(v) for v in out.values())
    return all(finite(v) for v in out)


def close(a, b):
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5); return
    for u, v in zip(a.values() if isinstance(a, dict) else a, b.values() if isinstance(b, dict) else b): close(u, v)


def check(entry, call, arg, case, shape_ok=None):
    """Run `call(value)` for a `mutated` case of argument `arg` and hold it to the case's expectation."""
    x, twin, want, note = case
    COUNTS[entry] += 1
    try:
        out = call(x)
    except (ValueError, TypeError) as e:
        assert want in (BAD, EITHER, 'size'), f'{entry}: {note} input raised {type(e).__name__}: {e}'
        names = (arg,) if isinstance(arg, str) else arg
        assert any(a in str(e) for a in names), f'{entry}: the message of {type(e).__name__} does not name {arg!r}: {e}'
        return
    assert want != BAD, f'{entry}: {note} input was accepted'
    assert want != 'size', f'{entry}: {note} input of shape {tuple(x.shape)} was accepted'
    assert finite(out), f'{entry}: {note} input gave a non-finite output without an error'
    if shape_ok is not None: shape_ok(out)
    if want == SAME: close(out, call(twin))


# ------------------------------------------------------------------------------------------------- models
torch.set_num_threads(1)
torch.set_printoptions(threshold=20, edgeitems=1)   # short failing cases
B, T, C, S, F = 2, 3, 3, 8, 5
CONV = dict(image_size=S, channels=C, nf=4, g_dim=8, rnn_dim=8, f_dim=6, z_dim=4, batch_size=2)
MLP = dict(encoder='mlp', features=F, seq_hidden=8, g_dim=8, rnn_dim=8, f_dim=6, z_dim=4, batch_size=2)


def _model(cls, kw):
    torch.manual_seed(0)
    return cls(cls.config_class.preset('shapes-quick' if 'encoder' not in kw else 'series', **kw)).eval()

def _models():
    out = {'dbse': (DBSE, CONV), 'dbse-mlp': (DBSE, MLP)}
    if 'fast' in DBSEConfig.__dataclass_fields__: out['dbse-plain'] = (DBSE, dict(CONV, fast=False))
    try:
        from seqdis_nb.spyl import SPYL
        out.update({'spyl': (SPYL, CONV), 'spyl-mlp': (SPYL, MLP)})
    except ImportError: pass
    return out

MODELS = {k: _model(*v) for k, v in _models().items()}
MODEL_NAMES = sorted(MODELS)


def frames(name):
    return (C, S, S) if 'mlp' not in name else (F,)


def gen(): return torch.Generator().manual_seed(0)


def size_shape(draw, name, free_T=True):
    "A wrong (B, T, *frame) shape for model `name`: T < 2 or a wrong frame size."
    fr = list(frames(name))
    if draw(st.booleans()): return (B, draw(st.integers(0, 1)), *fr)          # T < 2
    i = draw(st.integers(0, len(fr) - 1))
    fr[i] = draw(st.sampled_from([v for v in (1, 2, 4, 7, 16) if v != fr[i]]))
    return (B, T, *fr)


@st.composite
def video_case(draw, name):
    t = draw(st.integers(2, 4))
    case = draw(mutated((draw(st.integers(1, 3)), t, *frames(name)), 'x'))
    if case[3] in ('size', 'nonfinite', 'huge') and case[2] == 'size':
        return torch.rand(size_shape(draw, name)), None, 'size', 'size'
    return case


@pytest.mark.parametrize('name', MODEL_NAMES)
@pytest.mark.parametrize('method', ['encode', 'forward', 'training_loss', 'fix_static_sample_dynamics',
                                    'fix_dynamics_sample_static'])
def test_fuzz_model_input(name, method):
    m = MODELS[name]
    def call(x):
        if method == 'training_loss':
            m.train(); torch.manual_seed(0)        # training noise comes from the global RNG
            try: return m.training_loss(x)
            finally: m.eval()
        return getattr(m, method)(x, generator=gen())
    @FUZZ
    @given(video_case(name))
    def run(case): check(f'{name}.{method}', call, 'x', case)
    run()


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_fuzz_swap(name):
    m = MODELS[name]
    @FUZZ
    @given(video_case(name), st.booleans())
    def run(case, first):
        x, twin, want, note = case
        other = torch.rand(x.shape) if isinstance(x, torch.Tensor) and x.dtype != torch.bool and x.numel() else \
            torch.rand(B, T, *frames(name))
        arg = 'x_a' if first else 'x_b'
        def call(v):
            pair = (v, other) if first else (other, v)
            return m.swap(*pair, generator=gen())
        if want == SAME: other = torch.rand(x.shape)
        check(f'{name}.swap', call, 'x', (x, twin, want, note))
    run()


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_fuzz_decode(name):
    m = MODELS[name]
    f, z = m.config.f_dim, m.config.z_dim
    @FUZZ
    @given(st.booleans(), st.data())
    def run(mutate_s, data):
        b, t = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 4))
        s, d = torch.randn(b, f), torch.randn(b, t, z)
        arg = 's' if mutate_s else 'd'
        case = data.draw(mutated(tuple((s if mutate_s else d).shape), arg, -3., 3.))
        if case[2] == 'size' and case[3] != 'empty':       # a wrong latent size, or another batch size than the other code
            bad = list((s if mutate_s else d).shape)
            bad[data.draw(st.sampled_from([0, len(bad) - 1]))] += data.draw(st.integers(1, 3))
            case = (torch.randn(bad), None, 'size', 'size')
        call = (lambda v: m.decode(v, d)) if mutate_s else (lambda v: m.decode(s, v))
        shape = (b, t, *frames(name))
        check(f'{name}.decode', call, arg, case, lambda out: out.shape == shape or pytest.fail(f'{out.shape}'))
    run()


INTS = st.one_of(st.integers(-3, 4), st.sampled_from([True, False, 2.0, 1.5, '3', None, float('nan')]))

@pytest.mark.parametrize('name', MODEL_NAMES)
def test_fuzz_sample(name):
    m = MODELS[name]
    @FUZZ
    @given(INTS, INTS, st.booleans())
    def run(n, t, prior_means):
        COUNTS[f'{name}.sample'] += 1
        good = lambda v, none_ok: (v is None and none_ok) or (type(v) is int and v >= 1)
        try: out = m.sample(n, t, generator=gen(), prior_means=prior_means)
        except (ValueError, TypeError) as e:
            assert not (good(n, False) and good(t, True)), f'sample({n!r}, {t!r}) raised {e}'
            assert ('n ' in str(e) or 'T ' in str(e)), e
            return
        assert good(n, False) and good(t, True), f'sample({n!r}, {t!r}) was accepted'
        assert out.shape == (n, t or m.config.seq_len, *frames(name)) and finite(out)
    run()


def test_sample_and_swap_use_only_the_given_generator():
    m = MODELS['dbse']
    x = torch.rand(2, 3, C, S, S)
    torch.manual_seed(1); a = m.sample(2, 3, generator=gen()); r1 = torch.rand(1)
    torch.manual_seed(1); b = m.sample(2, 3, generator=gen()); r2 = torch.rand(1)
    assert torch.equal(a, b) and torch.equal(r1, r2)
    c = m.fix_static_sample_dynamics(x, generator=gen())
    assert torch.equal(c, m.fix_static_sample_dynamics(x, generator=gen()))


# ------------------------------------------------------------------------------------------------- ops
@pytest.mark.parametrize('backend', ['torch', 'auto'])
def test_fuzz_sub_first(backend):
    @FUZZ
    @given(st.booleans(), st.data())
    def run(mutate_h, data):
        b, t, g = data.draw(st.integers(1, 3)), data.draw(st.integers(2, 5)), data.draw(st.integers(1, 6))
        h, noise = torch.randn(b, t, g), torch.randn(b, g)
        arg = 'h' if mutate_h else 'noise'
        case = data.draw(mutated(tuple((h if mutate_h else noise).shape), arg, -2., 2.))
        x, twin, want, note = case
        if want == 'size' and note != 'empty':
            bad = list((h if mutate_h else noise).shape)
            if mutate_h and data.draw(st.booleans()): bad[1] = data.draw(st.integers(0, 1))   # T < 2
            else: bad[data.draw(st.integers(0, len(bad) - 1))] += 1
            if mutate_h and bad[1] >= 2 and bad[0] == b and bad[2] == g: bad[2] += 1
            case = (torch.randn(bad), None, 'size', 'size')
        if want == EITHER and 'float' in note:   # another float dtype for one argument only: must be refused
            case = (x, None, BAD, note)
        if note == 'nonfinite' or note == 'huge':  # sub_first is data movement: NaN/Inf/huge pass through
            case = (x, None, 'pass', note)
        f = (lambda v: sub_first(v, noise, backend=backend)) if mutate_h else (lambda v: sub_first(h, v, backend=backend))
        x, twin, want, note = case
        if want == 'pass':
            COUNTS[f'sub_first[{backend}]'] += 1
            h0, y = f(x)
            hh, nn_ = (x, noise) if mutate_h else (h, x)
            same = lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
            same(h0, hh[:, 0]); same(y[:, 0], nn_); same(y[:, 1:], hh[:, 1:] - hh[:, :1])
            return
        check(f'sub_first[{backend}]', f, arg, case)
    run()


GK = ('s_mean', 's_logvar', 'q_mean', 'q_logvar', 'p_mean', 'p_logvar')

@pytest.mark.parametrize('backend', ['torch', 'auto'])
def test_fuzz_gauss_kl(backend):
    @FUZZ
    @given(st.integers(0, 5), st.data())
    def run(which, data):
        b, t, f, z = (data.draw(st.integers(1, 3)) for _ in range(4))
        args = [torch.randn(b, f), torch.randn(b, f), *(torch.randn(b, t, z) for _ in range(4))]
        arg = GK[which]
        x, twin, want, note = data.draw(mutated(tuple(args[which].shape), arg, -3., 3.))
        if want == 'size' and note != 'empty':
            bad = list(args[which].shape); bad[data.draw(st.integers(0, len(bad) - 1))] += 1
            x, want = torch.randn(bad), 'size'
            # s_mean and q_mean set the shapes the others are checked against: a message may name any of those
            if which == 0: arg = ('s_mean', 's_logvar', 'q_mean')
            if which == 2: arg = GK
        if want == EITHER and 'float' in note: want = BAD             # mixed dtypes are refused
        if note in ('huge', 'nonfinite'): want = 'pass'   # no finiteness check on the hot path: inf/nan pass through
        def call(v):
            a = list(args); a[which] = v
            return gauss_kl(*a, backend=backend)
        if want == 'pass':
            COUNTS[f'gauss_kl[{backend}]'] += 1
            a = list(args); a[which] = x
            for u, v in zip(call(x), gauss_kl_ref(*a)): torch.testing.assert_close(u, v, equal_nan=True)
            return
        check(f'gauss_kl[{backend}]', call, arg, (x, twin, want, note),
              lambda out: (out[0].shape == out[1].shape == (b,)) or pytest.fail(f'shapes {out[0].shape}'))
    run()


def test_gauss_kl_layouts_exactly_match_contiguous():
    "The dispatcher on permuted / strided / broadcast inputs equals the contiguous result (spot check, exact)."
    g = torch.Generator().manual_seed(0)
    a = [torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g), *(torch.randn(3, 5, 2, generator=g) for _ in range(4))]
    nc = [t.t().contiguous().t() if t.dim() == 2 else t.transpose(1, 2).contiguous().transpose(1, 2) for t in a]
    assert not any(t.is_contiguous() for t in nc)
    for u, v in zip(gauss_kl(*a, backend='torch'), gauss_kl(*nc, backend='torch')): assert torch.equal(u, v)


# ------------------------------------------------------------------------------------------------- data
from seqdis_nb.data import DatasetInfo, SeqSplit

VIDEO = DatasetInfo('toy', 'video', ['colour'], [3], ['move'], [2], 4, (3, 8, 8))
SEQ = DatasetInfo('toyseq', 'sequence', ['speaker'], [4], [], [], None, (5,))

def _split_args(info, n):
    x = np.zeros((n, 4, 8, 8, 3), np.uint8) if info.kind == 'video' else np.zeros((n, 6, 5), np.float32)
    dyn = np.zeros(n, np.int64) if info.dynamic_factors else -np.ones(n, np.int64)
    return dict(x=x, static=np.zeros((n, 1), np.int64), dynamic=dyn, char=np.arange(n), info=info)

JUNK = st.sampled_from([None, 'abc', 1.5, [[0.5]], float('nan'), np.array([[np.nan]]), object(),
                        np.zeros((2, 2, 2)), np.full((3, 1), 7), np.full(3, -2), np.zeros(3, np.float64) + 0.5,
                        torch.zeros(3, 1, dtype=torch.int64), np.zeros((3, 1), bool)])

@pytest.mark.parametrize('info', [VIDEO, SEQ], ids=['video', 'sequence'])
def test_fuzz_seqsplit(info):
    "SeqSplit(x, static, dynamic, char, info, scale, lengths) with one argument replaced by junk."
    @FUZZ
    @given(st.sampled_from(['x', 'static', 'dynamic', 'char', 'info', 'scale', 'lengths', None]), JUNK,
           st.integers(0, 3))
    def run(arg, junk, n):
        COUNTS[f'SeqSplit[{info.kind}]'] += 1
        kw = _split_args(info, n)
        if arg is not None: kw[arg] = junk
        try: s = SeqSplit(**kw)
        except (ValueError, TypeError) as e:
            assert arg is not None, f'valid arguments raised {e}'
            assert arg in str(e), f'the message does not name {arg!r}: {type(e).__name__}: {e}'
            return
        # accepted: the split must be usable as built, and hold integer labels of the right shapes
        assert s.static.dtype == s.dynamic.dtype == np.int64 and s.static.shape == (len(s), 1)
        if len(s):
            x, st_, dy = s.batch(np.arange(len(s)))
            assert x.dtype == torch.float32 and torch.isfinite(x).all()
        if arg in ('static', 'dynamic', 'char'):    # junk accepted only when it is a valid integer label array
            a = np.asarray(junk)
            assert np.issubdtype(a.dtype, np.integer) or (a.dtype.kind == 'f' and (a == a.round()).all()), \
                f'{arg}={junk!r} accepted'
    run()


INFO_ARGS = dict(name='toy', kind='video', static_factors=['colour'], static_classes=[3], dynamic_factors=['move'],
                 dynamic_classes=[2], seq_len=4, frame_shape=(3, 8, 8))

def test_fuzz_dataset_info():
    "DatasetInfo with up to two fields replaced by junk: a usable info, or an error naming a replaced field."
    JUNK_INFO = [None, '', 'abc', 1.5, -1, 0, True, [], [0], [2], [[1]], ['x'], (3, 8, 8), (3, -8, 8), ('a', 'b'),
                 [np.int64(2)], np.array([2]), 'video', 'sequence', (5,)]
    PARTNER = {'static_factors': ['static_classes'], 'static_classes': ['static_factors'], 'kind': ['frame_shape'],
               'dynamic_factors': ['dynamic_classes'], 'dynamic_classes': ['dynamic_factors'], 'frame_shape': ['kind']}
    @FUZZ
    @given(st.lists(st.tuples(st.sampled_from(sorted(INFO_ARGS)), st.sampled_from(JUNK_INFO)), max_size=2))
    def run(changes):
        COUNTS['DatasetInfo'] += 1
        kw = dict(INFO_ARGS)
        for field, junk in changes: kw[field] = junk
        try: info = DatasetInfo(**kw)
        except (ValueError, TypeError) as e:
            assert changes, e
            names = [n for f, _ in changes for n in [f] + PARTNER.get(f, [])]
            assert any(n in str(e) for n in names), f'{changes}: {e}'
            return
        assert isinstance(info.name, str) and info.name
        assert len(info.static_factors) == len(info.static_classes) and all(c >= 1 for c in info.static_classes)
        assert all(isinstance(v, int) and v >= 1 for v in info.frame_shape)
        assert info.seq_len is None or info.seq_len >= 1
    run()


@pytest.mark.parametrize('kind', ['video', 'sequence'])
def test_fuzz_seqsplit_batch_index(kind):
    s = SeqSplit(**_split_args(VIDEO if kind == 'video' else SEQ, 5))
    @FUZZ
    @given(st.one_of(st.integers(-8, 8), st.lists(st.integers(-8, 8), max_size=4), st.sampled_from(
        [1.5, 'a', None, [True, False], np.array([0.5]), torch.tensor([1, 2]), slice(1, 3), np.array([], np.int64)])))
    def run(idx):
        COUNTS[f'SeqSplit.batch[{kind}]'] += 1
        try: x, st_, dy = s.batch(idx)
        except (ValueError, TypeError, IndexError) as e:      # IndexError: out of range (the Dataset protocol)
            assert 'idx' in str(e), e
            return
        n = len(np.arange(5)[idx]) if isinstance(idx, slice) else np.asarray(idx).size
        assert x.shape[0] == st_.shape[0] == dy.shape[0] == n
    run()


# ------------------------------------------------------------------------------------------------- CLI
from seqdis_nb.cli import build_parser

WORDS = ['train', 'info', 'eval', 'judge', '--dataset', 'shapes', 'sprites', 'nope', '--preset', 'shapes-quick',
         '--epochs', '--out', '/tmp/x', '--model', 'vae', '--resume', '', '--', '-x', '--help']
VALUES = ['0', '1', '-1', '3', '1e-3', '-0.5', '2.5', 'nan', 'inf', '-inf', 'abc', '', '1e400', '0x10', ' 7', '--']
OPTIONS = {'--epochs': 'epochs', '--batch-size': 'batch_size', '--steps-per-epoch': 'steps_per_epoch',
           '--checkpoint-every': 'checkpoint_every', '--threads': 'threads', '--size': 'size', '--lr': 'lr',
           '--seed': 'seed', '--model': 'model', '--device': 'device', '--dataset': 'dataset'}

def _sane(k, v):
    if k == 'lr': return isinstance(v, float) and math.isfinite(v) and v > 0
    if k == 'seed': return isinstance(v, int)
    if k in ('model', 'device', 'dataset'): return isinstance(v, str)
    return isinstance(v, int) and v >= 1

def test_fuzz_cli_parser(capsys):
    """`seqdis train` argv: the required options, then random options with random values, sometimes random words.
    Each either parses into sane values (positive counts, a positive finite lr) or is a usage error: exit 2 with
    `error: argument --NAME` on stderr."""
    p = build_parser()
    @FUZZ
    @given(st.lists(st.tuples(st.sampled_from(sorted(OPTIONS)), st.sampled_from(VALUES)), max_size=5),
           st.lists(st.sampled_from(WORDS), max_size=3), st.booleans())
    def run(opts, words, shuffle_words):
        COUNTS['cli.parse_args'] += 1
        argv = ['train', '--dataset', 'shapes', '--preset', 'shapes-quick', '--epochs', '2', '--out', '/tmp/x']
        for k, v in opts: argv += [k, v]
        argv = (words + argv) if shuffle_words else (argv + words)
        try: a = p.parse_args(argv)
        except SystemExit as e:
            err = capsys.readouterr().err
            if e.code == 0: assert '--help' in argv; return
            assert e.code == 2 and 'error:' in err, (e.code, err)
            return
        assert callable(a.func)
        if a.command == 'train':
            for k, v in opts:
                if f'{k} {v}' in ' '.join(argv): assert _sane(OPTIONS[k], getattr(a, OPTIONS[k])), (k, v, argv)
    run()


# ------------------------------------------------------------------------------------------------- judge
@pytest.mark.parametrize('method', ['forward'])
def test_fuzz_judge(method):
    J = pytest.importorskip('seqdis_nb.judge')
    torch.manual_seed(0)
    judge = J.Judge(J.JudgeConfig.preset('tiny', image_size=S, nf=4, g_dim=8, rnn_dim=8), ['a', 'b'], [3, 2], 1).eval()
    call = judge.predict if method == 'predict' else judge
    @FUZZ
    @given(st.integers(1, 3), st.integers(1, 4), st.data())
    def run(b, t, data):
        case = data.draw(mutated((b, t, C, S, S), 'x'))
        if case[2] == 'size' and case[3] != 'empty':
            fr = [C, S, S]; fr[data.draw(st.integers(0, 2))] += data.draw(st.sampled_from([-1, 1, 8]))
            case = (torch.rand(b, t, *fr), None, 'size', 'size')
        check(f'judge.{method}', call, 'x', case)
    run()


# ------------------------------------------------------------------------------------------------- interop
def _mutate_state(draw, sd):
    "A copy of state_dict `sd` with at most one thing wrong: (state, what, must_fail)."
    sd = dict(sd)
    keys = sorted(sd)
    k = draw(st.sampled_from(keys))
    what = draw(st.sampled_from(['none', 'drop', 'rename', 'extra', 'shape', 'dtype', 'value', 'nan', 'wrap',
                                 'module.', 'noncontig']))
    if what == 'drop': del sd[k]
    elif what == 'rename': sd[k + '_x'] = sd.pop(k)
    elif what == 'extra': sd['extra.weight'] = torch.zeros(2)
    elif what == 'shape':
        t = sd[k]
        sd[k] = torch.zeros(*(t.shape[:-1] if t.dim() else ()), (t.shape[-1] if t.dim() else 1) + 1)
    elif what == 'dtype': sd[k] = sd[k].to(draw(st.sampled_from([torch.int64, torch.bool, torch.complex64])))
    elif what == 'value': sd[k] = draw(st.sampled_from([None, 1.0, 'w', [1, 2], np.zeros(2)]))
    elif what == 'nan':
        t = sd[k].clone(memory_format=torch.contiguous_format)
        if t.is_floating_point() and t.numel(): t.view(-1)[0] = float('nan')
        sd[k] = t
    elif what == 'wrap': return draw(st.sampled_from([{'state_dict': sd}, {'model': sd, 'optimizer': {}}])), what, False
    elif what == 'module.': return {'module.' + a: b for a, b in sd.items()}, what, False
    elif what == 'noncontig':
        t = sd[k]
        if t.dim() >= 2: sd[k] = t.transpose(0, 1).contiguous().transpose(0, 1)
    return sd, what, what in ('drop', 'rename', 'extra', 'shape', 'value')


def test_fuzz_from_official():
    """from_official on the authors' layout of a tiny model, with one key dropped / renamed / added, a tensor of
    another shape or dtype, a non-tensor, a NaN, wrappers: the exact weights, or an error (never KeyError etc.)."""
    I = pytest.importorskip('seqdis_nb.interop')
    tiny = dict(g_dim=8, rnn_dim=8, f_dim=4, z_dim=4)            # the authors' frames are 64x64, widths 64-512
    models = {'dbse': _model(DBSE, dict(tiny, image_size=64, nf=64))}
    if 'spyl' in MODELS: models['spyl'] = _model(type(MODELS['spyl']), dict(tiny, image_size=64, nf=64))
    official = {k: I.to_official(m) for k, m in models.items()}
    @FUZZ
    @given(st.sampled_from(sorted(models)), st.data())
    def run(kind, data):
        COUNTS['interop.from_official'] += 1
        sd, what, must_fail = _mutate_state(data.draw, official[kind])
        try: m = I.from_official(sd, kind, device='cpu')
        except (ValueError, TypeError) as e:
            assert str(e), 'an error without a message'
            assert must_fail or what in ('dtype', 'nan'), f'{what}: refused a good state_dict: {e}'
            return
        assert not must_fail, f'{what}: accepted'
        want = models[kind].state_dict()
        got = m.state_dict()
        assert got.keys() == want.keys()
        for k in want:
            if what in ('dtype', 'nan'): continue       # loaded as given (weights need not be finite)
            assert torch.equal(got[k], want[k]), k
    run()


def test_zz_report_counts():
    "Prints the number of fuzzed cases per entry point (run with -s); every fuzzed entry point ran >= 200."
    if not COUNTS: pytest.skip('run with the fuzz tests above')
    print('\nfuzzed cases per entry point:')
    for k, v in sorted(COUNTS.items()): print(f'  {k:40s} {v}')
    assert COUNTS and min(COUNTS.values()) >= N, COUNTS
