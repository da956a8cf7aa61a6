"""Evaluation speed vs training speed, measured in one process.

Times (1) one training epoch of the DBSE `sprites-cpu` preset over the 9000 Sprites training sequences
(train + val characters) at 32x32, and (2) the full judge protocol (`paper_protocol`: 5 repeats, both
generation directions, both swaps, IS/H(y|x)/H(y)) on the 2664-sequence test split with the same model.
Prints both times and their ratio. The model is freshly initialised (the timing does not depend on the weights).

    python bench/eval_speed.py [--threads 2] [--judge /work/artifacts/judges/sprites32.pt] [--train-steps N]
"""
import argparse, time

import numpy as np
import torch

from seqdis_nb.data import load_sprites
from seqdis_nb.dbse import DBSE, DBSEConfig
from seqdis_nb.evaluate import paper_protocol
from seqdis_nb.judge import Judge, load_judge, split_at_size


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--judge', default='/work/artifacts/judges/sprites32.pt')
    ap.add_argument('--repeats', type=int, default=5)
    ap.add_argument('--train-steps', type=int, default=None, help='time only N steps and scale to the epoch')
    ap.add_argument('--seed', type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    bundle = load_sprites()
    cfg = DBSEConfig.preset('sprites-cpu')
    model = DBSE(cfg)
    try: judge = load_judge(a.judge)
    except ValueError as e:
        print(f'({e}; timing an untrained small judge instead)')
        judge = Judge.for_dataset(bundle.info, 'small')
    judge.eval()

    t0 = time.time()
    xs = torch.cat([split_at_size(s, cfg.image_size)[0] for s in (bundle.train, bundle.val)])   # (9000, T, C, 32, 32) uint8
    prep = time.time() - t0
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    perm = torch.randperm(len(xs), generator=torch.Generator().manual_seed(a.seed))
    starts = list(range(0, len(xs), cfg.batch_size))
    steps = starts if a.train_steps is None else starts[:a.train_steps]
    model.train()
    t0 = time.time()
    for s in steps:
        x = xs[perm[s:s + cfg.batch_size]].float() / 255
        loss, _ = model.training_loss(x, epoch=0, n_data=len(xs))
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    train_t = (time.time() - t0) * len(starts) / len(steps)
    model.eval()

    t0 = time.time()
    res = paper_protocol(model, judge, bundle.test, repeats=a.repeats, seed=a.seed, batch_size=256)
    eval_t = time.time() - t0

    print(f"torch {torch.__version__}, {a.threads} threads; data prep (9000 seqs to 32x32, not timed below) {prep:.1f} s")
    print(f"training epoch  sprites-cpu, {len(xs)} seqs, batch {cfg.batch_size}, {len(starts)} steps"
          f"{'' if a.train_steps is None else f' (scaled from {len(steps)})'}: {train_t:7.1f} s")
    print(f"judge protocol  {res['n']} test seqs x {res['repeats']} repeats (both directions, both swaps, IS/H): "
          f"{eval_t:7.1f} s")
    print(f"ratio protocol / epoch = {eval_t / train_t:.3f}  ({'faster' if eval_t < train_t else 'SLOWER'} than one epoch)")


if __name__ == '__main__':
    main()
