"""Seconds per training step and sequences per second of the trainer's step (forward, loss, backward, Adam).

Times `Trainer.train_step` on batches of real-shaped input for each preset (default: DBSE `sprites` and
`sprites-cpu` at batch 32): the median over `--steps` timed steps after `--warmup` untimed ones. The input is
uniform noise of the preset's frame shape (a step's cost does not depend on pixel values); the host-to-device copy
of the batch is included, as in training. Prints the machine load (`os.getloadavg`) before and after, since on a
shared machine it moves the numbers more than anything else; the CPU seconds per step (`time.process_time`, all
threads of this process) are what the step costs without contention: with `--threads 1` they are the s/step a
dedicated core would give.

    python bench/trainer_steps.py                                   # sprites, sprites-cpu; batch 32; torch's threads
    python bench/trainer_steps.py --threads 1 --presets shapes-quick --steps 5
"""
import argparse, os, statistics, sys, tempfile, time

import numpy as np
import torch

from seqdis_nb.core import get_device, seed_everything
from seqdis_nb.data import DataBundle, DatasetInfo, SeqSplit
from seqdis_nb.train import Trainer, build_model, prepare_batch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--model', default='dbse')
    p.add_argument('--presets', nargs='+', default=['sprites', 'sprites-cpu'])
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--steps', type=int, default=5, help='timed steps (the median is reported)')
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--threads', type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument('--device', help='default: $SEQDIS_DEVICE, else CUDA when available')
    return p.parse_args(argv)


def noise_bundle(frame_shape, n, T, seed=0) -> DataBundle:
    "A DataBundle of n random uint8 videos (or float sequences) of the given frame shape: input for timing only."
    rng = np.random.default_rng(seed)
    if len(frame_shape) == 3:
        C, H, W = frame_shape
        info = DatasetInfo('noise', 'video', [], [], [], [], T, frame_shape)
        x = rng.integers(0, 256, (n, T, H, W, C), dtype=np.uint8)
    else:
        info = DatasetInfo('noise', 'sequence', [], [], [], [], T, frame_shape)
        x = rng.standard_normal((n, T, *frame_shape)).astype(np.float32)
    split = SeqSplit(x, np.zeros((n, 0)), -np.ones(n), np.arange(n), info)
    return DataBundle(split, split, split, info)


def bench_preset(kind, preset, batch_size, steps, warmup, device):
    seed_everything(0)
    model = build_model(kind, preset, batch_size=batch_size)
    data = noise_bundle(model.config.frame_shape, batch_size * (steps + warmup), model.config.seq_len)
    with tempfile.TemporaryDirectory() as out:
        tr = Trainer(model, data, out, device=device, steps_per_epoch=steps + warmup, progress=False)
        times, cpu = [], []
        for i, idx in enumerate(tr.batches(0)):
            t, c = time.perf_counter(), time.process_time()
            tr.train_step(prepare_batch(data.train.batch(idx), tr.device))
            if tr.device.type == 'cuda': torch.cuda.synchronize(tr.device)
            if i >= warmup: times.append(time.perf_counter() - t); cpu.append(time.process_time() - c)
    n_par = sum(p.numel() for p in model.parameters())
    return n_par, statistics.median(times), times, statistics.median(cpu)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads: torch.set_num_threads(args.threads)
    dev = get_device(args.device)
    print(f'device {dev}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} CPUs, '
          f'load average before {os.getloadavg()[0]:.2f}')
    print(f"{'preset':<14}{'params':>12}{'batch':>7}{'s/step':>9}{'seq/s':>8}{'CPU s/step':>12}   "
          "all timed steps (wall s)")
    for preset in args.presets:
        n_par, med, times, cpu = bench_preset(args.model, preset, args.batch_size, args.steps, args.warmup, dev)
        print(f"{preset:<14}{n_par:>12,}{args.batch_size:>7}{med:>9.3f}{args.batch_size / med:>8.1f}{cpu:>12.3f}   "
              + ' '.join(f'{t:.2f}' for t in times), flush=True)
    print(f'load average after {os.getloadavg()[0]:.2f}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
