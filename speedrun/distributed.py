"""Process-group setup from the launcher's environment (torchrun on one or many nodes, or a Slurm
``srun`` step), the ``World`` handle, and the few collectives the optimizers use (reduce-scatter AVG
and all-gather, with a fallback for backends that lack them; a sparse reduce-scatter for gradients
whose rows are mostly zero).

NCCL on CUDA, gloo on CPU. With no launcher environment (or a world of 1) there is no process group
at all and every helper is a no-op, so one code path serves 1..N ranks on 1..M nodes. Every
collective has a bounded timeout (``train.collective_timeout_s``), so a rank whose peer died or hangs
does not wait for ever: with gloo the collective raises (``train`` turns that into a one-line
``PeerLostError``), with NCCL PyTorch's watchdog ends the process (SIGABRT) after the timeout.
"""
from __future__ import annotations

import datetime
import os
import re
import socket
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from speedrun.config import ConfigError

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# sbatch sets SLURM_PROCID=0 and the allocation's SLURM_NTASKS in the batch script too, where nobody
# starts the other tasks: only inside a job step that srun started (SLURM_STEP_ID) is each task a rank
_SLURM_STEP_VARS = ("SLURM_STEP_ID", "SLURM_STEPID")
DEFAULT_COLLECTIVE_TIMEOUT_S = 600.0
# no MASTER_PORT under Slurm: every task derives the same port from the job id, in 20000..29999
# (below Linux's ephemeral range, so a random outgoing connection does not hold it)
_SLURM_PORT_BASE, _SLURM_PORT_SPAN = 20000, 10000


class LaunchEnvError(RuntimeError):
    """The launcher's environment is incomplete or inconsistent; the message names the variables."""
    user_error = True


