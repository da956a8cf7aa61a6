"""A DBSE training step (forward + loss + backward + Adam), fast path against the plain eager path, on the CPU.

For each preset: the step's FLOPs (`torch.utils.flop_counter`), then rounds of interleaved timings in one process —
a fp32 matmul, then one step of each variant on the same batch — so that every variant and the matmul see the same
machine load. Prints per variant the median (and best) seconds per step, sequences/s, achieved GFLOP/s and its
fraction of the matmul rate, the speed-up over the plain step (median of the per-round ratios), and the peak RSS
(VmHWM) of the variant run alone in a fresh subprocess. The load average is printed beside the numbers.

    python bench/train_step.py                      # sprites and sprites-cpu, batch 32, plain vs fast
    python bench/train_step.py --ablation           # plus the cumulative steps from plain to fast (what bought what)
    python bench/train_step.py --profile            # torch.profiler table of one step per variant (sprites)
    python bench/train_step.py --smoke              # tiny preset, batch 4, 2 rounds, 1 thread: the script end to end

Variants (the same weights, the same input, the same posterior noise per round):
  plain          DBSEConfig(fast=False): the readable spec of 03_dbse
  channels-last  the plain modules with channels-last weights and frames
  +4x4-gemms     the fast encoder/decoder: channels-last, the 4x4 ends as matmuls, the blocks at the 4x4 map as
                 GEMMs, the second decode skipped where provably equal (eval mode); the prior still a loop
  fast           ... and the teacher-forced prior as one torch.lstm call: DBSEConfig(fast=True), the default
"""
import argparse, json, os, statistics, subprocess, sys, time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))

from seqdis_nb.dbse import DBSE, DBSEConfig  # noqa: E402

CL = torch.channels_last


class ChannelsLast(DBSE):
    "The plain path (config.fast=False) with channels-last conv weights and frames; modules called as in 03_dbse."
    def __init__(self, config):
        super().__init__(config)
        for m in self.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                m.weight.data = m.weight.data.contiguous(memory_format=CL)
    def _features(self, x):
        B, T = x.shape[:2]
        return self.encoder(x.reshape(B * T, *x.shape[2:]).contiguous(memory_format=CL)).view(B, T, -1)
    def _decode(self, s, d):
        B, T = d.shape[:2]
        c = torch.cat([d, s.unsqueeze(1).expand(B, T, s.shape[-1])], dim=-1)    # (B, T, z + f)
        return self.decoder(c.reshape(B * T, -1)).reshape(B, T, *self.config.frame_shape)


class LoopPrior(DBSE):
    "The fast path (config.fast=True) with the plain path's teacher-forced prior loop."
    def prior(self, d):
        fast_cfg = self.config
        self.config = replace(fast_cfg, fast=False)      # DBSE.prior reads only config.fast: run its loop
        try: return super().prior(d)
        finally: self.config = fast_cfg


VARIANTS = {'plain': (DBSE, False), 'channels-last': (ChannelsLast, False), '+4x4-gemms': (LoopPrior, True),
            'fast': (DBSE, True)}


def build(variant: str, preset: str, seed: int = 0) -> DBSE:
    "The variant's model on `preset`, weights drawn from `seed` (the same for every variant)."
    cls, fast = VARIANTS[variant]
    torch.manual_seed(seed)
    return cls(DBSEConfig.preset(preset, fast=fast)).train()


def make_step(model: DBSE, x: torch.Tensor):
    opt = torch.optim.Adam(model.parameters(), model.config.lr)
    def step(seed: int):
        torch.manual_seed(seed)                        # the same posterior noise for every variant in a round
        opt.zero_grad(set_to_none=True)
        loss, _ = model.training_loss(x)
        loss.backward()
        opt.step()
        return float(loss.detach())
    return step


def batch(preset: str, B: int, seed: int = 0) -> torch.Tensor:
    cfg = DBSEConfig.preset(preset)
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, cfg.seq_len, *cfg.frame_shape, generator=g)   # (B, T, C, H, W) in [0, 1]


def step_flops(variant: str, preset: str, x: torch.Tensor) -> int:
    "FLOPs of one training step (forward + backward; Adam's elementwise work is not counted)."
    from torch.utils.flop_counter import FlopCounterMode
    step = make_step(build(variant, preset), x)
    with FlopCounterMode(display=False) as fc: step(0)
    return fc.get_total_flops()


def matmul_timer(n: int):
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    def run() -> float:
        t = time.perf_counter(); a @ b; return time.perf_counter() - t
    return run, 2 * n ** 3


def load() -> str:
    return ' '.join(f'{v:.2f}' for v in os.getloadavg())


def peak_rss_mb(variant: str, preset: str, B: int, threads: int) -> float:
    "VmHWM of a fresh process that builds the variant and runs two steps (see `child`)."
    cmd = [sys.executable, __file__, '--child', variant, '--preset', preset, '--batch', str(B),
           '--threads', str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=1800)
    return json.loads(out.stdout.strip().splitlines()[-1])['vmhwm_mb']


def child(variant: str, preset: str, B: int, threads: int) -> int:
    torch.set_num_threads(threads)
    step = make_step(build(variant, preset), batch(preset, B))
    step(0); step(1)
    status = Path('/proc/self/status').read_text()
    kb = int(next(l for l in status.splitlines() if l.startswith('VmHWM:')).split()[1])
    print(json.dumps({'variant': variant, 'vmhwm_mb': kb / 1024}))
    return 0


