"""Many processes, one job: ``torch.distributed`` as the launcher (torchrun, srun) set it up.

Particles are independent and reconstruction accumulators add (DESIGN.md section 4), so K processes
("ranks") split the particles, each fills its own accumulators, and an all-reduce sums them. Nothing
here is home-made communication: every exchange is a ``torch.distributed`` collective (gloo on the CPU,
NCCL on CUDA). Without a launcher, or with one process, every function here is a no-op and a run is
exactly the single-process one.

Launch environment, read by :func:`init`:

* ``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and
  ``MASTER_PORT``;
* ``srun`` (one task per process) sets ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID`` and
  ``SLURM_STEP_TASKS_PER_NODE``; the batch script exports ``MASTER_ADDR`` / ``MASTER_PORT`` (README).

With ``--device cuda`` each rank takes GPU ``LOCAL_RANK`` (``cuda:<LOCAL_RANK>``) and the NCCL backend.

Sharding rule (:func:`shard`): a list of ``n`` rows (for refinement: one half set's particles in input
order) is cut into blocks of ``block`` consecutive rows, the last one possibly short; with ``nb`` blocks,
rank ``r`` of ``K`` takes the contiguous blocks ``r * nb // K`` up to ``(r + 1) * nb // K``. The rule
depends only on ``n``, ``block`` and ``K``, so every rank knows every shard; because shards are made of
whole blocks, a particle is refined in the same batch of particles whatever ``K`` is.

Graceful stop: within :func:`stop_on_signal`, SIGTERM (what SLURM sends at the time limit or on
preemption, and what torchrun forwards to every rank when it gets one) sets a flag instead of killing
the process. Long loops call :func:`stop_agreed` at safe points; it all-reduces the flag so every rank stops
at the same point, where the caller writes a checkpoint and raises :class:`Interrupted`.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
import signal
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

#: Exit code of a run stopped by SIGTERM after writing its checkpoint (128 + SIGTERM, the usual code
#: of a terminated process, so batch systems and scripts see that it did not finish).
EXIT_INTERRUPTED = 128 + int(signal.SIGTERM)

# Collectives wait this long for the slowest rank (rank 0 alone builds GMMs and writes files while the
# others wait): generous, because a hung rank is killed by the launcher anyway.
_TIMEOUT = datetime.timedelta(minutes=float(os.environ.get("GMMREFINE_DIST_TIMEOUT_MIN", "720")))


class Interrupted(Exception):
    """The run stopped at a safe point after SIGTERM; its outputs and checkpoints are consistent and
    ``--continue`` resumes it."""


@dataclass(frozen=True)
class Context:
    """This process's place in the job.

    Attributes:
        rank, world_size: global rank and number of processes.
        local_rank, local_world_size: the same on this node.
        device: the torch device this rank computes on (``cuda:<local_rank>`` for ``cuda``).
        backend: ``"gloo"``, ``"nccl"`` or None (one process, no process group).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: str = "cpu"
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: builds GMMs, makes maps, writes every file."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """More than one process."""
        return self.world_size > 1


_CONTEXT = Context()


def current() -> Context:
    """The context set by :func:`init` (one process until then)."""
    return _CONTEXT


def launch_environment(env: dict | None = None) -> tuple[int, int, int, int] | None:
    """``(rank, world_size, local_rank, local_world_size)`` from torchrun's or srun's variables, or
    None when the process was not started as one of several."""
    environ: Mapping[str, Any] = os.environ if env is None else env
    if "RANK" in environ and "WORLD_SIZE" in environ:
        rank, world = int(environ["RANK"]), int(environ["WORLD_SIZE"])
        local = int(environ.get("LOCAL_RANK", rank))
        local_world = int(environ.get("LOCAL_WORLD_SIZE", world))
    elif "SLURM_PROCID" in environ and "SLURM_STEP_NUM_TASKS" in environ and "MASTER_ADDR" in environ:
        rank, world = int(environ["SLURM_PROCID"]), int(environ["SLURM_STEP_NUM_TASKS"])
        local = int(environ.get("SLURM_LOCALID", 0))
        # "4(x2),3" -> tasks per node; this node's count is not named, so take the first.
        per_node = environ.get("SLURM_STEP_TASKS_PER_NODE", str(world)).split(",")[0].split("(")[0]
        local_world = int(per_node or world)
    else:
        return None
    return (rank, world, local, local_world) if world > 1 else None


def backend_and_device(device: str, local_rank: int, world_size: int) -> tuple[str, str]:
    """``(backend, this rank's device)``: NCCL and ``cuda:<local_rank>`` for a plain ``cuda`` device
    with several processes, gloo and the device unchanged otherwise."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        if world_size > 1 and dev.index is None:
            return "nccl", f"cuda:{local_rank}"
        return "nccl", str(dev)
    return "gloo", str(dev)


def init(device: str = "cpu") -> Context:
    """Join the process group the launcher prepared (once; later calls return the same context).

    Args:
        device: the run's ``--device`` (``auto``: CUDA when present); with several processes ``cuda``
            becomes ``cuda:<LOCAL_RANK>``.

    Returns:
        The :class:`Context` (a single-process one without a launcher).
    """
    global _CONTEXT
    if _CONTEXT.active:
        return _CONTEXT
    from gmmrefine.devices import device_name

    device = device_name(device)  # "auto": CUDA when present, else the CPU
    found = launch_environment()
    if found is None:
        _CONTEXT = Context(device=str(device))
        return _CONTEXT
    import torch
    import torch.distributed as dist

    from gmmrefine.errors import InputError

    rank, world, local, local_world = found
    backend, rank_device = backend_and_device(device, local, world)
    if backend == "nccl":
        if not torch.cuda.is_available() or torch.device(rank_device).index >= torch.cuda.device_count():
            raise InputError(f"--device {device}: rank {rank} needs GPU {rank_device}, but this node has "
                             f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}.", field="--device")
        torch.cuda.set_device(torch.device(rank_device))
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise InputError("several processes but MASTER_ADDR / MASTER_PORT are not set: launch with torchrun, or "
                         "export them before srun (README, Scaling out).", field="MASTER_ADDR")
    if not dist.is_initialized():
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=_TIMEOUT)
    _CONTEXT = Context(rank=rank, world_size=world, local_rank=local, local_world_size=local_world,
                       device=rank_device, backend=backend)
    task_threads = torch.get_num_threads()
    _THREADS["task"] = task_threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    _THREADS["alone"] = max(1, min(cores, task_threads * local_world))
    return _CONTEXT


