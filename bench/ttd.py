"""Time to disentangle on CPU: train DBSE on 32x32 Sprites for a wall-clock budget, keep a checkpoint every few
minutes, then judge every checkpoint with the paper protocol (issue 8 part 3).

    python bench/ttd.py train --seed 0 --out runs/ttd/seed0 --minutes 30 --every 3 --threads 1
    python bench/ttd.py eval  --runs runs/ttd/seed0 runs/ttd/seed1 ... \\
                              --judge <SEQDIS_CACHE>/judges/sprites32.pt --stride 8 --repeats 1 --out curve.json
    python bench/ttd.py plot  --curve curve*.json --png curve.png        # the curve and its Markdown table
    python bench/ttd.py report --checkpoint .../seed0/ck_10.pt --judge ... --stride 8 --repeats 5 --out report
    python bench/ttd.py confusion --checkpoint .../seed*/ck_10.pt --judge ... --repeats 5 --out confusion.json

`train` runs `Trainer.train_step` in a plain loop (no per-epoch validation pass, so every second goes to training)
and, each time `--every` more minutes of wall time have passed since the first step, writes `ck_NN.pt` (a normal
trainer checkpoint) and appends its wall minutes, process CPU minutes (`time.process_time`, all threads), step and
the machine load (`os.getloadavg`) to `log.json`. Both clocks count training only (not loading the data).
`eval` judges checkpoints on the test split (held-out characters; `--stride N`: every N-th sequence) in the two
paper-protocol modes the criterion needs (`criterion_generations`), `--repeats` times with evaluation generators;
`report` writes the full `seqdis eval` report (`evaluate`, all four modes, IS/entropies, MSD) of one checkpoint;
`confusion` the judged-vs-true action confusion with s resampled (and of the reconstructions), split into motion and
direction. `train --set w_kl_s=4 ...` overrides fields of the preset's config; `train --model spyl` trains the SPYL baseline.
"""
import argparse, json, os, sys, time
from pathlib import Path

import numpy as np
import torch

from seqdis_nb.core import seed_everything
from seqdis_nb.data import load_dataset
from seqdis_nb.train import Trainer, build_model, load_model, prepare_batch


def train_for(tr: Trainer, minutes: float, every: float, log: dict, say=print) -> dict:
    """Run `tr.train_step` over the epochs' batches until `minutes` of wall time have passed; each `every` minutes
    write `ck_NN.pt` into `tr.out_dir` and append its row to `log['checkpoints']` (and `log.json`). Returns `log`."""
    out = tr.out_dir
    out.mkdir(parents=True, exist_ok=True)
    log.setdefault('checkpoints', [])
    w0, c0 = time.perf_counter(), time.process_time()
    k, losses = 1, []
    while True:
        for idx in tr.batches(tr.epoch):
            terms = tr.train_step(prepare_batch(tr.data.train.batch(idx), tr.device))
            losses.append(terms['loss'])
            wall = (time.perf_counter() - w0) / 60
            if wall >= k * every or wall >= minutes:
                path = tr.save(out / f'ck_{k:02d}.pt')
                row = {'k': k, 'file': path.name, 'wall_min': wall, 'cpu_min': (time.process_time() - c0) / 60,
                       'step': tr.step, 'epoch': tr.epoch, 'loss': float(np.mean(losses[-50:])),
                       'load': os.getloadavg()}
                log['checkpoints'].append(row)
                (out / 'log.json').write_text(json.dumps(log, indent=1))
                say(f"seed {tr.seed}: {path.name} wall {wall:.2f} min, cpu {row['cpu_min']:.2f} min, step {tr.step}, "
                    f"loss {row['loss']:.1f}, load {row['load'][0]:.1f}")
                k += 1
                if wall >= minutes: return log
        tr.epoch += 1


def parse_override(kv: str) -> tuple:
    "'w_kl_s=4' -> ('w_kl_s', 4.0): a DBSEConfig field and a number (int if it has no point) or a word."
    k, sep, v = kv.partition('=')
    if not sep or not k: raise ValueError(f"--set takes field=value, got {kv!r}")
    for conv in (int, float):
        try: return k, conv(v)
        except ValueError: pass
    return k, {'true': True, 'false': False}.get(v.lower(), v)


