"""Crash anywhere, lose nothing: `seqdis train` is SIGKILLed at many points (at random moments and inside checkpoint
writes), resumed each time, and must end bit for bit where an uninterrupted run ends; no checkpoint on disk is ever
unreadable. A failing write (full disk, unwritable folder) stops training with a message and keeps the last one."""
import errno, json, os, random, select, signal, subprocess, sys, textwrap, time
from pathlib import Path

import pytest
import torch

from seqdis_nb.train import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]

# A fork server: imports torch and the package once, then forks one child per request and runs `seqdis train` in
# it (`seqdis_nb.cli.main`, what the console script runs). Each child is a separate process the test SIGKILLs; a
# resume is a new child, which knows nothing of the killed one but what is on disk. Forking spares the ~5 s
# interpreter + torch start-up per kill point, which keeps the default test within its time budget.
ZYGOTE = textwrap.dedent(r'''
    import io, json, os, sys, time, traceback
    import torch
    import seqdis_nb.cli, seqdis_nb.train, seqdis_nb.dbse, seqdis_nb.data
    print(json.dumps({'ready': True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            rc = 1
            try:
                fd = os.open(req['log'], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
                os.dup2(fd, 1); os.dup2(fd, 2)
                hang = req.get('hang')        # {'file': 'last.pt', 'call': k, 'marker': path}: freeze inside a write
                if hang:
                    real, seen = torch.save, [0]
                    def save(obj, f, *a, **k):
                        target = os.readlink(f'/proc/self/fd/{f.fileno()}')        # the temporary file
                        if os.path.basename(target).startswith('.' + hang['file'] + '.'):
                            seen[0] += 1
                            if seen[0] == hang['call']:
                                buf = io.BytesIO(); real(obj, buf); b = buf.getvalue()
                                f.write(b[:len(b) // 2]); f.flush(); os.fsync(f.fileno())   # half written
                                open(hang['marker'], 'w').close()
                                time.sleep(600)
                        return real(obj, f, *a, **k)
                    torch.save = save
                if req.get('steps'):            # report each optimizer step taken (atomically, for the test)
                    step = seqdis_nb.train.Trainer.train_step
                    def reported_step(self, x):
                        out = step(self, x)
                        with open(req['steps'] + '.tmp', 'w') as f: f.write(str(self.step))
                        os.replace(req['steps'] + '.tmp', req['steps'])
                        return out
                    seqdis_nb.train.Trainer.train_step = reported_step
                rc = seqdis_nb.cli.main(req['argv'])
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush(); sys.stderr.flush()
                os._exit(rc if isinstance(rc, int) else 1)
        print(json.dumps({'pid': pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({'exit': os.waitstatus_to_exitcode(status)}), flush=True)
''')


class Server:
    "Talks to the fork server: `start(argv)` returns the child's pid, `wait()` its exit code (-9: SIGKILLed)."
    def __init__(self, tmp):
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', ''), MPLBACKEND='Agg')
        (tmp / 'zygote.py').write_text(ZYGOTE)
        self.log = tmp / 'children.log'
        self.p = subprocess.Popen([sys.executable, str(tmp / 'zygote.py')], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=env)
        assert self._read()['ready']

    def _read(self):
        line = self.p.stdout.readline()
        if not line:
            log = self.log.read_text()[-3000:] if self.log.exists() else '(no child ran: see stderr)'
            raise RuntimeError(f'the fork server died; children log:\n{log}')
        return json.loads(line)

    def start(self, argv, hang=None, steps=None) -> int:
        req = {'argv': list(map(str, argv)), 'log': str(self.log), 'hang': hang, 'steps': steps and str(steps)}
        self.p.stdin.write(json.dumps(req) + '\n')
        self.p.stdin.flush()
        return self._read()['pid']

    def wait(self) -> int: return self._read()['exit']

    def wait_for(self, path: Path, timeout=120, step=None):
        "Wait until the running child creates `path` (holding a step number >= `step`); fail if it exits first."
        t0 = time.monotonic()
        while not (path.exists() and (step is None or int(path.read_text()) >= step)):
            if select.select([self.p.stdout], [], [], 0.005)[0]:
                raise AssertionError(f'the child exited ({self._read()}) before creating {path}')
            if time.monotonic() - t0 > timeout: raise TimeoutError(f'{path} never appeared')

    def close(self):
        self.p.stdin.close(); self.p.wait(timeout=30)


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path)
    yield s
    s.close()


