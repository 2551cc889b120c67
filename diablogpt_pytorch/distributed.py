"""Past one process: ``torch.distributed`` set-up and the few collectives the pipeline needs.

Launch any script of this library with ``torchrun`` and call :func:`init_distributed` first:

    torchrun --nproc_per_node 4 -m diablogpt_pytorch.cli train             # one machine
    torchrun --nproc_per_node 4 examples/train.py                          # the same
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 \\
             --rdzv_backend c10d --rdzv_endpoint host0:29500 examples/train.py  # and node_rank 1

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`init_distributed` reads them (any launcher that sets them works), picks the device
(``cuda:LOCAL_RANK`` when CUDA is available, else CPU) and the backend that goes with it (nccl on
CUDA, gloo on CPU). Without those variables it sets nothing up and every helper here behaves as
in a single process (rank 0 of 1), so library code calls them unconditionally.

Failure handling. A rank that dies or stops responding must not leave the others waiting forever:

- every collective of the default group times out after ``timeout`` (default
  ``$DIABLOGPT_DIST_TIMEOUT`` seconds, else 600); with gloo a peer that died is noticed at once
  (its sockets close), one that hangs after the timeout;
- :func:`main_process_first` / :func:`barrier` synchronise over a separate CPU (gloo) group whose
  timeout is ``prepare_timeout`` (default ``$DIABLOGPT_PREPARE_TIMEOUT`` seconds, else 6 hours),
  because rank 0 may spend hours building a database while the others wait; and they carry
  rank 0's success or failure, so when rank 0 raises the others raise too instead of waiting;
- errors of the collectives here (and, through :func:`collective_errors`, of any block, e.g. a
  DDP backward pass) are re-raised as :class:`DistributedError`, naming this rank, what it was
  doing, the timeout and where to look.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional, Union

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

TIMEOUT_ENV = "DIABLOGPT_DIST_TIMEOUT"
PREPARE_TIMEOUT_ENV = "DIABLOGPT_PREPARE_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
DEFAULT_PREPARE_TIMEOUT_S = 6 * 3600.0

_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """A collective failed: another rank died, hung past the timeout, or reported a failure."""


@dataclass(frozen=True)
class DistributedInfo:
    """Where this process stands: rank / world_size (global), local_rank (on this machine),
    the device it computes on and the process-group backend (None when not distributed)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: Optional[str]

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


_control_group = None  # gloo group used by barrier / main_process_first (long timeout)
_cpu_group = None  # gloo group for CPU collectives (metrics, objects): the default timeout
_timeouts = {"default": DEFAULT_TIMEOUT_S, "prepare": DEFAULT_PREPARE_TIMEOUT_S}


def _seconds(value: Optional[float], env: str, default: float) -> float:
    if value is not None:
        seconds = float(value)
    else:
        raw = os.environ.get(env, "").strip()
        try:
            seconds = float(raw) if raw else default
        except ValueError:
            raise ValueError(f"${env}={raw!r} is not a number of seconds: set it like {env}=600")
    if seconds <= 0:
        raise ValueError(f"timeout must be positive, got {seconds} s (argument or ${env})")
    return seconds


def launched_distributed() -> bool:
    """True when the environment describes a distributed launch (``torchrun`` or equivalent)."""
    return all(v in os.environ for v in _LAUNCH_VARS)


def init_distributed(backend: Optional[str] = None, device: Optional[Union[str, torch.device]] = None,
                     timeout: Optional[float] = None, prepare_timeout: Optional[float] = None
                     ) -> DistributedInfo:
    """Set up the process group from torchrun's environment variables (idempotent).

    Args:
        backend: 'nccl' or 'gloo'; None picks nccl when this rank computes on CUDA, else gloo.
        device: this rank's device; None: ``cuda:LOCAL_RANK`` when CUDA is available, else CPU.
        timeout: seconds before a collective of the default group fails (None:
            ``$DIABLOGPT_DIST_TIMEOUT``, else 600).
        prepare_timeout: seconds the other ranks wait in :func:`main_process_first` /
            :func:`barrier` (None: ``$DIABLOGPT_PREPARE_TIMEOUT``, else 6 hours).

    Without ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` in the environment nothing is
    set up and the single-process info (rank 0 of 1) comes back.
    """
    global _control_group, _cpu_group
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", 0)))
    if device is None:
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if dist.is_initialized():
        return DistributedInfo(dist.get_rank(), dist.get_world_size(), local_rank, device,
                               dist.get_backend())
    if not launched_distributed():
        return DistributedInfo(0, 1, 0, device, None)

    _timeouts["default"] = _seconds(timeout, TIMEOUT_ENV, DEFAULT_TIMEOUT_S)
    _timeouts["prepare"] = _seconds(prepare_timeout, PREPARE_TIMEOUT_ENV, DEFAULT_PREPARE_TIMEOUT_S)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if backend is None:
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        if device.index >= torch.cuda.device_count():
            raise DistributedError(
                f"rank {rank} (LOCAL_RANK={local_rank}) wants {device} but this machine has "
                f"{torch.cuda.device_count()} CUDA device(s): launch at most that many processes "
                "per node (torchrun --nproc_per_node)")
        torch.cuda.set_device(device)
        # NCCL aborts a timed-out collective instead of blocking forever (torch's default too)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    elif backend == "nccl":
        raise DistributedError(f"backend 'nccl' needs a CUDA device but rank {rank} computes on "
                               f"{device}: use backend='gloo' (or leave backend=None)")
    kwargs = {"device_id": device} if backend == "nccl" else {}
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=_timeouts["default"]),
                                rank=rank, world_size=world_size, **kwargs)
        _control_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(
            seconds=_timeouts["prepare"]))
        _cpu_group = None if backend == "gloo" else dist.new_group(
            backend="gloo", timeout=datetime.timedelta(seconds=_timeouts["default"]))
    except Exception as err:
        raise DistributedError(
            f"rank {rank} of {world_size} could not join the process group at "
            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within "
            f"{_timeouts['default']:g} s ({type(err).__name__}: {err}). Check that every rank was "
            "started with the same MASTER_ADDR/MASTER_PORT/WORLD_SIZE and can reach that address"
        ) from err
    logger.info("rank %d of %d (local rank %d) on %s, backend %s, collective timeout %gs", rank,
                world_size, local_rank, device, backend, _timeouts["default"])
    return DistributedInfo(rank, world_size, local_rank, device, backend)


