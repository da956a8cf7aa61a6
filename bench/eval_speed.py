"""Evaluation speed vs training speed, measured in one process.

Times (1) one training epoch of a DBSE preset (`--preset`: `sprites-cpu` at 32x32, default, or the paper's `sprites`
at 64x64) over the 9000 Sprites training sequences (train + val characters), and (2) the full judge protocol (`paper_protocol`: 5 repeats, both
generation directions, both swaps, IS/H(y|x)/H(y)) on the 2664-sequence test split with the same model.
The protocol is timed twice: the papers' two directions only (`swaps=False`) and with both swaps added
(the MSD swap variant). Prints the times and their ratios. The model is freshly initialised (the timing does not
depend on the weights); so is the judge when no trained judge of the preset's frame size is found (said so; the
64x64 judge is the official layout). `--train-steps N` / `--repeats-timed k` time a part and scale it linearly
(said so): N steps after one untimed warm-up step (a full epoch keeps its warm-up in the time); k repeats with
their frame features, which the full protocol computes once for all repeats, so a scaled protocol time is an
upper bound.

    python bench/eval_speed.py [--preset sprites-cpu|sprites] [--threads 2] [--judge <SEQDIS_CACHE>/judges/sprites32.pt]
                               [--train-steps N] [--repeats-timed k]
"""
import argparse, os, time
from pathlib import Path

import numpy as np
import torch

from seqdis_nb.data import load_sprites
from seqdis_nb.dbse import DBSE, DBSEConfig
from seqdis_nb.evaluate import _frame_features, _generate, paper_protocol
from seqdis_nb.judge import Judge, load_judge, split_at_size


def count_flops(model, judge, x) -> dict:
    "FLOPs per sequence (torch.utils.flop_counter) of a training step and of the protocol's parts."
    from torch.utils.flop_counter import FlopCounterMode
    def cnt(f):
        with FlopCounterMode(display=False) as fc: f()
        return fc.get_total_flops() / len(x)
    def step():
        loss, _ = model.training_loss(x); loss.backward()
    out = {'train_step': cnt(step)}
    model.zero_grad(set_to_none=True); model.eval()
    with torch.inference_mode():
        g = torch.Generator().manual_seed(0)
        h = _frame_features(model, x)                    # as in the protocol: once per sequence, shared by the repeats
        out['features'] = cnt(lambda: _frame_features(model, x))
        out['generate_2'] = cnt(lambda: _generate(model, x, g, swaps=False, h=h))
        out['generate_4'] = cnt(lambda: _generate(model, x, g, swaps=True, h=h))
        out['judge'] = cnt(lambda: judge(x))
    model.train()
    return out


