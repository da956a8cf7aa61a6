"""Training throughput (sequences/s) of one process against 2 DistributedDataParallel ranks on this CPU (gloo).

Times `train_step` of DBSE `shapes-quick` (32x32 Shapes, T=8) at one global batch in three layouts:

    1 proc x 1 thread      the baseline
    1 proc x 2 threads     torch's intra-op threads on both cores
    2 ranks x 1 thread     DDP: each rank half the batch, gradients all-reduced over loopback gloo

    python bench/ddp_throughput.py                    # 20 timed steps after 3 warm-up steps, global batch 32
    python bench/ddp_throughput.py --steps 3 --warmup 1 --batch 8     # a smoke run
    python bench/ddp_throughput.py --only 0 2                          # skip 1 proc x 2 threads

Each layout runs in fresh processes (ranks started with the variables torchrun sets), on the same batches in the
same order. The rate is the global batch times the timed steps over rank 0's wall time, the ranks meeting at a
barrier before and after; it includes the all-reduce and the loss all-reduce of every step. The 2-rank layout
also times one all-reduce of a gradient-sized float32 tensor alone (median of 11). On a shared machine the
numbers move with the load: the script prints the load average next to them.
"""
import argparse, json, os, socket, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = [('1 proc x 1 thread', 1, 1), ('1 proc x 2 threads', 1, 2), ('2 ranks x 1 thread', 2, 1)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--steps', type=int, default=20, help='timed steps per layout')
    p.add_argument('--warmup', type=int, default=3, help='untimed steps first')
    p.add_argument('--batch', type=int, default=32, help='global batch (even)')
    p.add_argument('--preset', default='shapes-quick')
    p.add_argument('--json', help='also write the results to this file')
    p.add_argument('--only', type=int, nargs='+', choices=range(len(LAYOUTS)), help='run these layouts (0 1 2)')
    p.add_argument('--rounds', type=int, default=1, help='run the layouts in turn this many times; report medians')
    p.add_argument('--worker', nargs=2, metavar=('THREADS', 'OUT'), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.steps < 1 or a.warmup < 0 or a.batch < 2 or a.batch % 2:
        p.error('--steps >= 1, --warmup >= 0 and an even --batch >= 2 are needed')
    return a


def worker(a):
    "One process of a layout: build the trainer, run warm-up + timed steps, rank 0 writes the timing as JSON."
    import torch
    threads, out = int(a.worker[0]), Path(a.worker[1])
    torch.set_num_threads(threads)
    import torch.distributed as dist
    from seqdis_nb.core import seed_everything
    from seqdis_nb.data import make_shapes
    from seqdis_nb.distributed import DistEnv, DistributedTrainer, launch
    from seqdis_nb.train import Trainer, build_model, prepare_batch

    def main(env, device):
        seed_everything(0)
        model = build_model('dbse', a.preset)
        data = make_shapes(size=model.config.image_size)
        n_steps = a.warmup + a.steps
        kw = dict(batch_size=a.batch, device='cpu', steps_per_epoch=n_steps, progress=False)
        tr = (DistributedTrainer(model, data, out, env=env, **kw) if env.distributed
              else Trainer(model, data, out, **kw))
        xs = [prepare_batch(data.train.batch(idx), tr.device) for idx in tr.batches(0)]
        sync = dist.barrier if env.distributed else (lambda: None)
        for x in xs[:a.warmup]: tr.train_step(x)
        sync(); t0 = time.perf_counter()
        for x in xs[a.warmup:]: tr.train_step(x)
        sync(); wall = time.perf_counter() - t0
        n_par = sum(p.numel() for p in model.parameters())
        ar_ms = None
        if env.distributed:       # what DDP adds per step: one all-reduce of every gradient (float32) over gloo
            g, times = torch.zeros(n_par), []
            for _ in range(11):
                sync(); t = time.perf_counter(); dist.all_reduce(g); times.append(time.perf_counter() - t)
            ar_ms = 1e3 * sorted(times)[5]
        if env.is_main:
            out.write_text(json.dumps({'world_size': env.world_size, 'threads': threads, 'steps': a.steps,
                                       'batch': a.batch, 'wall_s': wall, 'seqs_per_s': a.steps * a.batch / wall,
                                       'step_ms': 1e3 * wall / a.steps, 'params': n_par, 'allreduce_ms': ar_ms}))
    launch(main)


def run_layout(a, ranks, threads, out):
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    cmd = [sys.executable, __file__, '--worker', str(threads), str(out), '--steps', str(a.steps), '--warmup',
           str(a.warmup), '--batch', str(a.batch), '--preset', a.preset]
    base = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', ''),
                OMP_NUM_THREADS=str(threads))
    envs = [base] if ranks == 1 else [dict(base, RANK=str(r), WORLD_SIZE=str(ranks), LOCAL_RANK=str(r),
                                           MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port)) for r in range(ranks)]
    procs = [subprocess.Popen(cmd, env=e) for e in envs]
    codes = [p.wait() for p in procs]
    if any(codes): raise SystemExit(f"layout {ranks} x {threads} failed: exit codes {codes}")
    return json.loads(out.read_text())


def main(argv=None):
    a = parse_args(argv)
    if a.worker: return worker(a)
    import tempfile
    tmp = Path(tempfile.mkdtemp())
    print(f"DBSE {a.preset}, global batch {a.batch}, {a.warmup} warm-up + {a.steps} timed steps, {os.cpu_count()} "
          f"CPU(s); load average before: {os.getloadavg()[0]:.1f}")
    runs = {}
    for k in range(a.rounds):      # the layouts in turn, so a change of the machine's load hits all of them
        for name, ranks, threads in [l for i, l in enumerate(LAYOUTS) if a.only is None or i in a.only]:
            load = os.getloadavg()[0]
            r = run_layout(a, ranks, threads, tmp / f'{ranks}x{threads}.json')
            r.update(layout=name, load_before=load, round=k)
            runs.setdefault(name, []).append(r)
            ar = f"; gradient all-reduce {r['allreduce_ms']:.1f} ms" if r['allreduce_ms'] is not None else ''
            print(f"  {name:<20} {r['seqs_per_s']:8.1f} sequences/s  ({r['step_ms']:.0f} ms a step{ar}; load "
                  f"average {load:.1f})", flush=True)
    rows = [sorted(rs, key=lambda r: r['seqs_per_s'])[len(rs) // 2] for rs in runs.values()]   # median run
    if a.rounds > 1: print('medians: ' + ', '.join(f"{r['layout']} {r['seqs_per_s']:.1f}" for r in rows))
    base = rows[0]['seqs_per_s']
    print(f'speed-up over {rows[0]["layout"]}: ' + ', '.join(f"{r['layout']} {r['seqs_per_s'] / base:.2f}x"
                                                            for r in rows[1:]))
    if a.json: Path(a.json).write_text(json.dumps(runs, indent=1))
    return rows


if __name__ == '__main__':
    main()
