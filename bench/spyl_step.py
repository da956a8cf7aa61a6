"""Seconds per training step, SPYL vs DBSE, at the same batch size and the same preset name.

One step = `training_loss` forward, backward and an Adam update on a random batch. DBSE is timed on its default
fast path (03a_speed) and on the plain path (`fast=False`, the same code path SPYL's shared methods take). SPYL is
timed twice: during the warm-up (epoch 0: reconstruction, KLs and MI only) and after it (epoch = nce_start_epoch:
also the views bank of 4B generated sequences and the two sample-and-predict views). All models are timed in one run, interleaved, so
they see the same machine load; the load average (`uptime`) is printed before and after.

    python bench/spyl_step.py                       # sprites and sprites-cpu presets, batch 32, 1 thread
    python bench/spyl_step.py --presets sprites-cpu --batch 64 --reps 5 --threads 2
    python bench/spyl_step.py --smoke               # tiny preset, one repetition: checks that the script runs
"""
import argparse, os, statistics, subprocess, sys, time

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--presets', nargs='+', default=['sprites', 'sprites-cpu'])
    p.add_argument('--batch', type=int, default=32)
    p.add_argument('--reps', type=int, default=3, help='timed steps per model (median reported), after 1 warm-up')
    p.add_argument('--threads', type=int, default=1, help='torch CPU threads (the machine is shared)')
    p.add_argument('--device', default=None, help='default: seqdis_nb.core.get_device()')
    p.add_argument('--smoke', action='store_true', help='shapes-quick, batch 4, 1 rep')
    return p.parse_args(argv)


def load() -> str:
    "The load averages, as `uptime` prints them (read from /proc/loadavg when uptime is absent)."
    try: return subprocess.run(['uptime'], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return 'load average: ' + ', '.join(open('/proc/loadavg').read().split()[:3])


def make_step(model, x, epoch):
    opt = torch.optim.Adam(model.parameters(), lr=model.config.lr)
    def step():
        loss, _ = model.training_loss(x, epoch=epoch, n_data=9000)
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        if x.device.type == 'cuda': torch.cuda.synchronize()
    return step


def main(argv=None) -> int:
    args = parse_args(argv)
    from seqdis_nb.core import get_device
    from seqdis_nb.dbse import DBSE
    from seqdis_nb.spyl import SPYL
    if args.smoke: args.presets, args.batch, args.reps = ['shapes-quick'], 4, 1
    if args.batch < 1 or args.reps < 1 or args.threads < 1:
        print('--batch, --reps and --threads must be >= 1', file=sys.stderr); return 2
    torch.set_num_threads(args.threads)
    dev = get_device(args.device)
    print(f'device {dev}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {args.batch}, '
          f'median of {args.reps} step(s) after 1 warm-up')
    print('before:', load())
    rows = []
    for preset in args.presets:
        torch.manual_seed(0)
        dbse, spyl = DBSE(preset).to(dev), SPYL(preset).to(dev)
        plain = DBSE(DBSE.config_class.preset(preset, fast=False)).to(dev)
        x = torch.rand(args.batch, dbse.config.seq_len, *dbse.config.frame_shape, device=dev)
        steps = {'dbse': make_step(dbse, x, 0), 'dbse plain': make_step(plain, x, 0),
                 'spyl warm-up': make_step(spyl, x, 0),
                 'spyl +views': make_step(spyl, x, spyl.config.nce_start_epoch)}
        for fn in steps.values(): fn()                            # warm-up
        times = {k: [] for k in steps}
        for _ in range(args.reps):                                # interleaved: the same load for all four
            for k, fn in steps.items():
                t = time.perf_counter(); fn(); times[k].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append((preset, med))
    print('after: ', load())
    print(f"\n{'s/step':<14}{'DBSE':>8}{'DBSE plain':>12}{'SPYL warm-up':>14}{'SPYL +views':>13}"
          f"{'warm-up/DBSE':>14}{'+views/DBSE':>13}{'+views/plain':>14}")
    for preset, med in rows:
        d, p = med['dbse'], med['dbse plain']
        print(f"{preset:<14}{d:>8.3f}{p:>12.3f}{med['spyl warm-up']:>14.3f}{med['spyl +views']:>13.3f}"
              f"{med['spyl warm-up'] / d:>14.2f}{med['spyl +views'] / d:>13.2f}{med['spyl +views'] / p:>14.2f}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