class PeerLostError(RuntimeError):
    """A collective failed or timed out: another rank died or hangs. The run can be resumed."""
    user_error = True


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the run, as its launcher described it."""
    source: str                      # "torchrun" | "slurm" | "none" (started by hand: one process)
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str | None = None   # Slurm only: torchrun's workers find the store through env://
    master_port: int | None = None


def launch_env(environ=None) -> LaunchEnv:
    """Read the launcher's variables. torchrun's (RANK, WORLD_SIZE, LOCAL_RANK, also under srun when
    srun starts torchrun) win over a Slurm step's (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID).

    Under Slurm the rendezvous is MASTER_ADDR / MASTER_PORT if set, else the first host of the
    step's node list (where task 0 runs with Slurm's default block distribution) and a port derived
    from SLURM_JOB_ID. Raises LaunchEnvError naming what is missing or malformed.
    """
    env = os.environ if environ is None else environ
    present = [v for v in _TORCHRUN_VARS if v in env]
    if present:
        missing = [v for v in _TORCHRUN_VARS if v not in env]
        if missing:
            raise LaunchEnvError(f"distributed environment is half set: {', '.join(present)} set but "
                                 f"{', '.join(missing)} missing; launch with torchrun or unset them")
        rank, world_size, local_rank = _ints(env, _TORCHRUN_VARS)
        source = "torchrun"
        addr = port = None
    elif "SLURM_PROCID" in env and any(v in env for v in _SLURM_STEP_VARS):
        size_var = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
        names = ("SLURM_PROCID", size_var, "SLURM_LOCALID")
        missing = [v for v in names if v not in env]
        if missing:
            raise LaunchEnvError(f"Slurm step without {', '.join(missing)}: start one task per GPU "
                                 f"with srun, or launch with torchrun")
        rank, world_size, local_rank = _ints(env, names)
        source = "slurm"
        addr, port = (_slurm_rendezvous(env) if world_size > 1 else (None, None))
    else:
        return LaunchEnv("none")
    if not (world_size >= 1 and 0 <= rank < world_size and local_rank >= 0):
        raise LaunchEnvError(f"bad distributed environment ({source}): rank {rank}, world size "
                             f"{world_size}, local rank {local_rank}")
    return LaunchEnv(source, rank, world_size, local_rank, addr, port)


def _ints(env, names) -> tuple[int, ...]:
    try:
        return tuple(int(env[v]) for v in names)
    except ValueError:
        raise LaunchEnvError(" and ".join(names) + " must be integers, got "
                             + ", ".join(f"{v}={env[v]!r}" for v in names)) from None


def _slurm_rendezvous(env) -> tuple[str, int]:
    addr = env.get("MASTER_ADDR")
    if not addr:
        nodelist = next((env[v] for v in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
                         if env.get(v)), None)
        if nodelist is None:
            raise LaunchEnvError("Slurm step without MASTER_ADDR or SLURM_JOB_NODELIST: set MASTER_ADDR "
                                 "to the host of task 0")
        addr = first_host(nodelist)
    if env.get("MASTER_PORT"):
        port_text = env["MASTER_PORT"]
    elif env.get("SLURM_JOB_ID"):
        if not env["SLURM_JOB_ID"].isdigit():
            raise LaunchEnvError(f"SLURM_JOB_ID={env['SLURM_JOB_ID']!r} is not a number; set MASTER_PORT")
        port_text = str(_SLURM_PORT_BASE + int(env["SLURM_JOB_ID"]) % _SLURM_PORT_SPAN)
    else:
        raise LaunchEnvError("Slurm step without MASTER_PORT or SLURM_JOB_ID: set MASTER_PORT")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise LaunchEnvError(f"MASTER_PORT={port_text!r}: expected a port number (1..65535)")
    return addr, int(port_text)


def first_host(nodelist: str) -> str:
    """First host of a Slurm host list, without ``scontrol``: 'gpu[007-012,020],cpu1' -> 'gpu007'.

    Commas inside brackets separate ranges, not hosts; each bracket group of the first host takes
    its first value as written (zero padding kept): 'rack[1-2]-n[03-04]' -> 'rack1-n03'."""
    first, depth = [], 0
    for ch in nodelist.strip():
        if ch == "," and depth == 0:
            break
        depth += {"[": 1, "]": -1}.get(ch, 0)
        first.append(ch)
    host = "".join(first)
    if depth != 0 or not host:
        raise LaunchEnvError(f"cannot read the first host of the Slurm node list {nodelist!r}; "
                             f"set MASTER_ADDR")
    host = re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[-,]", m.group(1))[0], host)
    if not re.fullmatch(r"[A-Za-z0-9._-]+", host):
        raise LaunchEnvError(f"cannot read the first host of the Slurm node list {nodelist!r}; "
                             f"set MASTER_ADDR")
    return host


@dataclass
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None          # "nccl" | "gloo" | None (single process, no group)
    timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S

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


def init_world(device_kind: str, timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S) -> World:
    """Start NCCL (cuda) or gloo (cpu) for the world ``launch_env`` describes (torchrun or a Slurm
    step); a single-process World without a launcher. ``timeout_s`` bounds every collective and the
    rendezvous: a peer that died or hangs makes this rank fail after that long (gloo raises; NCCL's
    watchdog ends the process some 25 s later).

    Missing or malformed launcher variables, or no MASTER_ADDR / MASTER_PORT under torchrun's
    variables: a LaunchEnvError saying what is missing.
    """
    if device_kind not in ("cuda", "cpu"):
        raise ValueError(f"init_world: device_kind must be 'cuda' or 'cpu', got {device_kind!r}")
    if not timeout_s > 0:
        raise ValueError(f"init_world: timeout_s must be > 0, got {timeout_s!r}")
    launch = launch_env()
    if launch.source == "none":
        return World(device=torch.device("cuda", torch.cuda.current_device()) if device_kind == "cuda"
                     else torch.device("cpu"), timeout_s=timeout_s)
    rank, world_size, local_rank = launch.rank, launch.world_size, launch.local_rank
    if device_kind == "cuda":
        visible = torch.cuda.device_count()
        # Slurm may bind one GPU to each task (--gpus-per-task=1): that task sees only its own
        index = 0 if launch.source == "slurm" and visible == 1 else local_rank
        if index >= visible:
            raise LaunchEnvError(f"local rank {local_rank} ({launch.source}) but only {visible} CUDA "
                                 f"device(s) are visible")
        torch.cuda.set_device(index)
        device = torch.device("cuda", index)
    else:
        device = torch.device("cpu")
    if world_size == 1:  # torchrun --nproc_per_node=1, srun -n 1: nothing to communicate
        return World(rank, 1, local_rank, device, None, timeout_s)

    if launch.source == "torchrun":
        for v in ("MASTER_ADDR", "MASTER_PORT"):
            if v not in os.environ:
                raise LaunchEnvError(f"distributed run (WORLD_SIZE={world_size}) needs {v}; torchrun sets it")
        init_method = "env://"
        where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    else:  # brackets keep an IPv6 address apart from the port
        addr = f"[{launch.master_addr}]" if ":" in launch.master_addr else launch.master_addr
        where = f"{addr}:{launch.master_port}"
        init_method = f"tcp://{where}"
    backend = "nccl" if device_kind == "cuda" else "gloo"
    kwargs = {"device_id": device} if backend == "nccl" else {}
    if backend == "nccl":
        # A timed-out NCCL collective ends the process from PyTorch's watchdog, which first sleeps
        # 4x this (default 15 s: a minute) for debug dumps; 5 s makes that 20 s (checked on 2 H200s:
        # a peer killed -> the survivor gone ~40 s later with a 15 s timeout, 85 s with the default)
        os.environ.setdefault("TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC", "5000")
    try:
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    except RuntimeError as e:
        if not is_peer_failure(e):
            raise
        raise PeerLostError(f"rank {rank} of {world_size}: could not join the other ranks at "
                            f"{where} within {timeout_s:g} s ({short_reason(e)})") from None
    return World(rank, world_size, local_rank, device, backend, timeout_s)


# gloo's transport errors reach Python as plain RuntimeErrors: a dead peer's socket ("Connection
# reset/closed by peer", "Read error" with gloo's source file), the timed-out wait itself ("Timed out
# waiting ...ms"), and what every other pending operation of this rank then sees ("Application
# timeout caused pair closure", without a source file)
_GLOO_PEER_FAILURE = re.compile(r"gloo/|pair closure|Connection (closed|reset) by peer|Timed out waiting")


def is_peer_failure(e: BaseException) -> bool:
    """Whether ``e`` is a collective or rendezvous failing (a peer died, hangs or is unreachable):
    torch's DistError kinds (NCCL, the store) and gloo's transport errors."""
    if isinstance(e, PeerLostError) or isinstance(e, getattr(dist, "DistError", ())):
        return True
    return isinstance(e, RuntimeError) and bool(_GLOO_PEER_FAILURE.search(str(e)))


def short_reason(e: BaseException, limit: int = 160) -> str:
    """The first line of an error without the C++ source location: fits a one-line message."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|hpp|h):\d+\]\s*", "", text)
    text = text.split(". ")[0]   # gloo appends generic advice after the first sentence
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_shared_dir(world: World, path: str, wait_s: float = 5.0) -> None:
    """Fail early, on every rank alike, when the ranks do not share the folder ``path`` will be in.

    A checkpoint is one folder that every rank writes its own shards into and rank 0 publishes, so
    a multi-node run needs its run directory on storage that every node mounts at the same path.
    Rank 0 drops a marker file into the nearest folder of ``path`` that exists (nothing is created
    for the run itself) and every rank looks for it, for up to ``wait_s`` (slow network file systems).
    """
    if not world.distributed:
        return
    probe = None
    if world.is_main:
        probe = os.path.dirname(os.path.normpath(path)) or "."
        while not os.path.isdir(probe) and os.path.dirname(probe) not in ("", probe):
            probe = os.path.dirname(probe)
        probe = os.path.join(probe if os.path.isdir(probe) else ".",
                             f".speedrun-shared-check-{os.getpid()}-{time.time_ns()}")
        open(probe, "w").close()
    holder = [probe]
    dist.broadcast_object_list(holder, src=0)
    probe = holder[0]
    deadline = time.monotonic() + wait_s
    while not os.path.exists(probe) and time.monotonic() < deadline:
        time.sleep(0.2)
    seen = [None] * world.world_size
    dist.all_gather_object(seen, (os.path.exists(probe), socket.gethostname()))
    if world.is_main:
        os.remove(probe)
    blind = [f"rank {r} on {host}" for r, (ok, host) in enumerate(seen) if not ok]
    if blind:
        raise ConfigError(f"run directory {path}: {', '.join(blind)} cannot see files that rank 0 "
                          f"({seen[0][1]}) writes beside it; checkpoints need the run directory "
                          f"on storage every node mounts at the same path (--save-path)")