EPOCHS, STEPS = 4, 4

def train_argv(out, resume):
    return ['train', '--dataset', 'shapes', '--preset', 'shapes-quick', '--size', '16', '--batch-size', '16',
            '--steps-per-epoch', STEPS, '--checkpoint-every', 1, '--epochs', EPOCHS, '--threads', '1',
            '--device', 'cpu', '--quiet', '--out', out] + (['--resume'] if resume else [])


def all_checkpoints_readable(out: Path) -> int:
    "Every checkpoint in `out` loads (CheckpointError otherwise); returns the step of last.pt (0 if none yet)."
    for p in out.glob('*.pt'): load_checkpoint(p)
    return load_checkpoint(out / 'last.pt')['step'] if (out / 'last.pt').exists() else 0


def crash_run(server, tmp_path, n_random: int, seed: int = 0):
    """An uninterrupted run, then the same run SIGKILLed inside three checkpoint writes (last.pt early and late,
    best.pt) and at `n_random` random moments, resumed after each kill. A random moment is a random time (up to
    1.5 mean steps) after a random optimizer step: it lands in a step, a checkpoint write, validation or the
    metrics and plot writes. Returns (reference checkpoint, final checkpoint, the kill log, the run folder)."""
    ref, total = tmp_path / 'ref', EPOCHS * STEPS
    server.start(train_argv(ref, False), steps=tmp_path / 'ref-steps')
    server.wait_for(tmp_path / 'ref-steps', step=1)
    t0 = time.monotonic()
    assert server.wait() == 0, server.log.read_text()[-3000:]
    step_time = (time.monotonic() - t0) / (total - 1)                     # a mean step, writes and validation included
    out, rng, kills = tmp_path / 'crashy', random.Random(seed), []
    targets = sorted(rng.randrange(3, total - 2) for _ in range(n_random))
    times = [('time', (k, round(rng.uniform(0, 1.5), 3))) for k in targets]
    half = len(times) // 2
    plan = [('write', ('last.pt', 2)), ('write', ('best.pt', 1))] + times[:half] + [('write', ('last.pt', 3))] + times[half:]
    for kind, arg in plan:
        before = all_checkpoints_readable(out)
        if before == total: break                                         # a kill came after the last step
        if kind == 'write':
            marker = tmp_path / f'hang-{len(kills)}'
            pid = server.start(train_argv(out, True), hang={'file': arg[0], 'call': arg[1], 'marker': str(marker)})
            server.wait_for(marker)
            assert any(out.glob(f'.{arg[0]}.*.tmp')), 'the child should be frozen inside a write'
        else:
            steps = tmp_path / f'steps-{len(kills)}'
            pid = server.start(train_argv(out, True), steps=steps)
            server.wait_for(steps, step=arg[0])
            time.sleep(arg[1] * step_time)
        try: os.kill(pid, signal.SIGKILL)
        except ProcessLookupError: pass                                   # it had already finished
        rc = server.wait()
        after = all_checkpoints_readable(out)                             # raises if any checkpoint is unreadable
        kills.append({'kind': kind, 'at': arg, 'exit': rc, 'last_step_before': before, 'last_step_after': after,
                      'tmp_left': sorted(p.name for p in out.glob('.*.tmp'))})
        if rc == 0: break                                                 # the run finished before this kill
    server.start(train_argv(out, True))
    assert server.wait() == 0, server.log.read_text()[-3000:]
    return load_checkpoint(ref / 'last.pt'), load_checkpoint(out / 'last.pt'), kills, out