def profile_step(variant: str, preset: str, B: int, rows: int = 15) -> None:
    "Print where one training step goes: torch.profiler's operators by self CPU time, after a warm-up step."
    from torch.profiler import profile
    step = make_step(build(variant, preset), batch(preset, B))
    step(0)
    with profile() as prof: step(1)
    print(f'\n{preset} / {variant}: one step, operators by self CPU time (load {load()})')
    print(prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=rows))


def bench_preset(preset: str, variants: list[str], B: int, rounds: int, threads: int, matmul_n: int,
                 rss: bool) -> list[dict]:
    x = batch(preset, B)
    flops = {v: step_flops(v, preset, x) for v in ('plain', 'fast')}
    if flops['plain'] != flops['fast']:
        print(f'  note: FlopCounterMode counts plain {flops["plain"] / 1e9:.3f} G, fast {flops["fast"] / 1e9:.3f} G (the difference is '
              f'work it does not see: the fused torch.lstm, GEMMs written with out=); rates use the plain count')
    steps = {v: make_step(build(v, preset), x) for v in variants}
    mm, mm_flops = matmul_timer(matmul_n)
    losses = {v: steps[v](0) for v in variants}                    # warm-up (oneDNN primitive caches, allocator)
    ref = losses['plain']
    for v, l in losses.items():
        if abs(l - ref) > 1e-4 * abs(ref): raise SystemExit(f'{v}: warm-up loss {l} differs from plain {ref}')
    times = {v: [] for v in variants}; mm_times = []
    print(f'  load before: {load()}')
    for r in range(rounds):
        mm_times.append(mm())
        for v in variants:
            t = time.perf_counter(); steps[v](r + 1); times[v].append(time.perf_counter() - t)
        print(f'  round {r + 1}: matmul {mm_times[-1] * 1e3:.0f} ms, ' +
              ', '.join(f'{v} {times[v][-1]:.2f} s' for v in variants) + f'; load {load()}', flush=True)
    print(f'  load after:  {load()}')
    mm_rate = mm_flops / statistics.median(mm_times)
    rows = []
    for v in variants:
        med, best = statistics.median(times[v]), min(times[v])
        ratio = statistics.median(p / f for p, f in zip(times['plain'], times[v]))
        rate = flops['plain'] / med
        rows.append(dict(preset=preset, variant=v, s_per_step=med, best=best, seq_per_s=B / med, gflops=rate / 1e9,
                         of_matmul=rate / mm_rate, speedup=ratio,
                         peak_rss_mb=peak_rss_mb(v, preset, B, threads) if rss else float('nan')))
    print(f'  {preset}: step = {flops["plain"] / 1e9:.1f} GFLOP (forward + backward); '
          f'fp32 matmul {matmul_n}^3 in the same rounds: {mm_rate / 1e9:.0f} GFLOP/s (median of {rounds})')
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--preset', nargs='+', default=None, help='presets (default: sprites sprites-cpu)')
    p.add_argument('--batch', type=int, default=32)
    p.add_argument('--rounds', type=int, default=7, help='timed rounds after one warm-up step (median reported)')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--ablation', action='store_true', help='also time the cumulative steps from plain to fast')
    p.add_argument('--no-compare', action='store_true', help='time the fast step only (no plain variant)')
    p.add_argument('--no-rss', action='store_true', help='skip the peak-RSS subprocesses')
    p.add_argument('--profile', action='store_true', help='print a torch.profiler table of one step per variant')
    p.add_argument('--smoke', action='store_true', help='tiny preset, batch 4, 2 rounds, 1 thread: the script end to end')
    p.add_argument('--json', type=Path, default=None, help='also write the rows to this file')
    p.add_argument('--child', choices=list(VARIANTS), default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child: return child(args.child, args.preset[0], args.batch, args.threads)
    if args.batch < 1 or args.rounds < 1 or args.threads < 1:
        p.error('--batch, --rounds and --threads must be >= 1')
    if args.smoke: presets, args.batch, args.rounds, args.threads, matmul_n = ['shapes-quick'], 4, 2, 1, 256
    else: presets, matmul_n = args.preset or ['sprites', 'sprites-cpu'], 2048
    variants = list(VARIANTS) if args.ablation else (['fast'] if args.no_compare else ['plain', 'fast'])
    if 'plain' not in variants: variants = ['plain'] + variants      # the reference for losses and ratios
    torch.set_num_threads(args.threads)
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}, '
          f'batch {args.batch}, {args.rounds} rounds; load average (1, 5, 15 min): {load()}'
          + ('  [SMOKE RUN: tiny preset, the numbers mean nothing]' if args.smoke else ''))
    if args.profile:
        for preset in (args.preset or ['sprites']) if not args.smoke else presets:
            for v in variants: profile_step(v, preset, args.batch)
        return 0
    rows = []
    for preset in presets: rows += bench_preset(preset, variants, args.batch, args.rounds, args.threads, matmul_n,
                                                not args.no_rss)
    print(f"\n| preset | variant | s/step (median) | best | seq/s | GFLOP/s | of matmul | speed-up vs plain | peak RSS MB |")
    print('|---|---|---:|---:|---:|---:|---:|---:|---:|')
    for r in rows:
        print(f"| {r['preset']} | {r['variant']} | {r['s_per_step']:.3f} | {r['best']:.3f} | {r['seq_per_s']:.1f} | "
              f"{r['gflops']:.0f} | {r['of_matmul']:.0%} | {r['speedup']:.2f}x | {r['peak_rss_mb']:.0f} |")
    print(f'load average at the end: {load()}')
    if args.json: args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
