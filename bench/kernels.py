"""Fused Triton kernels vs eager PyTorch for DBSE's hot-path ops (`sub_first`, `gauss_kl`).

On a GPU: `triton.testing.do_bench` medians, forward and forward+backward, over a range of batch sizes at the
Sprites preset's widths (T=8, g=f=z=256), with the achieved GB/s (bytes counted by
`seqdis_nb.kernels.hot_path_traffic` over the median time) and the floor those bytes set at 3 TB/s (H100).

    python bench/kernels.py                 # GPU
    python bench/kernels.py --smoke         # any machine; the default without CUDA: the interpreter, tiny sizes

The smoke run executes the same code end to end in Triton's CPU interpreter; its timings are wall-clock medians
of interpreted numpy code and say nothing about GPU speed. (`do_bench` flushes the L2 cache before every run, so
the GPU times are cold-cache, as the byte counts assume.)
"""
import argparse, os, statistics, sys, time

import torch

if not torch.cuda.is_available(): os.environ.setdefault('TRITON_INTERPRET', '1')   # before triton is imported

FLOOR_BYTES_PER_S = 3e12          # H100 SXM, measured device-to-device copy bandwidth (about 3 TB/s)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--smoke', action='store_true', help='tiny sizes in the interpreter (the default without CUDA)')
    p.add_argument('--batch', type=int, nargs='+', default=None, help='batch sizes (default: 32 128 512 2048)')
    p.add_argument('--dtype', choices=['float32', 'float16', 'bfloat16'], default='float32')
    return p.parse_args(argv)


def cpu_median_ms(fn, reps=1):
    "Median wall-clock milliseconds of `fn` over `reps` calls after a warm-up call: the smoke run's timer."
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter(); fn(); times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main(argv=None) -> int:
    args = parse_args(argv)
    from seqdis_nb import kernels as K
    from seqdis_nb.ops import gauss_kl_ref, sub_first_ref

    smoke = args.smoke or not torch.cuda.is_available()
    if smoke and not (K.INTERPRETED or torch.cuda.is_available()):
        print('the smoke run needs TRITON_INTERPRET=1 set before triton is imported', file=sys.stderr); return 2
    dev = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    dtype = getattr(torch, args.dtype)
    if smoke: T, g, f, z, batches = 3, 37, 21, 5, args.batch or [2, 4]
    else: T, g, f, z, batches = 8, 256, 256, 256, args.batch or [32, 128, 512, 2048]
    if smoke:
        timer = cpu_median_ms
        print('SMOKE RUN: Triton interpreter on the CPU, tiny sizes; times are interpreter wall-clock, not GPU speed')
    else:
        from triton.testing import do_bench
        timer = lambda fn: do_bench(fn, return_mode='median')
        print(f'GPU: {torch.cuda.get_device_name()}; do_bench medians')
    print(f'T={T} g={g} f={f} z={z} {args.dtype}; floor = fused bytes / {FLOOR_BYTES_PER_S / 1e12:.0f} TB/s')

    ops = {'sub_first': (sub_first_ref, K.sub_first_triton), 'gauss_kl': (gauss_kl_ref, K.gauss_kl_triton)}
    print(f"{'op':<10}{'pass':<9}{'B':>6}{'eager ms':>11}{'fused ms':>11}{'speedup':>9}"
          f"{'eager GB/s':>12}{'fused GB/s':>12}{'floor us':>10}{'of floor':>10}")
    gen = torch.Generator().manual_seed(0)
    for B in batches:
        traffic = K.hot_path_traffic(B, T, g, f, z, dtype)
        ins = K.hot_path_inputs(B, T, g, f, z, dtype, device='cpu', generator=gen)
        for op, (eager, fused) in ops.items():
            x = [t.detach().to(dev).requires_grad_(t.requires_grad) for t in ins[op]]
            want, got = eager(*x), fused(*x)
            ups = [torch.randn(o.shape, generator=gen, dtype=torch.float32).to(dev, dtype) for o in want]
            leaves = [t for t in x if t.requires_grad]
            tol = 1e-4 if dtype == torch.float32 else 3e-2
            grads = zip(torch.autograd.grad(want, leaves, ups), torch.autograd.grad(got, leaves, ups))
            for a, b in list(zip(want, got)) + list(grads):
                a, b = a.detach().float(), b.detach().float()
                err = float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))
                if not err < tol: print(f'{op} B={B}: fused differs from eager (rel err {err:.2e})'); return 1
            for name, bytes_of in (('fwd', lambda t: t.fwd_bytes), ('fwd+bwd', lambda t: t.nbytes)):
                def run(fn):
                    def fwd():
                        with torch.no_grad(): return fn(*x)
                    return fwd if name == 'fwd' else lambda: torch.autograd.grad(fn(*x), leaves, ups)
                te, tf = timer(run(eager)), timer(run(fused))
                be, bf = bytes_of(traffic[op, 'eager']), bytes_of(traffic[op, 'fused'])
                floor_us = bf / FLOOR_BYTES_PER_S * 1e6
                print(f"{op:<10}{name:<9}{B:>6}{te:>11.4f}{tf:>11.4f}{te / tf:>8.2f}x"
                      f"{be / te / 1e6:>12.2f}{bf / tf / 1e6:>12.2f}{floor_us:>10.3f}{floor_us / (tf * 1e3):>9.1%}")
    print('fused matches eager on every op, batch size and gradient')
    return 0


if __name__ == '__main__':
    sys.exit(main())
