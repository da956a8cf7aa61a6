"""DistributedDataParallel training on CPU with gloo: 2 processes on this machine.

The multi-process runs start this file as a script (`python tests/test_ddp.py worker ...`) with the variables torchrun
sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), or the `seqdis train` CLI the same way."""
import json, os, shutil, signal, socket, subprocess, sys, time, types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS, BATCH = 3, 16           # steps per epoch, global batch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def rank_env(rank, world_size, port, **extra):
    e = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR='127.0.0.1',
             MASTER_PORT=str(port), OMP_NUM_THREADS='1', **extra)
    e['PYTHONPATH'] = str(ROOT) + os.pathsep + e.get('PYTHONPATH', '')
    return e


def start(cmd, world_size, **extra):
    "Start `cmd` once per rank with the variables torchrun sets (world_size 1: a plain process, no RANK)."
    port = free_port()
    envs = ([dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', ''),
                  OMP_NUM_THREADS='1')] if world_size == 1 else
            [rank_env(r, world_size, port, **extra) for r in range(world_size)])
    return [subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for e in envs]


def finish(procs, timeout=300):
    "Wait for every rank; [(returncode, stdout, stderr)] by rank."
    try: outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None: p.kill(); p.wait()
    return [(p.returncode, *o) for p, o in zip(procs, outs)]


def launch(cmd, world_size, **extra):
    return finish(start(cmd, world_size, **extra))


def start_workers(out, world_size, epochs, variants=('frozen',), resume=False):
    """Train each of `variants` to `epochs` epochs into `out/VARIANT` with `world_size` processes (1: a plain
    `Trainer`); each rank saves its state_dict after every epoch. `collect` waits and loads them."""
    args = [sys.executable, __file__, 'worker', str(out), ','.join(variants), str(epochs), str(int(resume))]
    return out, world_size, epochs, variants, start(args, world_size)


def collect(job):
    "{variant: {epoch: [state_dict of each rank]}} of a finished `start_workers` job."
    out, world_size, epochs, variants, procs = job
    for r, (code, _, err) in enumerate(finish(procs)): assert code == 0, f"rank {r} failed:\n{err[-3000:]}"
    have = lambda v, e: all((out / v / f'rank{r}_e{e}.pt').exists() for r in range(world_size))
    return {v: {e: [torch.load(out / v / f'rank{r}_e{e}.pt', weights_only=True) for r in range(world_size)]
                for e in range(1, epochs + 1) if have(v, e)} for v in variants}


def run_workers(*args, **kw): return collect(start_workers(*args, **kw))


def close(a: dict, b: dict, rtol=1e-4, atol=1e-6):
    "Parameters and buffers of two state_dicts equal to float32 tolerance."
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            assert torch.allclose(a[k], b[k], rtol=rtol, atol=atol), (k, float((a[k] - b[k]).abs().max()))
        else: assert torch.equal(a[k], b[k]), k


def identical(states):
    for s in states[1:]:
        for k in states[0]: assert torch.equal(states[0][k], s[k]), f"{k} differs between the ranks"


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """Started together: the reference (one process, global batch 16, no sampling noise, 3 epochs; BatchNorm frozen
    (eval-style) or per batch) and the same for 1 epoch on 2 ranks of 8 sequences each."""
    one, two = tmp_path_factory.mktemp('one'), tmp_path_factory.mktemp('two')
    jobs = start_workers(one, 1, 3, ('frozen', 'batchnorm')), start_workers(two, 2, 1, ('frozen', 'batchnorm'))
    return {'one': (one, collect(jobs[0])), 'two': (two, collect(jobs[1]))}

@pytest.fixture(scope='module')
def one_process(runs): return runs['one']

@pytest.fixture(scope='module')
def two_ranks(runs): return runs['two']


def test_two_ranks_stay_identical_and_match_one_process(one_process, two_ranks):
    (ref_dir, ref), (out, two) = one_process, two_ranks
    identical(two['frozen'][1])                                       # parameters and buffers, bitwise
    close(two['frozen'][1][0], ref['frozen'][1][0])                   # float32 tolerance: sums run in another order
    m = json.loads((out / 'frozen' / 'metrics.json').read_text())
    r = json.loads((ref_dir / 'frozen' / 'metrics.json').read_text())
    assert m['world_size'] == 2 and m['batch_size'] == BATCH and m['local_batch_size'] == BATCH // 2
    assert m['steps'] == list(range(1, STEPS + 1))
    assert torch.allclose(torch.tensor(m['step_loss']), torch.tensor(r['step_loss'][:STEPS]), rtol=1e-5)  # global means
    assert m['epochs'][0]['val']['loss'] == pytest.approx(r['epochs'][0]['val']['loss'], rel=1e-5)


def test_per_rank_batchnorm_differs_from_one_process(one_process, two_ranks):
    "Default BatchNorm normalises each rank's half-batch: ranks agree, but the 1-process run is not reproduced."
    identical(two_ranks[1]['batchnorm'][1])
    with pytest.raises(AssertionError): close(two_ranks[1]['batchnorm'][1][0], one_process[1]['batchnorm'][1][0])