def cmd_train(a) -> int:
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    if (out / 'log.json').exists(): raise ValueError(f"{out} already holds a run (log.json): choose another --out")
    seed_everything(a.seed)
    model = build_model(a.model, a.preset, **dict(parse_override(kv) for kv in a.set))
    size = model.config.image_size
    data = load_dataset('sprites', size=size)
    tr = Trainer(model, data, out, seed=a.seed, dataset='sprites', progress=False)
    log = {'model': a.model, 'preset': a.preset, 'overrides': a.set, 'config': model.config.to_dict(), 'seed': a.seed, 'threads': a.threads,
           'batch_size': tr.batch_size, 'lr': tr.lr, 'minutes': a.minutes, 'every': a.every, 'checkpoints': [],
           'load_start': os.getloadavg()}
    print(f"seed {a.seed}: {a.model} {a.preset} on sprites {size}x{size}, {len(data.train)} train sequences, batch "
          f"{tr.batch_size}, {a.threads} thread(s); load {os.getloadavg()}", flush=True)
    train_for(tr, a.minutes, a.every, log, say=lambda m: print(m, flush=True))
    return 0


def criterion_generations(model, judge, split, generator, batch_size: int = 128) -> dict:
    """The two modes of the paper protocol that the criterion needs, as `evaluate._generate` makes them: judge
    accuracy per factor for 'fix_dynamics' (posterior means of d kept, s ~ N(0, I)) and 'fix_static' (posterior
    mean of s kept, d from the prior rollout means), against the source labels of `split`."""
    from seqdis_nb.evaluate import _labels, _model_input
    y, dev = _labels(split), next(model.parameters()).device
    hits = {m: np.zeros(len(judge.factors)) for m in ('fix_dynamics', 'fix_static')}
    model.eval(); judge.eval()
    with torch.inference_mode():
        for a in range(0, len(split), batch_size):
            idx = np.arange(a, min(a + batch_size, len(split)))
            x = _model_input(model, split, idx, dev)
            gen = {'fix_dynamics': model.fix_dynamics_sample_static(x, generator=generator),
                   'fix_static': model.fix_static_sample_dynamics(x, generator=generator, prior_means=True)}
            for m, v in gen.items():
                for j, l in enumerate(judge(v.clamp(0, 1))): hits[m][j] += (l.argmax(-1).cpu().numpy() == y[idx, j]).sum()
    return {m: {f: float(h[j] / len(split)) for j, f in enumerate(judge.factors)} for m, h in hits.items()}


def action_confusion(model, judge, split, generator, batch_size: int = 128) -> dict:
    """Confusion matrices (true, judged) of the dynamic factor (Sprites action, label 3 * motion + direction) for
    'fix_dynamics' (d's posterior means kept, s ~ N(0, I): the criterion's dynamic half) and 'recon' (both posterior
    means kept), on every sequence of `split`: {mode: int array (K, K)}."""
    from seqdis_nb.evaluate import _labels, _model_input
    y, dev, K = _labels(split)[:, 0], next(model.parameters()).device, judge.classes[0]
    out = {m: np.zeros((K, K), np.int64) for m in ('fix_dynamics', 'recon')}
    model.eval(); judge.eval()
    with torch.inference_mode():
        for a in range(0, len(split), batch_size):
            idx = np.arange(a, min(a + batch_size, len(split)))
            x = _model_input(model, split, idx, dev)
            post = model.encode(x, generator=generator)
            s_new = torch.randn(post.s_mean.shape, generator=generator, device=generator.device).to(dev)
            gen = {'fix_dynamics': model.decode(s_new, post.d_mean), 'recon': model.decode(post.s_mean, post.d_mean)}
            for m, v in gen.items():
                np.add.at(out[m], (y[idx], judge(v.clamp(0, 1))[0].argmax(-1).cpu().numpy()), 1)
    return out


