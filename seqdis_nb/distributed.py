from __future__ import annotations
import contextlib, datetime, os, re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .core import get_device, seed_everything
from .train import (CheckpointError, NonFiniteLossError, Trainer, epoch_order, load_checkpoint, rng_state,
                    save_checkpoint, set_rng_state)

_ENV_KEYS = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')

@dataclass(frozen=True)
class DistEnv:
    "Where this process sits in a torchrun job: its `rank` of `world_size`, and `local_rank` on its node."
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def __post_init__(self):
        for k, lo in (('rank', 0), ('world_size', 1), ('local_rank', 0)):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo: raise ValueError(f"{k} must be an int >= {lo}, got {v!r}")
        if self.rank >= self.world_size: raise ValueError(f"rank must be < world_size ({self.world_size}), got {self.rank}")

    @property
    def distributed(self) -> bool: return self.world_size > 1
    @property
    def is_main(self) -> bool: return self.rank == 0

    @classmethod
    def from_environ(cls, environ=None) -> 'DistEnv':
        """Read RANK, WORLD_SIZE, LOCAL_RANK (as torchrun sets them) from `environ` (default `os.environ`); none set:
        a single process. A partial or malformed set is a ValueError naming the variable."""
        e = os.environ if environ is None else environ
        have = [k for k in _ENV_KEYS if k in e]
        if not have: return cls()
        if 'RANK' not in e or 'WORLD_SIZE' not in e:
            raise ValueError(f"RANK and WORLD_SIZE must both be set for a distributed run (found only {have}): "
                             f"launch with torchrun, which sets them")
        vals = {}
        for k in _ENV_KEYS:
            raw = e.get(k, e['RANK'] if k == 'LOCAL_RANK' else None)     # LOCAL_RANK defaults to RANK (one node)
            try: vals[k] = int(raw)
            except ValueError: raise ValueError(f"environment variable {k} must be an integer, got {raw!r}") from None
        env = cls(vals['RANK'], vals['WORLD_SIZE'], vals['LOCAL_RANK'])
        if env.distributed:
            miss = [k for k in ('MASTER_ADDR', 'MASTER_PORT') if not e.get(k)]
            if miss: raise ValueError(f"a distributed run needs {miss} in the environment (torchrun sets them)")
        return env

def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    "The seed of the RNG stream that rank `rank > 0` starts at `step` (rank 0 keeps the stream of `seed`)."
    return int(np.random.SeedSequence([int(seed) % 2**63, rank, step]).generate_state(1, np.uint64)[0] >> 1)

def init_distributed(env: DistEnv, device=None, timeout: float = 1800.) -> torch.device:
    """Join the process group of `env` (env:// rendezvous: MASTER_ADDR, MASTER_PORT): NCCL on CUDA, gloo on CPU,
    every collective bounded by `timeout` seconds. Returns this rank's device: a CUDA device without an index
    becomes `cuda:LOCAL_RANK`."""
    if not (isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    dev = get_device(device)
    if dev.type == 'cuda':
        if dev.index is None: dev = torch.device('cuda', env.local_rank)
        if dev.index >= torch.cuda.device_count():
            raise ValueError(f"rank {env.rank} wants {dev} but this node has {torch.cuda.device_count()} CUDA device(s): "
                             f"--nproc_per_node must not exceed the GPUs per node")
        torch.cuda.set_device(dev)
    if dist.is_initialized():
        if (dist.get_rank(), dist.get_world_size()) != (env.rank, env.world_size):
            raise ValueError(f"a process group is already initialised as rank {dist.get_rank()} of "
                             f"{dist.get_world_size()}, not rank {env.rank} of {env.world_size}")
        return dev
    dist.init_process_group('nccl' if dev.type == 'cuda' else 'gloo', init_method='env://', rank=env.rank,
                            world_size=env.world_size, timeout=datetime.timedelta(seconds=timeout))
    return dev

def shutdown_distributed() -> None:
    "Leave the process group (if this process joined one)."
    if dist.is_initialized(): dist.destroy_process_group()

class PeerLostError(RuntimeError):
    "A collective failed: another rank died, hung past the timeout, or the network broke. The run cannot go on."

_COMM_FAILURE = re.compile(r'gloo|nccl|ProcessGroup|[Cc]onnection|[Tt]imed out|[Ss]ocket|[Pp]eer')

class _TrainingLoss(nn.Module):
    "`model.training_loss` as `forward`, so DistributedDataParallel sees (and synchronises) it."
    def __init__(self, model): super().__init__(); self.model = model
    def forward(self, x, epoch: int, n_data: int): return self.model.training_loss(x, epoch=epoch, n_data=n_data)

def sync_batchnorm(model: nn.Module, device) -> nn.Module:
    "Every BatchNorm of `model` as a SyncBatchNorm (same parameters and state_dict keys); CUDA only."
    if torch.device(device).type != 'cuda':
        raise ValueError(f"sync_bn needs CUDA devices (torch's SyncBatchNorm has no CPU kernel), got device {device}; "
                         f"on CPU each rank keeps its own BatchNorm statistics")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)