def median_time(f, reps: int = 3) -> float:
    f()                                                   # warm-up (oneDNN primitive creation)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def components(model, judge, x) -> list:
    """(name, plain s, fast s) of the protocol's parts on one batch x of test sequences: the frame features, the
    decode of the two directions (2 * len(x) sequences) and the judge pass over them, each by the plain modules
    (a `config.fast=False` twin with the same weights; `judge.fast = False`) and by the path the protocol uses."""
    from dataclasses import replace
    from seqdis_nb.speed import conv_decode
    plain = DBSE(replace(model.config, fast=False)); plain.load_state_dict(model.state_dict()); plain.eval()
    B, T = x.shape[:2]
    c = torch.randn(2 * B * T, model.config.z_dim + model.config.f_dim, generator=torch.Generator().manual_seed(1))
    y = torch.rand(2 * B, *x.shape[1:], generator=torch.Generator().manual_seed(2))
    def judged(fast):
        judge.fast = fast
        try: return median_time(lambda: judge(y))
        finally: judge.fast = True
    with torch.inference_mode():
        return [('frame features', median_time(lambda: plain.frame_features(x)), median_time(lambda: model.frame_features(x))),
                ('decode, 2 directions', median_time(lambda: plain.decoder(c)), median_time(lambda: conv_decode(model.decoder, c))),
                ('judge, 2 directions', judged(False), judged(True))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--preset', default='sprites-cpu', choices=['sprites-cpu', 'sprites'])
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--judge', default=None, help='trained judge (default: <SEQDIS_CACHE>/judges/sprites32.pt for '
                    'sprites-cpu; an untrained judge of the right layout otherwise)')
    ap.add_argument('--repeats', type=int, default=5)
    ap.add_argument('--train-steps', type=int, default=None, help='time only N steps and scale to the epoch')
    ap.add_argument('--repeats-timed', type=int, default=None, help='time only k repeats and scale to --repeats')
    ap.add_argument('--seed', type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    cfg = DBSEConfig.preset(a.preset)
    cache = Path(os.environ.get('SEQDIS_CACHE', Path.home() / '.cache' / 'seqdis_nb'))
    if a.judge is None and cfg.image_size == 32: a.judge = str(cache / 'judges' / 'sprites32.pt')
    t0 = time.time()
    bundle = load_sprites(size=cfg.image_size)       # frames area-downsampled once, in memory: no I/O is timed below
    prep = time.time() - t0
    model = DBSE(cfg)
    try:
        if a.judge is None: raise ValueError(f'no trained judge given for {cfg.image_size}x{cfg.image_size}')
        judge = load_judge(a.judge)
    except ValueError as e:
        layout = {32: 'small', 64: 'sprites'}[cfg.image_size]
        print(f'({e}; timing an untrained {layout!r} judge instead: the time does not depend on its weights)')
        judge = Judge.for_dataset(bundle.info, layout)
    judge.eval()

    xs = torch.cat([split_at_size(s, cfg.image_size)[0] for s in (bundle.train, bundle.val)])   # (9000, T, C, 32, 32) uint8
    flops = count_flops(model, judge, xs[:4].float() / 255)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    perm = torch.randperm(len(xs), generator=torch.Generator().manual_seed(a.seed))
    starts = list(range(0, len(xs), cfg.batch_size))
    steps = starts if a.train_steps is None else starts[:a.train_steps]
    model.train()
    def train_step(s):
        x = xs[perm[s:s + cfg.batch_size]].float() / 255
        loss, _ = model.training_loss(x, epoch=0, n_data=len(xs))
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    if a.train_steps is not None: train_step(starts[-1])   # untimed warm-up, else scaling would repeat its cost
    t0 = time.time()
    for s in steps: train_step(s)
    train_t = (time.time() - t0) * len(starts) / len(steps)
    model.eval()

    parts = components(model, judge, split_at_size(bundle.test.subset(range(256)), cfg.image_size)[0].float() / 255)
    k = a.repeats if a.repeats_timed is None else a.repeats_timed
    times = {}
    for swaps in (False, True):
        t0 = time.time()
        res = paper_protocol(model, judge, bundle.test, repeats=k, seed=a.seed, batch_size=256, swaps=swaps)
        times[swaps] = (time.time() - t0) * a.repeats / k

    scaled = lambda cond, what: '' if not cond else f' (scaled from {what})'
    print(f"torch {torch.__version__}, {a.threads} threads, load average {os.getloadavg()[0]:.2f}; data prep (Sprites at "
          f"{cfg.image_size}x{cfg.image_size}, not timed below) {prep:.1f} s")
    ep_f = flops['train_step'] * len(xs)
    for m, name in ((2, 'both directions'), (4, 'directions + swaps')):
        pr_f = len(bundle.test) * (flops['features'] + a.repeats * (flops[f'generate_{m}'] + m * flops['judge']))
        print(f"FLOPs: epoch {ep_f / 1e12:.2f} T; protocol ({name}) {pr_f / 1e12:.2f} T "
              f"(judge {a.repeats * len(bundle.test) * m * flops['judge'] / 1e12:.2f} T); ratio {pr_f / ep_f:.3f}")
    print(f"training epoch   {a.preset}, {len(xs)} seqs, batch {cfg.batch_size}, {len(starts)} steps"
          f"{scaled(a.train_steps is not None, f'{len(steps)} steps')}: {train_t:7.1f} s")
    for swaps, name in ((False, 'both directions, IS/H'), (True, 'both directions + both swaps, IS/H, MSD')):
        t = times[swaps]
        print(f"judge protocol   {res['n']} test seqs x {a.repeats} repeats ({name})"
              f"{scaled(k != a.repeats, f'{k} repeat(s)')}: {t:7.1f} s   ratio to the epoch {t / train_t:.3f}"
              f" ({'faster' if t < train_t else 'SLOWER'})")

    print(f"per batch of 256 test sequences (median of 3):")
    for name, plain, fast in parts:
        print(f"  {name:22s} plain modules {plain:6.3f} s   inference path {fast:6.3f} s   speed-up {plain / fast:.2f}x")

if __name__ == '__main__':
    main()