def shutdown() -> None:
    """Leave the process group (end of a command)."""
    global _CONTEXT
    if _CONTEXT.active:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    _CONTEXT = Context()


# ------------------------------------------------------------------------------------------------
# Sharding
# ------------------------------------------------------------------------------------------------

def shard(n: int, block: int = 1, rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of ``n`` that rank ``rank`` of ``world_size`` takes (module docstring).

    Args:
        n: number of rows.
        block: rows per block (shards are whole blocks).
        rank, world_size: default: this process's.
    """
    ctx = current()
    rank = ctx.rank if rank is None else rank
    world_size = ctx.world_size if world_size is None else world_size
    block = max(int(block), 1)
    n_blocks = -(-n // block)
    lo = min(rank * n_blocks // world_size * block, n)
    hi = min((rank + 1) * n_blocks // world_size * block, n)
    return lo, hi


def max_blocks(n: int, block: int, world_size: int | None = None) -> int:
    """The largest number of blocks any rank's shard holds (loops that agree at block boundaries run
    this many steps on every rank)."""
    world_size = current().world_size if world_size is None else world_size
    block = max(int(block), 1)
    n_blocks = -(-n // block)
    return max(((r + 1) * n_blocks // world_size) - (r * n_blocks // world_size) for r in range(world_size))


# ------------------------------------------------------------------------------------------------
# Collectives (no-ops with one process)
# ------------------------------------------------------------------------------------------------

def barrier() -> None:
    ctx = current()
    if ctx.active:
        import torch.distributed as dist

        if ctx.backend == "nccl":
            dist.barrier(device_ids=[ctx.local_rank])
        else:
            dist.barrier()


def all_reduce_sum_(tensor) -> None:
    """Sum ``tensor`` over ranks, in place (complex tensors as their real view)."""
    ctx = current()
    if ctx.active:
        import torch
        import torch.distributed as dist

        dist.all_reduce(torch.view_as_real(tensor) if tensor.is_complex() else tensor, op=dist.ReduceOp.SUM)


def sum_accumulators_(accs: dict) -> None:
    """Sum Fourier accumulators (``.data``, ``.weight``, ``.count``) over ranks, in place."""
    ctx = current()
    if not ctx.active:
        return
    import torch

    for key in sorted(accs):
        acc = accs[key]
        all_reduce_sum_(acc.data)
        all_reduce_sum_(acc.weight)
        count = torch.tensor([acc.count], dtype=torch.int64, device=acc.data.device)
        all_reduce_sum_(count)
        acc.count = int(count.item())


def _flag_reduce(value: int, op: str) -> int:
    ctx = current()
    if not ctx.active:
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64, device=ctx.device if ctx.backend == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.MIN)
    return int(t.item())


def all_max(value: int) -> int:
    """The largest ``value`` over ranks."""
    return _flag_reduce(int(value), "max")


def all_min(value: int) -> int:
    """The smallest ``value`` over ranks."""
    return _flag_reduce(int(value), "min")


def all_gather_object(obj: Any) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (CPU objects; pickled)."""
    ctx = current()
    if not ctx.active:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any = None) -> Any:
    """Rank 0's ``obj`` on every rank (CPU objects; pickled)."""
    ctx = current()
    if not ctx.active:
        return obj
    import torch.distributed as dist

    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable, *args, **kwargs) -> Any:
    """Run ``fn`` on rank 0 only while the others wait; an :class:`~gmmrefine.errors.InputError` it
    raises is raised on every rank (so all ranks exit with the same clear message, none hangs).

    Returns:
        ``fn``'s result on rank 0, None elsewhere.
    """
    from gmmrefine.errors import InputError

    ctx = current()
    if not ctx.active:
        return fn(*args, **kwargs)
    result, error = None, None
    if ctx.is_main:
        try:
            result = fn(*args, **kwargs)
        except InputError as err:
            error = (str(err), err.path, err.field)
    error = broadcast_object(error)
    if error is not None:
        raise InputError(error[0], path=error[1], field=error[2])
    return result