class DistributedTrainer(Trainer):
    """`Trainer` on rank `env.rank` of a torchrun job (call `init_distributed` first). `batch_size` is the global
    batch of one optimizer step; each rank takes `batch_size / world_size` of it. Rank 0 alone prints and writes."""
    def __init__(self, model, data, out_dir, batch_size: int | None = None, env: DistEnv | None = None,
                 sync_bn: bool = False, progress: bool = True, device=None, **kw):
        env = env if env is not None else DistEnv.from_environ()
        if not dist.is_initialized(): raise ValueError("no process group: call init_distributed(env) first")
        if (dist.get_rank(), dist.get_world_size()) != (env.rank, env.world_size):
            raise ValueError(f"env says rank {env.rank} of {env.world_size}, the process group rank "
                             f"{dist.get_rank()} of {dist.get_world_size()}")
        W = env.world_size
        batch_size = int(batch_size or model.config.batch_size)
        if batch_size % W:
            raise ValueError(f"batch_size must be a multiple of the world size {W} (it is the global batch; each rank "
                             f"takes batch_size / {W}), got {batch_size}")
        self.env, self.rank, self.world_size = env, env.rank, W
        self.local_batch_size, self.sync_bn = batch_size // W, bool(sync_bn)
        device = get_device(device)
        if sync_bn: model = sync_batchnorm(model, device)
        self._rng_cache = None
        super().__init__(model, data, out_dir, batch_size=batch_size, device=device,
                         progress=progress and env.is_main, **kw)
        ids = [self.device.index] if self.device.type == 'cuda' else None
        self.ddp = DistributedDataParallel(_TrainingLoss(self.model), device_ids=ids)   # broadcasts rank 0's weights
        self.metrics.update(world_size=W, local_batch_size=self.local_batch_size, sync_bn=self.sync_bn)
        if self.rank: seed_everything(rank_seed(self.seed, self.rank))   # rank 0 goes on with the stream of `seed`

    def batches(self, epoch: int):
        "This rank's share of each step of `epoch`: `local_batch_size` indices (step s covers order[s*B:(s+1)*B])."
        order = epoch_order(len(self.data.train), self.seed, epoch, self.rank, self.world_size)
        b = self.local_batch_size
        return [order[i * b:(i + 1) * b] for i in range(self.steps_per_epoch)]

    def _collective(self, what: str, fn, *args, **kw):
        "Run collective `fn`; a failure of the job becomes a `PeerLostError` that says what to do."
        try: return fn(*args, **kw)
        except RuntimeError as e:   # gloo raises plain RuntimeErrors; tell them from the step's own errors by text
            if isinstance(e, PeerLostError) or not (isinstance(e, dist.DistError) or _COMM_FAILURE.search(str(e))):
                raise
            first = (str(e).strip().splitlines() or [''])[0][:300]
            raise PeerLostError(
                f"rank {self.rank} of {self.world_size}: {what} failed at step {self.step} (epoch {self.epoch + 1}): "
                f"another rank died, hung past the timeout or lost the network ({type(e).__name__}: {first}). The "
                f"last complete checkpoint is {self.last_path}; restart the job with --resume") from e

    def train_step(self, x: torch.Tensor) -> dict:
        "One synchronised step; the returned terms are means over the global batch. `NonFiniteLossError` on every rank."
        self.ddp.train()
        loss, terms = self.ddp(x, self.epoch, len(self.data.train))
        names = ['loss', *terms]
        local = torch.stack([loss.detach(), *terms.values()]).double()               # (K,)
        glob = local.clone()
        self._collective('the loss all-reduce', dist.all_reduce, glob)              # sum over ranks; NaN spreads
        glob /= self.world_size
        if not bool(torch.isfinite(glob).all()):
            bad = [k for k, v in zip(names, glob) if not torch.isfinite(v)]
            first = next((k for k in bad if k != 'loss'), 'loss')
            where = 'this rank' if not bool(torch.isfinite(local).all()) else 'another rank'
            raise NonFiniteLossError(
                f"non-finite loss at step {self.step + 1} (epoch {self.epoch + 1}) on {where}: term {first!r} "
                f"({', '.join(f'{k}={float(v):.4g}' for k, v in zip(names, glob))}); nothing was written after "
                f"the last good checkpoint {self.last_path if self.last_path.exists() else '(none yet)'}")
        self.optimizer.zero_grad(set_to_none=True)
        self._collective('the gradient all-reduce', loss.backward)
        self.optimizer.step()
        self.step += 1
        return {k: float(v) for k, v in zip(names, glob)}

    # ------------------------------------------------------------------ rank 0 writes, the others wait
    def _gather_rng(self) -> list:
        out = [None] * self.world_size
        self._collective('gathering the RNG states', dist.all_gather_object, out, rng_state())
        return out

    def save(self, path) -> Path:
        "Rank 0 writes the checkpoint; `rng` holds rank 0's state, and every rank's under `rng['ranks']`."
        cached = self._rng_cache is not None
        states = self._rng_cache if cached else self._gather_rng()
        if self.rank == 0:
            save_checkpoint(path, self.model, self.optimizer, self.epoch, self.step, self.dataset,
                            rng=dict(states[0], ranks=states), metrics=self.metrics)
        if not cached: self._collective('the barrier after a checkpoint', dist.barrier)
        return Path(path)

    def _end_epoch(self):
        for b in self.model.buffers():          # BatchNorm running statistics: rank 0's, as DDP broadcasts them
            self._collective('the buffer broadcast', dist.broadcast, b, 0)
        self._rng_cache = self._gather_rng()    # validation does not touch the training RNG: the state to save
        try: row = super()._end_epoch()         # every rank validates (same weights, same generator); rank 0 writes
        finally: self._rng_cache = None
        self._collective('the barrier after the epoch', dist.barrier)
        return row

    def write_metrics(self):
        if self.rank == 0: super().write_metrics()

    def resume(self, path=None) -> bool:
        """Load `path` (default `last.pt`, written by a run of any world size with the same global batch) on every
        rank. A rank restores its own RNG stream when the writer had that rank, else starts one from
        `rank_seed(seed, rank, step)`."""
        path = Path(path) if path is not None else self.last_path
        seen = [None] * self.world_size
        self._collective('checking the checkpoint', dist.all_gather_object, seen, path.exists())
        if len(set(seen)) > 1:
            raise CheckpointError(f"{path} is visible on ranks {[r for r, s in enumerate(seen) if s]} only: the "
                                  f"output folder must be on a filesystem every node shares")
        if not super().resume(path): return False
        rng = load_checkpoint(path)['rng']
        ranks = rng.get('ranks') or [rng]           # a 1-process checkpoint holds rank 0's stream only
        if self.rank < len(ranks): set_rng_state(ranks[self.rank])
        else: seed_everything(rank_seed(self.seed, self.rank, self.step))
        self.metrics.update(world_size=self.world_size, local_batch_size=self.local_batch_size, sync_bn=self.sync_bn)
        return True

def launch(main_fn, device=None, timeout: float = 1800., environ=None):
    """Run `main_fn(env, device)` as this process's part of a torchrun job, or alone when there is none: join the
    process group (`init_distributed`), silence stdout on ranks > 0, and leave the group afterwards."""
    env = DistEnv.from_environ(environ)
    if not env.distributed: return main_fn(env, device)
    device = init_distributed(env, device, timeout)
    try:
        if env.is_main: return main_fn(env, device)
        with open(os.devnull, 'w') as null, contextlib.redirect_stdout(null): return main_fn(env, device)
    finally: shutdown_distributed()