def confusion_summary(C: np.ndarray) -> dict:
    "Accuracy of the 9 Sprites actions, and of their motion (label // 3) and direction (label % 3) parts alone."
    C = np.asarray(C); k = np.arange(len(C))
    same = lambda f: C[f(k)[:, None] == f(k)[None, :]].sum() / C.sum()
    return {'action': float(np.trace(C) / C.sum()), 'motion': float(same(lambda v: v // 3)),
            'direction': float(same(lambda v: v % 3))}


def eval_point(model, judge, split, repeats: int, seed: int) -> dict:
    "`criterion_generations` with generators seeded seed..seed+repeats-1: {mode: {factor: {mean, std}}}."
    from seqdis_nb.core import make_generator
    from seqdis_nb.evaluate import _mean_std
    runs = [criterion_generations(model, judge, split, make_generator(seed + r)) for r in range(repeats)]
    return {m: {f: _mean_std([r[m][f] for r in runs]) for f in judge.factors} for m in runs[0]}


def test_subset(size: int, stride: int):
    "Every `stride`-th test sequence (held-out characters), in order."
    test = load_dataset('sprites', size=size).test
    return test if stride == 1 else test.subset(range(0, len(test), stride))


def cmd_eval(a) -> int:
    from seqdis_nb.judge import check_judge, load_judge
    torch.set_num_threads(a.threads)
    judge = load_judge(a.judge)
    out = Path(a.out)
    res = json.loads(out.read_text()) if out.exists() else {'points': []}
    done = {(p['run'], p['file'], p['repeats'], p['n']) for p in res['points']}
    size = judge.config.image_size
    test, t_end = test_subset(size, a.stride), time.time() + 60 * a.wait
    check_judge(judge, test.info, size)
    while True:
        todo = []
        for run in map(Path, a.runs):
            log = json.loads((run / 'log.json').read_text()) if (run / 'log.json').exists() else {'checkpoints': []}
            for c in log['checkpoints']:
                if a.files and c['file'].removesuffix('.pt') not in a.files: continue
                if (str(run), c['file'], a.repeats, len(test)) in done: continue
                todo.append((run, log, c))
        if not todo:
            if time.time() > t_end: return 0
            time.sleep(20); continue
        for run, log, c in todo:
            model = load_model(run / c['file'])
            t0 = time.perf_counter()
            acc = eval_point(model, judge, test, a.repeats, a.seed)
            pt = {'run': str(run), 'seed': log['seed'], 'file': c['file'], 'wall_min': c['wall_min'],
                  'cpu_min': c['cpu_min'], 'step': c['step'], 'repeats': a.repeats, 'n': len(test), 'stride': a.stride,
                  'dynamic_factors': judge.factors[:judge.n_dynamic], 'dyn_acc': acc['fix_dynamics'], 'static_acc': acc['fix_static'],
                  'eval_seconds': time.perf_counter() - t0, 'load': os.getloadavg()}
            res['points'].append(pt); done.add((pt['run'], pt['file'], pt['repeats'], pt['n']))
            res['judge_test_accuracy'] = judge.meta.get('test_accuracy')
            out.write_text(json.dumps(res, indent=1))
            d, s = criterion(pt)
            print(f"seed {log['seed']} {c['file']} ({c['wall_min']:.1f} wall / {c['cpu_min']:.1f} cpu min, step "
                  f"{c['step']}, {a.repeats} rep, {len(test)} seqs): action (s resampled) {100 * d:.1f} %, min static "
                  f"(d resampled) {100 * s:.1f} % [{pt['eval_seconds']:.0f} s]", flush=True)
        if a.wait <= 0: return 0


def cmd_confusion(a) -> int:
    """The action confusion (`action_confusion`) of each `--checkpoint` on the test split, `--repeats` generators
    (seeded seed, seed + 1, ...; matrices summed), written to `--out` with the motion / direction split."""
    from seqdis_nb.core import make_generator
    from seqdis_nb.judge import check_judge, load_judge
    torch.set_num_threads(a.threads)
    judge = load_judge(a.judge)
    test = test_subset(judge.config.image_size, a.stride)
    check_judge(judge, test.info, judge.config.image_size)
    res = {'n': len(test), 'stride': a.stride, 'repeats': a.repeats, 'seed': a.seed, 'classes': judge.classes[0],
           'checkpoints': {}}
    for ck in a.checkpoint:
        model = load_model(ck)
        runs = [action_confusion(model, judge, test, make_generator(a.seed + r)) for r in range(a.repeats)]
        row = {m: {'matrix': sum(r[m] for r in runs).tolist(),
                   'per_repeat': [confusion_summary(r[m]) for r in runs]} for m in runs[0]}
        for m in row: row[m]['summary'] = confusion_summary(np.array(row[m]['matrix']))
        res['checkpoints'][str(ck)] = row
        Path(a.out).write_text(json.dumps(res, indent=1))
        f = lambda m: ', '.join(f"{k} {100 * v:.1f} %" for k, v in row[m]['summary'].items())
        print(f"{ck}: s resampled: {f('fix_dynamics')} | reconstruction: {f('recon')}", flush=True)
    return 0


def cmd_report(a) -> int:
    """The full evaluation report (`seqdis eval`'s evaluate + write_report) on the strided test split of the best of
    the `--checkpoint` candidates: the one whose run scores the highest min(criterion) at its latest point in the
    `--curve` files (the first candidate without them). `--wait`: poll up to that many minutes for the candidates."""
    from seqdis_nb.evaluate import evaluate, make_figures, report_markdown, write_report
    from seqdis_nb.judge import load_judge
    torch.set_num_threads(a.threads)
    judge = load_judge(a.judge)
    test = test_subset(judge.config.image_size, a.stride)
    cands, t_end = [Path(c) for c in a.checkpoint], time.time() + 60 * a.wait
    while not all(c.exists() for c in cands):
        if time.time() > t_end: raise FileNotFoundError(f"checkpoints missing after {a.wait} min: {[str(c) for c in cands if not c.exists()]}")
        time.sleep(20)
    best = cands[0]
    if a.curve and len(cands) > 1:
        pts, _ = load_points(a.curve)
        def score(c):
            mine = [p for p in pts if Path(p['run']) == c.parent]
            return min(criterion(max(mine, key=lambda p: (p['wall_min'], p['repeats'])))) if mine else -1
        best = max(cands, key=score)
    model = load_model(best)
    res = evaluate(model, judge, test, repeats=a.repeats, seed=a.seed)
    res['checkpoint'], res['stride'], res['candidates'] = str(best), a.stride, [str(c) for c in cands]
    write_report(res, a.out, None if a.no_figures else make_figures(model, test, seed=a.seed, tsne_n=a.tsne_n))
    print(report_markdown(res))
    return 0


def criterion(pt) -> tuple:
    "(min dynamic-factor accuracy with s resampled, min static-factor accuracy with d resampled) of a curve point."
    dyn = min(pt['dyn_acc'][f]['mean'] for f in pt['dynamic_factors'])
    sta = min(pt['static_acc'][f]['mean'] for f in pt['static_acc'] if f not in pt['dynamic_factors'])
    return dyn, sta


def table(points) -> str:
    "Markdown table of the curve: one row per evaluated checkpoint."
    dyn = points[0]['dynamic_factors']
    sta = [f for f in points[0]['static_acc'] if f not in dyn]
    L = ['| seed | checkpoint | wall min | CPU min | step | test seqs × repeats | ' +
         ' | '.join(f'{f}, s resampled (%)' for f in dyn) + ' | ' + ' | '.join(f'{f}, d resampled (%)' for f in sta) +
         ' | all ≥ 90 % |', '|---' * (7 + len(dyn) + len(sta)) + '|']
    for p in sorted(points, key=lambda p: (p['seed'], p['wall_min'], p['repeats'])):
        ok = min(criterion(p)) >= 0.9
        L.append(f"| {p['seed']} | {p['file']} | {p['wall_min']:.1f} | {p['cpu_min']:.2f} | {p['step']} | "
                 f"{p['n']} × {p['repeats']} | " + ' | '.join(_pm(p['dyn_acc'][f]) for f in dyn) + ' | ' +
                 ' | '.join(_pm(p['static_acc'][f]) for f in sta) + f" | {'yes' if ok else 'no'} |")
    return '\n'.join(L)


def _pm(v) -> str: return f"{100 * v['mean']:.1f}" + (f" ± {100 * v['std']:.1f}" if v['std'] else '')


def seed_spread(points) -> dict:
    "Mean ± std over seeds of the criterion numbers at each seed's last checkpoint (its most-repeated evaluation)."
    last = {}
    for p in points:
        q = last.get(p['seed'])
        if q is None or (p['wall_min'], p['repeats']) > (q['wall_min'], q['repeats']): last[p['seed']] = p
    c = np.array([criterion(p) for p in last.values()])          # (seeds, 2)
    return {'seeds': sorted(last), 'wall_min': float(np.mean([p['wall_min'] for p in last.values()])),
            'cpu_min': float(np.mean([p['cpu_min'] for p in last.values()])),
            'dynamic': (float(c[:, 0].mean()), float(c[:, 0].std(ddof=1)) if len(c) > 1 else 0.),
            'min_static': (float(c[:, 1].mean()), float(c[:, 1].std(ddof=1)) if len(c) > 1 else 0.)}


def plot(points):
    import matplotlib.pyplot as plt
    fig, axs = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, clock in zip(axs, ('wall_min', 'cpu_min')):
        for i, seed in enumerate(sorted({p['seed'] for p in points})):
            ps = sorted((p for p in points if p['seed'] == seed), key=lambda p: p[clock])
            # one point per checkpoint: the final-repeats evaluation when there are two
            by = {}
            for p in ps: by[p['file']] = max(by.get(p['file'], p), p, key=lambda q: q['repeats'])
            ps = sorted(by.values(), key=lambda p: p[clock])
            x = [p[clock] for p in ps]
            ax.plot(x, [100 * criterion(p)[0] for p in ps], 'o-', color=f'C{i}', label=f'seed {seed}: dynamic (s resampled)')
            ax.plot(x, [100 * criterion(p)[1] for p in ps], 's--', color=f'C{i}', label=f'seed {seed}: min static (d resampled)')
        ax.axhline(90, color='k', lw=0.8, ls=':')
        for chance in (100 / 9, 100 / 6):                          # Sprites: 9 actions, 6 classes per static factor
            ax.axhline(chance, color='gray', lw=0.6, ls='-.')
        ax.text(ax.get_xlim()[0], 90.5, ' target 90 %', fontsize=7, va='bottom')
        ax.text(ax.get_xlim()[0], 17.5, ' chance: 1/6 static, 1/9 action', fontsize=7, va='bottom', color='gray')
        ax.set(xlabel='training minutes (' + ('wall' if clock == 'wall_min' else 'process CPU') + ')',
               ylabel='judge accuracy (%)', ylim=(0, 101))
    axs[0].legend(fontsize=6)
    fig.suptitle('DBSE on 32x32 Sprites, held-out test characters (judge accuracy vs training time)', fontsize=9)
    fig.tight_layout()
    return fig


def load_points(paths) -> tuple:
    "The curve points of several `eval --out` files (e.g. one per process), and the judge's own test accuracy."
    res = [json.loads(Path(p).read_text()) for p in paths]
    return [p for r in res for p in r['points']], res[0]['judge_test_accuracy']


def cmd_plot(a) -> int:
    pts, _ = load_points(a.curve)
    fig = plot(pts); fig.savefig(a.png, dpi=90)
    print(table(pts))
    return 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    sub = p.add_subparsers(dest='cmd', required=True)
    t = sub.add_parser('train')
    t.add_argument('--seed', type=int, default=0)
    t.add_argument('--out', required=True)
    t.add_argument('--model', default='dbse', choices=['dbse', 'spyl'])
    t.add_argument('--preset', default='sprites-cpu')
    t.add_argument('--minutes', type=float, default=30.0, help='wall-clock training budget')
    t.add_argument('--every', type=float, default=3.0, help='minutes of wall time between checkpoints')
    t.add_argument('--threads', type=int, default=1)
    t.add_argument('--set', nargs='*', default=[], metavar='FIELD=VALUE', help='DBSEConfig overrides, e.g. w_kl_s=4')
    e = sub.add_parser('eval')
    e.add_argument('--runs', nargs='+', required=True)
    e.add_argument('--judge', required=True)
    e.add_argument('--out', required=True, help='curve json (extended in place: done points are skipped)')
    e.add_argument('--repeats', type=int, default=1)
    e.add_argument('--files', nargs='*', help='checkpoint names to judge, e.g. ck_02 ck_10 (default: all)')
    e.add_argument('--stride', type=int, default=1, help='judge every N-th test sequence (default: all of them)')
    e.add_argument('--wait', type=float, default=0, help='keep polling the runs for new checkpoints for this many minutes')
    e.add_argument('--seed', type=int, default=0, help='evaluation generator seed (repeat r uses seed + r)')
    e.add_argument('--threads', type=int, default=1)
    r = sub.add_parser('report')
    r.add_argument('--checkpoint', nargs='+', required=True, help='candidate checkpoints (the best is reported)')
    r.add_argument('--curve', nargs='*', help='eval --out files used to choose among the candidates')
    r.add_argument('--wait', type=float, default=0, help='minutes to wait for the candidates to exist')
    r.add_argument('--judge', required=True)
    r.add_argument('--out', required=True)
    r.add_argument('--repeats', type=int, default=5)
    r.add_argument('--stride', type=int, default=1)
    r.add_argument('--seed', type=int, default=0)
    r.add_argument('--threads', type=int, default=1)
    r.add_argument('--tsne-n', type=int, default=300)
    r.add_argument('--no-figures', action='store_true')
    c = sub.add_parser('confusion')
    c.add_argument('--checkpoint', nargs='+', required=True)
    c.add_argument('--judge', required=True)
    c.add_argument('--out', required=True)
    c.add_argument('--repeats', type=int, default=1)
    c.add_argument('--stride', type=int, default=1)
    c.add_argument('--seed', type=int, default=0)
    c.add_argument('--threads', type=int, default=1)
    q = sub.add_parser('plot')
    q.add_argument('--curve', nargs='+', required=True, help='one or more eval --out files')
    q.add_argument('--png', required=True)
    return p.parse_args(argv)


if __name__ == '__main__':
    a = parse_args()
    sys.exit({'train': cmd_train, 'eval': cmd_eval, 'report': cmd_report, 'plot': cmd_plot,
              'confusion': cmd_confusion}[a.cmd](a))