def test_resume_across_world_sizes(one_process, two_ranks, tmp_path):
    "2 ranks for epoch 1, then 1 process for epoch 2, then 2 ranks for epoch 3 == 3 epochs in one process."
    shutil.copytree(two_ranks[0] / 'frozen', tmp_path / 'frozen')     # epoch 1 on 2 ranks
    run_workers(tmp_path, 1, 2, resume=True)
    last = run_workers(tmp_path, 2, 3, resume=True)['frozen'][3]
    identical(last)
    close(last[0], one_process[1]['frozen'][3][0])
    m = json.loads((tmp_path / 'frozen' / 'metrics.json').read_text())
    assert m['steps'] == list(range(1, 3 * STEPS + 1)) and [r['epoch'] for r in m['epochs']] == [1, 2, 3]
    assert m['world_size'] == 2


def cli_train(out, *extra):
    return [sys.executable, '-m', 'seqdis_nb.cli', 'train', '--dataset', 'shapes', '--preset', 'shapes-quick',
            '--size', '16', '--batch-size', str(BATCH), '--out', str(out), '--device', 'cpu', '--threads', '1',
            '--quiet', *map(str, extra)]


@pytest.mark.parametrize('victim,sig', [(1, signal.SIGKILL),
                                        pytest.param(0, signal.SIGKILL, marks=pytest.mark.slow),
                                        pytest.param(1, signal.SIGSTOP, marks=pytest.mark.slow)])
def test_lost_rank_ends_the_job_with_an_error(tmp_path, victim, sig):
    """SIGKILL one rank mid-run: the survivor stops at once with a message naming the last checkpoint. SIGSTOP (a
    hung rank): the survivor gives up after --dist-timeout seconds instead of hanging."""
    port, out, timeout = free_port(), tmp_path / 'run', 15
    cmd = cli_train(out, '--epochs', 50, '--checkpoint-every', 1, '--dist-timeout', timeout)
    procs = [subprocess.Popen(cmd, env=rank_env(r, 2, port), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for r in range(2)]
    try:
        t0 = time.time()
        while not (out / 'last.pt').exists():
            assert time.time() - t0 < 180, 'no checkpoint after 180 s'
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.2)
        procs[victim].send_signal(sig)
        t1 = time.time()
        _, err = procs[1 - victim].communicate(timeout=timeout + 90)
        waited = time.time() - t1
    finally:
        for p in procs:
            if p.poll() is None: p.kill(); p.wait()
    assert procs[1 - victim].returncode == 4, err[-2000:]
    assert 'the distributed job failed' in err and f'rank {1 - victim} of 2' in err and '--resume' in err, err[-2000:]
    if sig == signal.SIGKILL: assert waited < timeout, f"the survivor needed {waited:.0f} s to notice a dead peer"
    else: assert timeout - 1 < waited < timeout + 60, f"the survivor gave up after {waited:.0f} s"


@pytest.mark.slow
def test_cli_rejects_bad_distributed_settings(tmp_path):
    res = launch(cli_train(tmp_path / 'odd', '--epochs', 1, '--batch-size', 15), 2)
    for code, _, err in res: assert code == 2 and 'multiple of the world size 2' in err, err[-2000:]
    res = launch(cli_train(tmp_path / 'sbn', '--epochs', 1, '--sync-bn'), 2)
    for code, _, err in res: assert code == 2 and 'sync_bn needs CUDA' in err, err[-2000:]


@pytest.mark.slow
def test_spyl_trains_on_two_ranks(tmp_path):
    "SPYL (MI and contrastive terms over the local batch) through DDP: every parameter gets its all-reduced gradient."
    cmd = cli_train(tmp_path / 'spyl', '--model', 'spyl', '--epochs', 2, '--steps-per-epoch', 2)
    res = launch(cmd, 2)
    for code, _, err in res: assert code == 0, err[-3000:]
    m = json.loads((tmp_path / 'spyl' / 'metrics.json').read_text())
    assert m['kind'] == 'spyl' and m['world_size'] == 2 and m['steps'] == [1, 2, 3, 4]
    assert {'mi', 'nce_s', 'nce_d'} <= set(m['epochs'][-1]['train'])


@pytest.mark.slow
def test_nan_on_one_rank_stops_every_rank(tmp_path):
    run_workers(tmp_path, 2, 1, ('nan',))
    err = [(tmp_path / 'nan' / f'rank{r}.err').read_text() for r in range(2)]
    assert all('non-finite loss at step 2' in e and "term 'loss'" in e for e in err), err
    assert 'on another rank' in err[0] and 'on this rank' in err[1], err
    assert not (tmp_path / 'nan' / 'last.pt').exists()