def same(u, v):
    if isinstance(u, torch.Tensor): return isinstance(v, torch.Tensor) and u.dtype == v.dtype and torch.equal(u, v)
    if isinstance(u, dict): return isinstance(v, dict) and u.keys() == v.keys() and all(same(u[k], v[k]) for k in u)
    if isinstance(u, (list, tuple)): return len(u) == len(v) and all(same(p, q) for p, q in zip(u, v))
    return u == v


def check_crash_run(a, b, kills, out, n_min):
    killed = [k for k in kills if k['exit'] == -signal.SIGKILL]
    for k in kills: print(k)
    assert len(killed) >= n_min, kills
    assert sum(k['kind'] == 'write' for k in killed) == 3
    assert len({k['last_step_before'] for k in killed}) >= 6             # spread over the run, not only its start
    assert len({(k['kind'], k['at'], k['last_step_before']) for k in killed}) == len(killed)   # all different
    assert a['step'] == b['step'] == EPOCHS * STEPS and a['epoch'] == b['epoch'] == EPOCHS
    assert same(a['model'], b['model']), 'final weights differ from the uninterrupted run'
    assert same(a['optimizer'], b['optimizer']) and same(a['rng'], b['rng'])
    assert a['metrics']['step_loss'] == b['metrics']['step_loss']
    assert [r['val'] for r in a['metrics']['epochs']] == [r['val'] for r in b['metrics']['epochs']]
    assert a['metrics']['best'] == b['metrics']['best']
    assert sorted(p.name for p in out.iterdir()) == ['best.pt', 'last.pt', 'loss.png', 'metrics.json']  # no temp left
    assert json.loads((out / 'metrics.json').read_text())['epochs'][-1]['step'] == EPOCHS * STEPS


def test_sigkill_anywhere_then_resume_is_bit_identical(server, tmp_path):
    a, b, kills, out = crash_run(server, tmp_path, n_random=8)
    check_crash_run(a, b, kills, out, n_min=11)
    assert len(kills) == 11


@pytest.mark.slow
@pytest.mark.parametrize('seed', [1, 2, 3, 4])
def test_sigkill_more_points(server, tmp_path, seed):
    "Four more runs of 11 kill points each, at other random moments."
    a, b, kills, out = crash_run(server, tmp_path, n_random=8, seed=seed)
    check_crash_run(a, b, kills, out, n_min=11)


# ---------------------------------------------------------------------------------------------- failing writes
def _args(out, *extra):
    return [str(a) for a in ['train', '--dataset', 'shapes', '--preset', 'shapes-quick', '--size', '16', '--batch-size',
                             '16', '--steps-per-epoch', 3, '--checkpoint-every', 2, '--threads', '1', '--device', 'cpu',
                             '--quiet', '--out', out, *extra]]


def test_disk_full_stops_with_a_message_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    from seqdis_nb.cli import main
    real, n = torch.save, [0]
    def save(obj, f, *a, **k):
        n[0] += 1
        if n[0] == 3:                       # step 2 -> last.pt, epoch 1 -> best.pt, then last.pt: the disk is full
            f.write(b'\0' * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f, *a, **k)
    monkeypatch.setattr(torch, 'save', save)
    assert main(_args(tmp_path, '--epochs', '2')) == 4
    err = capsys.readouterr().err
    assert 'seqdis train: stopped: cannot write the checkpoint' in err and 'No space left on device' in err, err
    assert f'{tmp_path}/last.pt' in err and 'resume with --resume' in err
    assert load_checkpoint(tmp_path / 'last.pt')['step'] == 2          # the previous last.pt, intact
    assert not list(tmp_path.glob('.*.tmp'))                           # the partial write was removed
    monkeypatch.undo()
    assert main(_args(tmp_path, '--epochs', '2', '--resume')) == 0     # room again: the run continues
    assert load_checkpoint(tmp_path / 'last.pt')['step'] == 6


def test_unwritable_output_folder_is_a_message(tmp_path, capsys):
    from seqdis_nb.cli import main
    (tmp_path / 'file').write_text('not a folder')
    assert main(_args(tmp_path / 'file' / 'run', '--epochs', '1')) == 4
    err = capsys.readouterr().err
    assert 'seqdis train: stopped: cannot write to the output folder' in err and str(tmp_path / 'file') in err, err