def cleanup() -> None:
    """Destroy the process group (safe to call when there is none)."""
    global _control_group, _cpu_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _control_group = _cpu_group = None


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 (and in a plain single process): the rank that writes files and logs."""
    return get_rank() == 0


# ----------------------------------------------------------------------------- failures


def _explain(what: str, err: BaseException, timeout: float) -> DistributedError:
    return DistributedError(
        f"rank {get_rank()} of {get_world_size()}: {what} failed: another rank probably died or "
        f"stopped responding (collectives give up after {timeout:g} s; set ${TIMEOUT_ENV} / "
        f"${PREPARE_TIMEOUT_ENV} to change it). Look at the other ranks' logs for the first "
        f"error. Cause: {type(err).__name__}: {str(err).strip()[:500]}")


@contextlib.contextmanager
def collective_errors(what: str) -> Iterator[None]:
    """Re-raise a failed collective inside the block (e.g. DDP's gradient all-reduce in
    ``loss.backward()``) as :class:`DistributedError` saying what this rank was doing.

    Only errors of the distributed backends are translated (``torch.distributed.DistError`` and
    the gloo / NCCL runtime errors); anything else passes through unchanged. A no-op when not
    distributed.
    """
    if not is_distributed():
        yield
        return
    try:
        yield
    except DistributedError:
        raise
    except dist.DistError as err:
        raise _explain(what, err, _timeouts["default"]) from err
    except RuntimeError as err:
        text = str(err)
        if any(s in text for s in ("gloo", "NCCL", "Connection reset", "Connection closed",
                                   "Timed out", "timed out")):
            raise _explain(what, err, _timeouts["default"]) from err
        raise


def _status_barrier(failed: bool, what: str) -> None:
    """All ranks meet; raises on every rank when any rank arrives with ``failed=True``."""
    if get_world_size() == 1:
        return
    flags = torch.zeros(get_world_size(), dtype=torch.int32)
    flags[get_rank()] = int(failed)
    try:
        dist.all_reduce(flags, group=_control_group)
    except RuntimeError as err:
        raise _explain(what, err, _timeouts["prepare"]) from err
    bad = [r for r, f in enumerate(flags.tolist()) if f]
    if bad and not failed:
        raise DistributedError(
            f"rank {get_rank()} of {get_world_size()}: rank(s) {bad} failed during {what}; see "
            f"their error above")


def barrier(what: str = "barrier") -> None:
    """Wait until every rank gets here (up to ``prepare_timeout``); a no-op in one process."""
    _status_barrier(False, what)


@contextlib.contextmanager
def main_process_first(what: str = "preparation") -> Iterator[bool]:
    """Rank 0 runs the block first while the other ranks wait; then the others run it.

    Yields ``is_main()``. Typical use: rank 0 builds (or validates) files, the others then only
    open them. If rank 0's block raises, every other rank raises :class:`DistributedError` at
    once instead of waiting; if it dies, they fail as soon as its sockets close; if it hangs,
    they give up after ``prepare_timeout``. A failure on a non-main rank is reported to all
    ranks at the closing barrier.
    """
    main = is_main()
    if not main:
        _status_barrier(False, f"{what} (waiting for rank 0)")
    try:
        yield main
    except BaseException:
        with contextlib.suppress(DistributedError):  # keep this rank's own error in front
            _status_barrier(True, what)
        raise
    if main:
        _status_barrier(False, what)
    _status_barrier(False, f"{what} (all ranks done)")


@contextlib.contextmanager
def all_ranks(what: str) -> Iterator[None]:
    """Every rank runs the block; they meet at its end, and if any rank's block raised, every
    rank raises (the failing rank its own error, the others :class:`DistributedError`)."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(DistributedError):
            _status_barrier(True, what)
        raise
    _status_barrier(False, what)


