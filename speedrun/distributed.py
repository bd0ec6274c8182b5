"""Process-group setup from torchrun's environment, the ``World`` handle, and the few collectives the
optimizers use (reduce-scatter AVG and all-gather, with a fallback for backends that lack them).

NCCL on CUDA, gloo on CPU. With no torchrun environment (or WORLD_SIZE=1) there is no process group
at all and every helper is a no-op, so one code path serves 1..N ranks.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None          # "nccl" | "gloo" | None (single process, no group)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def all_reduce_mean(self, value: float) -> float:
        """Mean of a Python float over ranks (e.g. the validation loss)."""
        if not self.distributed:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.item() / self.world_size

    def all_reduce_(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In place: ``tensor`` <- its sum / max over ranks (op "sum" | "max"); returns it."""
        if self.distributed:
            dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
        return tensor

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """In place: every rank's ``tensor`` <- rank ``src``'s; returns it."""
        if self.distributed:
            dist.broadcast(tensor, src=src)
        return tensor

    def broadcast_object(self, obj, src: int = 0):
        """Rank ``src``'s picklable ``obj`` on every rank (e.g. a run directory name)."""
        if not self.distributed:
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src=src)
        return holder[0]


def init_world(device_kind: str) -> World:
    """Read RANK/WORLD_SIZE/LOCAL_RANK (set by torchrun) and start NCCL (cuda) or gloo (cpu).

    No torchrun variables: a single-process World. Some but not all of them, or no MASTER_ADDR /
    MASTER_PORT for a multi-process world: a RuntimeError saying what is missing.
    """
    if device_kind not in ("cuda", "cpu"):
        raise ValueError(f"init_world: device_kind must be 'cuda' or 'cpu', got {device_kind!r}")
    present = [v for v in _TORCHRUN_VARS if v in os.environ]
    if not present:
        return World(device=torch.device("cuda", torch.cuda.current_device()) if device_kind == "cuda"
                     else torch.device("cpu"))
    missing = [v for v in _TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise RuntimeError(f"distributed environment is half set: {', '.join(present)} set but "
                           f"{', '.join(missing)} missing; launch with torchrun or unset them")
    try:
        rank, world_size, local_rank = (int(os.environ[v]) for v in _TORCHRUN_VARS)
    except ValueError:
        raise RuntimeError("RANK, WORLD_SIZE and LOCAL_RANK must be integers, got "
                           + ", ".join(f"{v}={os.environ[v]!r}" for v in _TORCHRUN_VARS)) from None
    if not (world_size >= 1 and 0 <= rank < world_size and local_rank >= 0):
        raise RuntimeError(f"bad distributed environment: RANK={rank} WORLD_SIZE={world_size} "
                           f"LOCAL_RANK={local_rank}")

    if device_kind == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA "
                               f"device(s) are visible")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size == 1:  # torchrun --nproc_per_node=1: nothing to communicate
        return World(rank, 1, local_rank, device, None)

    for v in ("MASTER_ADDR", "MASTER_PORT"):
        if v not in os.environ:
            raise RuntimeError(f"distributed run (WORLD_SIZE={world_size}) needs {v}; torchrun sets it")
    backend = "nccl" if device_kind == "cuda" else "gloo"
    kwargs = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(minutes=30), **kwargs)
    return World(rank, world_size, local_rank, device, backend)


def destroy_world() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---- collectives used by the optimizers ----------------------------------------------------------

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_ok: dict[str, bool] = {}


class _Done:
    """Handle of an already finished (synchronous) collective."""
    def wait(self) -> bool:
        return True


class _SliceAfterWait:
    """Handle for the all-reduce fallback: after the wait, copy this rank's slice (divided) out."""
    def __init__(self, work, full: torch.Tensor, out: torch.Tensor, rank: int, world_size: int):
        self.work, self.full, self.out, self.rank, self.world_size = work, full, out, rank, world_size

    def wait(self) -> bool:
        self.work.wait()
        n = self.out.size(0)
        self.out.copy_(self.full[self.rank * n:(self.rank + 1) * n].div_(self.world_size))
        return True


def _supports_reduce_scatter_avg() -> bool:
    """Whether this backend has reduce_scatter_tensor with AVG. NCCL does; gloo does in torch 2.13
    (checked) but not in every torch we accept, so it is probed once with a tiny collective (every
    rank runs the same torch, so all agree)."""
    backend = dist.get_backend()
    if backend == "nccl":
        return True
    if backend not in _reduce_scatter_ok:
        try:
            dist.reduce_scatter_tensor(torch.empty(1), torch.zeros(dist.get_world_size()),
                                       op=dist.ReduceOp.AVG)
            _reduce_scatter_ok[backend] = True
        except (RuntimeError, ValueError, NotImplementedError):
            _reduce_scatter_ok[backend] = False
    return _reduce_scatter_ok[backend]


def reduce_scatter_avg(out: torch.Tensor, full: torch.Tensor, world: World):
    """Async: out <- (mean over ranks of full)[rank's slice along dim 0]. Returns a handle with wait().

    Backends without reduce_scatter_tensor/AVG get the same math from an all-reduce (SUM) of a copy
    followed by taking the local slice and dividing by the world size (more traffic, CPU tests only).
    """
    if not world.distributed:
        out.copy_(full)
        return _Done()
    if _supports_reduce_scatter_avg():
        return dist.reduce_scatter_tensor(out, full, op=dist.ReduceOp.AVG, async_op=True)
    full = full.clone()
    work = dist.all_reduce(full, op=dist.ReduceOp.SUM, async_op=True)
    return _SliceAfterWait(work, full, out, world.rank, world.world_size)


def all_gather(full: torch.Tensor, shard: torch.Tensor, world: World):
    """Async: full <- concatenation over ranks of shard (along dim 0). Returns a handle with wait()."""
    if not world.distributed:
        full.copy_(shard)
        return _Done()
    if world.backend != "nccl" and shard.data_ptr() >= full.data_ptr() and \
            shard.data_ptr() < full.data_ptr() + full.numel() * full.element_size():
        shard = shard.clone()  # NCCL gathers in place when shard is full's own slice; gloo may not
    return _all_gather_single(full, shard, async_op=True)