def destroy_world(abort: bool = False) -> None:
    """Leave the process group. ``abort`` after a failed collective: a graceful destroy may wait on
    a peer that is gone (NCCL), so the communicators are aborted instead where torch offers it."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    abort_group = getattr(dist.distributed_c10d, "_abort_process_group", None)
    if abort and abort_group is not None:
        abort_group()
    else:
        dist.destroy_process_group()


# ---- collectives used by the optimizers ----------------------------------------------------------

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_ok: dict[str, bool] = {}


class _Done:
    """Handle of an already finished (synchronous) collective."""
    def wait(self) -> bool:
        return True


class _AfterWait:
    """Handle of collectives whose result needs a local finish (a slice, a merge, a division by
    the world size): wait() waits for them all, then runs ``finish``."""
    def __init__(self, works, finish):
        self.works, self.finish = works, finish

    def wait(self) -> bool:
        for work in self.works:
            work.wait()
        self.finish()
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
    total, handle = all_reduce_avg(full, world)
    n = out.size(0)
    return _AfterWait([handle], lambda: out.copy_(total[world.rank * n:(world.rank + 1) * n]))


def all_reduce_avg(t: torch.Tensor, world: World) -> tuple[torch.Tensor, _AfterWait | _Done]:
    """Async: (a new tensor that will hold the mean over ranks of t, handle with wait()). A SUM then
    a division by the world size (not NCCL's AVG, which may round differently)."""
    total = t.clone()
    if not world.distributed:
        return total, _Done()
    work = dist.all_reduce(total, op=dist.ReduceOp.SUM, async_op=True)
    return total, _AfterWait([work], lambda: total.div_(world.world_size))


def sparse_reduce_scatter_avg(out: torch.Tensor, full: torch.Tensor, world: World):
    """reduce_scatter_avg for a gradient whose rows are mostly zero (record 89's bigram table: a
    rank's batch touches a fraction of its 377,280 rows). Each rank sends every other rank only its
    nonzero rows in that rank's slice, as (row index, row) pairs, and adds what it receives to its own
    slice: the same sums as the dense reduce-scatter (bitwise with two ranks; with more, in another
    order). Costs one small blocking exchange of the row counts (the sizes of the other two). Async:
    returns a handle with wait()."""
    if not world.distributed:
        out.copy_(full)
        return _Done()
    W, r = world.world_size, world.rank
    n = full.size(0) // W
    flat = full.view(full.size(0), -1)
    rows = torch.nonzero(flat.ne(0).any(dim=1)).squeeze(1)         # sorted, on full's device
    edges = torch.arange(0, W + 1, device=rows.device) * n
    starts = torch.searchsorted(rows, edges)
    send_counts = starts[1:] - starts[:-1]
    send_counts[r] = 0                                             # own rows stay here
    own_lo, own_hi = starts[r:r + 2].tolist()                      # one host sync for both bounds
    send_rows = torch.cat([rows[:own_lo], rows[own_hi:]])
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts)
    send_sizes, recv_sizes = send_counts.tolist(), recv_counts.tolist()
    recv_rows = rows.new_empty(sum(recv_sizes))
    recv_vals = flat.new_empty(sum(recv_sizes), flat.size(1))
    works = [dist.all_to_all_single(recv_rows, send_rows, recv_sizes, send_sizes, async_op=True),
             dist.all_to_all_single(recv_vals, flat[send_rows], recv_sizes, send_sizes, async_op=True)]
    own = full[r * n:(r + 1) * n]

    def merge() -> None:   # out = (own rows + received rows) / W; received indices are global
        rows2d = out.view(n, -1)
        rows2d.copy_(own.view(n, -1)).index_add_(0, recv_rows - r * n, recv_vals).div_(W)

    handle = _AfterWait(works, merge)
    handle.received_rows = recv_rows.numel()   # what the exchange cost this rank (tests read it)
    return handle


def all_gather(full: torch.Tensor, shard: torch.Tensor, world: World):
    """Async: full <- concatenation over ranks of shard (along dim 0). Returns a handle with wait()."""
    if not world.distributed:
        full.copy_(shard)
        return _Done()
    if world.backend != "nccl" and shard.data_ptr() >= full.data_ptr() and \
            shard.data_ptr() < full.data_ptr() + full.numel() * full.element_size():
        shard = shard.clone()  # NCCL gathers in place when shard is full's own slice; gloo may not
    return _all_gather_single(full, shard, async_op=True)