# ----------------------------------------------------------------------------- collectives


def broadcast_object(obj: Any = None, src: int = 0, what: str = "broadcast") -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (returned as is in one process)."""
    if get_world_size() == 1:
        return obj
    box = [obj if get_rank() == src else None]
    try:
        dist.broadcast_object_list(box, src=src, group=_cpu_group)
    except RuntimeError as err:
        raise _explain(what, err, _timeouts["default"]) from err
    return box[0]


def all_reduce_sum(values: Union[torch.Tensor, float, list], what: str = "all_reduce") -> torch.Tensor:
    """Element-wise sum over ranks, computed in float64 on CPU; returns a CPU float64 tensor."""
    tensor = torch.as_tensor(values, dtype=torch.float64).detach().cpu().clone()
    if get_world_size() == 1:
        return tensor
    try:
        dist.all_reduce(tensor, group=_cpu_group)
    except RuntimeError as err:
        raise _explain(what, err, _timeouts["default"]) from err
    return tensor


def reduce_metrics(metrics: Mapping[str, float], average: bool = False,
                   what: str = "reducing metrics") -> dict[str, float]:
    """Sum (or average, ``average=True``) each numeric value over ranks; same keys on every rank.

    Sum counts and totals (nats, tokens, sequences) and derive ratios afterwards: the mean of
    per-rank losses is not the loss of the whole set when ranks hold different token counts.
    """
    keys = sorted(metrics)
    total = all_reduce_sum([float(metrics[k]) for k in keys], what=what)
    if average:
        total = total / get_world_size()
    return {k: float(v) for k, v in zip(keys, total.tolist())}


def all_gather_object(obj: Any, what: str = "all_gather") -> list:
    """Every rank's picklable ``obj``, in rank order, on every rank (``[obj]`` in one process)."""
    if get_world_size() == 1:
        return [obj]
    box = [None] * get_world_size()
    try:
        dist.all_gather_object(box, obj, group=_cpu_group)
    except RuntimeError as err:
        raise _explain(what, err, _timeouts["default"]) from err
    return box


# ----------------------------------------------------------------------------- seeds


def rank_seed(seed: int, rank: Optional[int] = None) -> int:
    """This rank's seed derived from the run's ``seed``: ``seed`` itself on rank 0 (so one process
    draws what it always drew), a different, reproducible 63-bit seed on every other rank."""
    rank = get_rank() if rank is None else int(rank)
    if rank == 0:
        return int(seed)
    import numpy as np

    words = np.random.SeedSequence([int(seed) % 2**63, rank]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def seed_everything(seed: int, rank: Optional[int] = None) -> int:
    """Seed torch (CPU and every CUDA device), numpy and Python's ``random`` with
    :func:`rank_seed`, so that each rank draws its own reproducible stream (dropout masks differ
    between ranks) instead of every rank drawing the same. Initial weights may then differ
    between ranks: :func:`wrap_model` (DistributedDataParallel) copies rank 0's to the others.
    Returns the seed used."""
    import random

    import numpy as np

    mine = rank_seed(seed, rank)
    torch.manual_seed(mine)
    np.random.seed(mine % 2**32)
    random.seed(mine)
    return mine


# ----------------------------------------------------------------------------- models, shards


def wrap_model(model: torch.nn.Module, device: Optional[Union[str, torch.device]] = None,
               **ddp_kwargs) -> torch.nn.Module:
    """``DistributedDataParallel(model)`` when distributed, else ``model`` itself.

    The wrapped module shares its parameters with ``model``: keep a reference to ``model`` (or
    use :func:`unwrap_model`) to save checkpoints a single process can load. Gradients are
    averaged over ranks in ``backward``; use ``ddp.no_sync()`` on all but the last micro-batch
    of a gradient-accumulation step.
    """
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel

    device = torch.device(device) if device is not None else next(model.parameters()).device
    if device.type == "cuda":
        ddp_kwargs.setdefault("device_ids", [device.index if device.index is not None
                                             else torch.cuda.current_device()])
    return DistributedDataParallel(model, **ddp_kwargs)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside a DDP wrapper (or ``model`` itself)."""
    return getattr(model, "module", model)


def shard_range(num_items: int, rank: Optional[int] = None, world_size: Optional[int] = None,
                align: int = 1) -> tuple[int, int]:
    """This rank's contiguous ``[start, stop)`` of ``num_items``, boundaries on multiples of
    ``align`` (the last shard takes the remainder; shards may be empty when items are few).

    Ranks get ``ceil(blocks / world_size)`` or one block less, in rank order, so the shards of
    ranks 0..W-1 tile ``[0, num_items)`` exactly.
    """
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    if align < 1:
        raise ValueError(f"align must be >= 1, got {align}")
    blocks = -(-num_items // align)
    base, extra = divmod(blocks, world_size)
    first = rank * base + min(rank, extra)
    last = first + base + (1 if rank < extra else 0)
    return min(num_items, first * align), min(num_items, last * align)