def test_env_seeds_and_syncbn_in_process():
    from seqdis_nb.distributed import DistEnv, rank_seed, sync_batchnorm
    from seqdis_nb.train import build_model
    assert DistEnv.from_environ({}) == DistEnv(0, 1, 0) and not DistEnv().distributed
    e = DistEnv.from_environ(dict(RANK='3', WORLD_SIZE='4', LOCAL_RANK='1', MASTER_ADDR='h', MASTER_PORT='1'))
    assert (e.rank, e.world_size, e.local_rank, e.distributed, e.is_main) == (3, 4, 1, True, False)
    for bad, msg in (({'RANK': '0'}, 'must both be set'), ({'RANK': 'x', 'WORLD_SIZE': '2'}, 'RANK must be an integer'),
                     ({'RANK': '2', 'WORLD_SIZE': '2'}, 'rank must be < world_size'),
                     ({'RANK': '0', 'WORLD_SIZE': '2'}, 'MASTER_ADDR')):
        with pytest.raises(ValueError, match=msg): DistEnv.from_environ(bad)
    seeds = {rank_seed(0, r, s) for r in range(1, 5) for s in (0, 10)} | {rank_seed(1, 1)}
    assert len(seeds) == 9 and all(0 <= x < 2**63 for x in seeds)
    m = build_model('dbse', 'shapes-quick', image_size=16)
    keys = list(m.state_dict())
    with pytest.raises(ValueError, match='sync_bn needs CUDA'): sync_batchnorm(m, 'cpu')
    s = torch.nn.SyncBatchNorm.convert_sync_batchnorm(m)           # what sync_batchnorm does on CUDA
    assert s is m and list(s.state_dict()) == keys                 # checkpoints load into a plain model
    sbn = [x for x in s.modules() if isinstance(x, torch.nn.SyncBatchNorm)]
    assert len(sbn) == 5


def test_every_syncbatchnorm_runs_as_a_module_on_the_fast_path():
    "DBSE's fast path (03a_speed) applies some BatchNorms functionally: converted ones must still run as modules."
    from seqdis_nb.train import build_model
    torch.manual_seed(0); plain = build_model('dbse', 'shapes-quick', image_size=16)
    torch.manual_seed(0); conv = torch.nn.SyncBatchNorm.convert_sync_batchnorm(build_model('dbse', 'shapes-quick',
                                                                                            image_size=16))
    assert conv.config.fast
    called = set()
    for name, m in conv.named_modules():
        if isinstance(m, torch.nn.SyncBatchNorm): m.register_forward_hook(lambda m, i, o, name=name: called.add(name))
    x = torch.rand(4, 8, 3, 16, 16)
    torch.manual_seed(1); a = plain.training_loss(x)[0]
    torch.manual_seed(1); b = conv.training_loss(x)[0]          # no process group: SyncBatchNorm is BatchNorm
    assert called == {n for n, m in conv.named_modules() if isinstance(m, torch.nn.SyncBatchNorm)} and len(called) == 5
    assert torch.allclose(a, b, rtol=1e-6)


# ---------------------------------------------------------------------------------------------- the worker process
def _worker(out, variants, epochs, resume):
    torch.set_num_threads(1)
    from torch import nn
    import seqdis_nb.dbse as dbse
    from seqdis_nb.core import seed_everything
    from seqdis_nb.data import make_shapes
    from seqdis_nb.distributed import DistributedTrainer, launch as run
    from seqdis_nb.train import NonFiniteLossError, Trainer, build_model
    # no sampling noise: the loss is a function of the batch alone, so 2 x 8 sequences and 1 x 16 can agree
    dbse.reparameterize = lambda mean, logvar, random=True, generator=None: mean
    dbse.DBSE._randn = lambda self, shape, generator: torch.zeros(shape, device=next(self.parameters()).device)
    data = make_shapes(size=16)

    def main(env, device):
        for variant in variants:
            seed_everything(0)
            model = build_model('dbse', 'shapes-quick', image_size=16)
            if variant == 'frozen':    # BatchNorm with its running statistics (eval-style) even while training
                for m in model.modules():
                    if isinstance(m, nn.BatchNorm2d):
                        m.train = types.MethodType(lambda self, mode=True: nn.Module.train(self, False), m)
            if variant == 'nan' and env.rank == 1:      # rank 1's loss turns NaN at its 2nd step
                real, calls = model.training_loss, []
                def poisoned(x, epoch=0, n_data=None):
                    loss, terms = real(x, epoch=epoch, n_data=n_data); calls.append(1)
                    return (loss * float('nan') if len(calls) == 2 else loss), terms
                model.training_loss = poisoned
            kw = dict(batch_size=BATCH, seed=3, device='cpu', steps_per_epoch=STEPS, val_batches=1, progress=False)
            cls, kw = (DistributedTrainer, dict(kw, env=env)) if env.distributed else (Trainer, kw)
            tr = cls(model, data, out / variant, **kw)
            if variant == 'nan':
                try: tr.fit(1)
                except NonFiniteLossError as e: (out / variant / f'rank{env.rank}.err').write_text(str(e))
                continue
            done = tr.epoch if resume and tr.resume() else 0
            for e in range(done + 1, epochs + 1):
                tr.fit(e, resume=resume or e > 1)
                torch.save(tr.model.state_dict(), out / variant / f'rank{env.rank}_e{e}.pt')
    run(main)


if __name__ == '__main__' and sys.argv[1] == 'worker':
    _worker(Path(sys.argv[2]), sys.argv[3].split(','), int(sys.argv[4]), bool(int(sys.argv[5])))