# ------------------------------------------------------------------------------------------------
# Rank 0 leads, the others serve
# ------------------------------------------------------------------------------------------------
# A refinement job is a sequence of steps; only the passes over particles are worth sharing. Rank 0
# runs the job loop (GMMs, maps, files) and, at each pass, sends the pass's arguments to the other
# ranks, which run the same function on their shards and join its collectives. So code added to the
# loop runs on rank 0 only unless it is such a task: other ranks can never write a file by mistake.

_EXIT = "exit"
# Whether rank 0 is inside a task the other ranks run too (their collectives then pair with its own).
_TASK = {"open": False}
# CPU threads of rank 0 inside tasks (its share of the node) and outside them, while the other ranks
# on its node wait idle (GMM fits, map inversion): then it may use the whole node's share.
_THREADS: dict[str, int | None] = {"task": None, "alone": None}


def _set_threads(which: str) -> None:
    n = _THREADS[which]
    if n is not None and current().device.startswith("cpu"):
        import torch

        torch.set_num_threads(n)


def send_task(name: str, kwargs: dict) -> None:
    """Rank 0: make every other rank (waiting in :func:`serve`) call task ``name`` with ``kwargs``.
    Rank 0 then runs the same task and calls :func:`task_done` at its end."""
    ctx = current()
    if ctx.active and ctx.is_main:
        pickle.dumps(kwargs)  # fail here, on rank 0 with a clear error, rather than inside the broadcast
        broadcast_object((name, kwargs))
        _TASK["open"] = True
        _set_threads("task")


def task_done() -> None:
    """Rank 0: the task sent by :func:`send_task` completed on every rank."""
    ctx = current()
    if ctx.active and ctx.is_main:
        _TASK["open"] = False
        _set_threads("alone")


def serve(tasks: dict[str, Callable[..., Any]]) -> int:
    """Other ranks: run the tasks rank 0 sends until it says the job is over.

    Returns:
        The exit code rank 0 sent (0 when the job finished).
    """
    while True:
        name, kwargs = broadcast_object()
        if name == _EXIT:
            return int(kwargs.get("code", 0))
        tasks[name](**kwargs)


@contextlib.contextmanager
def leading() -> Iterator[None]:
    """Rank 0's side of :func:`serve`: on leaving the block, tell the other ranks to exit with code 0,
    :data:`EXIT_INTERRUPTED`, 2 (bad input) or 1 (an error).

    Not when it leaves inside a task: then the other ranks are in the task's collectives, not waiting
    for a message. After an agreed stop they raise :class:`Interrupted` themselves; after an error on
    rank 0 alone, rank 0 exits and the launcher ends the others (``srun --kill-on-bad-exit=1``).
    """
    from gmmrefine.errors import EXIT_INPUT_ERROR, InputError

    ctx = current()
    code = 1
    if ctx.active and ctx.is_main:
        _set_threads("alone")
    try:
        yield
        code = 0
    except Interrupted:
        code = EXIT_INTERRUPTED
        raise
    except InputError:
        code = EXIT_INPUT_ERROR
        raise
    finally:
        if ctx.active and ctx.is_main and not _TASK["open"]:
            broadcast_object((_EXIT, {"code": code}))


# ------------------------------------------------------------------------------------------------
# Graceful stop
# ------------------------------------------------------------------------------------------------

_STOP = {"signal": None}


@contextlib.contextmanager
def stop_on_signal(signals: tuple = (signal.SIGTERM,)) -> Iterator[None]:
    """Within the block, ``signals`` set the stop flag instead of ending the process; the previous
    handlers come back afterwards (main thread only)."""
    def handler(signum, frame):
        _STOP["signal"] = signum

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def stop_requested() -> bool:
    """Whether this process received a stop signal."""
    return _STOP["signal"] is not None


def stop_agreed() -> bool:
    """Whether any rank received a stop signal (a collective: every rank must call it at the same point)."""
    return bool(all_max(int(stop_requested())))
