"""DistributedDataParallel training on CPU with gloo: 2 processes on this machine.

The multi-process runs start this file as a script (`python tests/test_ddp.py worker ...`) with the variables torchrun
sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), or the `seqdis train` CLI the same way."""
import json, os, signal, socket, subprocess, sys, time, types
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


def launch(cmd, world_size, timeout=240, **extra):
    "Start `cmd` once per rank, as torchrun would; wait for all; return [(returncode, stdout, stderr)] by rank."
    port = free_port()
    procs = [subprocess.Popen(cmd, env=rank_env(r, world_size, port, **extra), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(world_size)]
    try: outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None: p.kill()
    return [(p.returncode, *o) for p, o in zip(procs, outs)]


def worker(cmd=(sys.executable, __file__, 'worker')):
    return list(cmd)


def run_workers(out, world_size, epochs, variant='frozen', resume=False):
    "Train `variant` for `epochs` epochs into `out` with `world_size` processes; each rank saves rank{r}.pt."
    args = worker() + [str(out), variant, str(epochs), str(int(resume))]
    if world_size == 1:   # one plain process, no process group: the reference a DDP run must reproduce
        res = [subprocess.run(args, env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1'),
                              capture_output=True, text=True, timeout=240)]
        res = [(r.returncode, r.stdout, r.stderr) for r in res]
    else: res = launch(args, world_size)
    for r, (code, _, err) in enumerate(res): assert code == 0, f"rank {r} failed:\n{err[-3000:]}"
    return [torch.load(out / f'rank{r}.pt', weights_only=True) for r in range(world_size)]


def close(a: dict, b: dict, rtol=1e-4, atol=1e-6):
    "Parameters and buffers of two state_dicts equal to float32 tolerance; returns the largest difference."
    assert a.keys() == b.keys()
    worst = 0.
    for k in a:
        if a[k].is_floating_point():
            assert torch.allclose(a[k], b[k], rtol=rtol, atol=atol), (k, (a[k] - b[k]).abs().max())
            worst = max(worst, float((a[k] - b[k]).abs().max()))
        else: assert torch.equal(a[k], b[k]), k
    return worst


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    "One process, global batch 16, frozen BatchNorm, no sampling noise: 1 epoch and (separately) 3 epochs."
    one, three = tmp_path_factory.mktemp('ref1'), tmp_path_factory.mktemp('ref3')
    return {'dir': one, 1: run_workers(one, 1, 1)[0], 3: run_workers(three, 1, 3)[0]}


def test_two_ranks_stay_identical_and_match_one_process(reference, tmp_path):
    r0, r1 = run_workers(tmp_path / 'frozen', 2, 1)
    for k in r0: assert torch.equal(r0[k], r1[k]), f"{k} differs between the ranks"       # bitwise
    close(r0, reference[1])                   # to float32 tolerance: the batch sums run in another order
    m = json.loads((tmp_path / 'frozen' / 'metrics.json').read_text())
    ref = json.loads((reference['dir'] / 'metrics.json').read_text())
    assert m['world_size'] == 2 and m['batch_size'] == BATCH and m['local_batch_size'] == BATCH // 2
    assert m['steps'] == ref['steps'] == list(range(1, STEPS + 1))
    assert torch.allclose(torch.tensor(m['step_loss']), torch.tensor(ref['step_loss']), rtol=1e-5)   # global means
    assert m['epochs'][0]['val']['loss'] == pytest.approx(ref['epochs'][0]['val']['loss'], rel=1e-5)


def test_per_rank_batchnorm_differs_from_one_process(reference, tmp_path):
    "Default BatchNorm normalises each rank's half-batch: ranks still agree, but the 1-process run is not reproduced."
    r0, r1 = run_workers(tmp_path / 'bn', 2, 1, variant='batchnorm')
    for k in r0: assert torch.equal(r0[k], r1[k]), k
    ref = run_workers(tmp_path / 'bn1', 1, 1, variant='batchnorm')[0]
    with pytest.raises(AssertionError): close(r0, ref)


def test_resume_across_world_sizes(reference, tmp_path):
    "2 ranks for epoch 1, 1 process for epoch 2, 2 ranks for epoch 3 == 3 epochs in one process."
    out = tmp_path / 'chain'
    run_workers(out, 2, 1)
    run_workers(out, 1, 2, resume=True)
    r0, r1 = run_workers(out, 2, 3, resume=True)
    for k in r0: assert torch.equal(r0[k], r1[k]), k
    close(r0, reference[3])
    m = json.loads((out / 'metrics.json').read_text())
    assert m['steps'] == list(range(1, 3 * STEPS + 1)) and [r['epoch'] for r in m['epochs']] == [1, 2, 3]


def cli_train(out, *extra):
    return [sys.executable, '-m', 'seqdis_nb.cli', 'train', '--dataset', 'shapes', '--preset', 'shapes-quick',
            '--size', '16', '--batch-size', str(BATCH), '--out', str(out), '--device', 'cpu', '--threads', '1',
            '--quiet', *map(str, extra)]


@pytest.mark.parametrize('victim', [1, 0])
def test_killed_rank_ends_the_job_with_an_error(tmp_path, victim):
    "SIGKILL one rank mid-run: the survivor stops with a message naming the last checkpoint, well within the timeout."
    port, out = free_port(), tmp_path / 'run'
    cmd = cli_train(out, '--epochs', 50, '--checkpoint-every', 1, '--dist-timeout', 60)
    procs = [subprocess.Popen(cmd, env=rank_env(r, 2, port), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for r in range(2)]
    try:
        t0 = time.time()
        while not (out / 'last.pt').exists():
            assert time.time() - t0 < 180, 'no checkpoint after 180 s'
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.2)
        procs[victim].send_signal(signal.SIGKILL)
        t1 = time.time()
        _, err = procs[1 - victim].communicate(timeout=90)
        waited = time.time() - t1
    finally:
        for p in procs:
            if p.poll() is None: p.kill()
    assert procs[1 - victim].returncode == 4, err[-2000:]
    assert 'the distributed job failed' in err and f'rank {1 - victim} of 2' in err and '--resume' in err, err[-2000:]
    assert waited < 45, f"the survivor needed {waited:.0f} s to give up"


def test_cli_rejects_bad_distributed_settings(tmp_path):
    res = launch(cli_train(tmp_path / 'odd', '--epochs', 1, '--batch-size', 15), 2)
    for code, _, err in res: assert code == 2 and 'multiple of the world size 2' in err, err[-2000:]
    res = launch(cli_train(tmp_path / 'sbn', '--epochs', 1, '--sync-bn'), 2)
    for code, _, err in res: assert code == 2 and 'sync_bn needs CUDA' in err, err[-2000:]


# ---------------------------------------------------------------------------------------------- the worker process
def _worker(out, variant, epochs, resume):
    torch.set_num_threads(1)
    from torch import nn
    import seqdis_nb.dbse as dbse
    from seqdis_nb.core import seed_everything
    from seqdis_nb.data import make_shapes
    from seqdis_nb.distributed import DistEnv, DistributedTrainer, launch as run
    from seqdis_nb.train import Trainer, build_model
    # no sampling noise: the loss is a function of the batch alone, so 2 x 8 sequences and 1 x 16 can agree
    dbse.reparameterize = lambda mean, logvar, random=True, generator=None: mean
    dbse.DBSE._randn = lambda self, shape, generator: torch.zeros(shape, device=next(self.parameters()).device)
    data = make_shapes(size=16)

    def main(env, device):
        seed_everything(0)
        model = build_model('dbse', 'shapes-quick', image_size=16)
        if variant == 'frozen':    # BatchNorm with its running statistics (eval-style) even while training
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.train = types.MethodType(lambda self, mode=True: nn.Module.train(self, False), m)
        kw = dict(batch_size=BATCH, seed=3, device='cpu', steps_per_epoch=STEPS, val_batches=1, progress=False)
        tr = DistributedTrainer(model, data, out, env=env, **kw) if env.distributed else Trainer(model, data, out, **kw)
        tr.fit(epochs, resume=resume)
        torch.save(tr.model.state_dict(), Path(out) / f'rank{env.rank}.pt')
    run(main)


if __name__ == '__main__' and sys.argv[1] == 'worker':
    _worker(Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), bool(int(sys.argv[5])))
