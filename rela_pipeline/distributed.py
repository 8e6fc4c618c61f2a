"""One process, or one rank of a ``torchrun`` job: the process group and the few collectives the
stages use.

``torchrun`` (``torch.distributed.run``) starts ``--nproc-per-node`` processes per node and gives
each the environment ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT`` (PyTorch docs, "torchrun (Elastic Launch)").
:func:`init_distribution` reads it: without it (or with ``WORLD_SIZE=1``) everything runs in one
process and every collective here is the identity. With it, the process group uses NCCL on CUDA
and gloo on CPU, and each rank trains on ``cuda:LOCAL_RANK`` (or the CPU).

Faults: a rank that raises exits non-zero with its one-line error prefixed by its rank
(:func:`rank_prefix`), and torchrun then stops the other ranks and exits non-zero; a rank that
dies (``kill -9``, the OOM killer) is seen by torchrun the same way. A collective that waits for
a rank that neither finishes nor dies fails after a timeout, of which there are two:

* ``timeout_s`` (``--dist-timeout``) for collectives between ranks doing the same work: the
  training step's all-reduce, the barrier after every rank's share of a phase;
* ``wait_timeout_s`` (``--dist-wait-timeout``) for the other ranks while rank 0 works alone
  (:meth:`Distribution.on_main`: verifying a shard set, fitting the transport, building and tuning
  the score index: about 7 minutes at 10M samples on 2 CPU cores, longer than a collective
  timeout should be). That wait runs on a separate gloo group with its own timeout, on the CPU,
  so no NCCL collective is pending and NCCL's watchdog has nothing to abort.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .errors import RelaError
from .settings import DEFAULT_TIMEOUT_S, DEFAULT_WAIT_TIMEOUT_S  # noqa: F401  (re-exported)

T = TypeVar("T")

logger = logging.getLogger("rela_pipeline")


def torchrun_world() -> tuple[int, int] | None:
    """``(rank, world size)`` from torchrun's environment, or None outside torchrun (or with one process).

    Raises:
        RelaError: a malformed ``RANK`` / ``WORLD_SIZE``.
    """
    world = os.environ.get("WORLD_SIZE")
    if world is None:
        return None
    try:
        rank, size = int(os.environ.get("RANK", "0")), int(world)
    except ValueError:
        raise RelaError(f"RANK={os.environ.get('RANK')!r} and WORLD_SIZE={world!r} are not integers") from None
    if size < 1 or not 0 <= rank < size:
        raise RelaError(f"RANK={rank} is outside WORLD_SIZE={size}")
    return (rank, size) if size > 1 else None


def rank_prefix() -> str:
    """``"rank R of W: "`` under a torchrun job of several processes, else ``""`` (error lines)."""
    try:
        world = torchrun_world()
    except RelaError:
        return ""
    return f"rank {world[0]} of {world[1]}: " if world else ""


@dataclass
class Distribution:
    """Where this process stands in the job.

    Attributes:
        rank, world_size: this process and the number of processes (0 and 1 alone).
        local_rank, local_world_size: the same on this node.
        backend: ``"nccl"``, ``"gloo"`` or None (one process).
        owns_group: whether :func:`init_distribution` created the process group (and
            :meth:`close` destroys it); False when the caller had already made one.
        wait_group: the gloo group :meth:`on_main` waits on (its timeout is the wait timeout);
            None in one process.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None
    owns_group: bool = False
    wait_group: Any = None

    @property
    def enabled(self) -> bool:
        """Whether there are several processes."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes the run's files."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.enabled:
            dist.barrier()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of ``tensor`` over the ranks (a new tensor; every rank gets it)."""
        if not self.enabled:
            return tensor
        total = tensor.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise mean of a float ``tensor`` over the ranks (every rank gets the same value)."""
        return self.sum(tensor) / self.world_size if self.enabled else tensor

    def gather(self, value: T) -> list[T]:
        """Every rank's picklable ``value``, in rank order, on every rank."""
        if not self.enabled:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def broadcast(self, value: T) -> T:
        """Rank 0's picklable ``value`` on every rank."""
        if not self.enabled:
            return value
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, work: Callable[[], T]) -> T:
        """Run ``work`` on rank 0 only and give its result to every rank. The other ranks wait
        on :attr:`wait_group`, i.e. up to the wait timeout, however long ``work`` takes.

        Raises:
            RelaError: ``work`` raised one on rank 0 (every rank raises it, with rank 0's message
                and exit code, so the job ends on all ranks at once instead of waiting).
        """
        outcome: tuple[str, Any] = ("ok", None)
        if self.is_main:
            try:
                outcome = ("ok", work())
            except RelaError as error:
                if not self.enabled:
                    raise
                outcome = ("error", (str(error), error.exit_code))
        if self.enabled:
            box = [outcome if self.is_main else None]
            dist.broadcast_object_list(box, src=0, group=self.wait_group)
            outcome = box[0]
        kind, value = outcome
        if kind == "error":
            message, code = value
            raise RelaError(message if self.is_main else f"stopped with rank 0: {message}", exit_code=code)
        return value

    def close(self) -> None:
        """Leave the process group (after the last collective) if this module created it, else
        only the wait group it added."""
        if not dist.is_initialized():
            return
        if self.owns_group:
            dist.destroy_process_group()
        elif self.wait_group is not None:
            dist.destroy_process_group(self.wait_group)
        self.wait_group = None


def init_distribution(
    device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S, wait_timeout_s: float = DEFAULT_WAIT_TIMEOUT_S
) -> tuple[Distribution, torch.device]:
    """Join torchrun's process group if there is one, and choose this process's device. A process
    group the caller already initialised (their own DDP script) is used as it is.

    Args:
        device: ``"auto"``, ``"cpu"`` or ``"cuda"`` (``"cuda:N"`` in one process only); under
            torchrun ``auto`` and ``cuda`` mean ``cuda:LOCAL_RANK`` when CUDA is available.
        timeout_s: how long a collective waits for the other ranks (seconds).
        wait_timeout_s: how long the other ranks wait while rank 0 works alone (seconds; at
            least ``timeout_s`` is used).

    Returns:
        ``(Distribution, device)``; one process: ``(Distribution(), resolve_device(device))``.

    Raises:
        RelaError: a malformed torchrun environment, ``cuda:N`` under torchrun, CUDA requested
            but missing, fewer GPUs on the node than ranks, or a process group that does not form.
    """
    from .runtime import resolve_device

    world = torchrun_world()
    if world is None:
        return Distribution(), resolve_device(device)
    if timeout_s <= 0:
        raise RelaError(f"--dist-timeout must be positive, got {timeout_s}")
    if wait_timeout_s <= 0:
        raise RelaError(f"--dist-wait-timeout must be positive, got {wait_timeout_s}")
    rank, size = world
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if dist.is_initialized():
        if (dist.get_rank(), dist.get_world_size()) != (rank, size):
            raise RelaError(f"the process group's rank {dist.get_rank()} of {dist.get_world_size()} is not torchrun's RANK {rank} of WORLD_SIZE {size}")
    if device.startswith("cuda:"):
        raise RelaError(f"--device {device}: under torchrun give --device auto or cuda (each rank takes cuda:LOCAL_RANK)")
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RelaError(f"LOCAL_RANK {local_rank} but this node has {torch.cuda.device_count()} GPUs (--nproc-per-node at most the GPU count)")
        resolved = torch.device("cuda", local_rank)
        torch.cuda.set_device(resolved)
    owns_group = not dist.is_initialized()
    backend = "nccl" if resolved.type == "cuda" else "gloo"
    try:
        if owns_group:
            options: dict[str, Any] = {"device_id": resolved} if backend == "nccl" else {}
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **options)
        else:
            backend = str(dist.get_backend())
        wait_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=max(timeout_s, wait_timeout_s)))
    except (RuntimeError, ValueError) as error:
        raise RelaError(f"the process group ({backend}) did not form: {str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
    return Distribution(rank, size, local_rank, local_size, backend, owns_group=owns_group, wait_group=wait_group), resolved


@contextlib.contextmanager
def collective_failures(distribution: Distribution) -> Iterator[None]:
    """Turn a failed collective (another rank died, or the group's timeout passed) into one line.

    Raises:
        RelaError: for :class:`torch.distributed.DistError` and the gloo/NCCL runtime errors a
            collective raises when a peer goes away, in a distributed run.
    """
    try:
        yield
    except RuntimeError as error:
        text = str(error)
        lost = isinstance(error, torch.distributed.DistError) or any(mark in text for mark in ("gloo", "NCCL", "Connection closed", "Connection reset"))
        if not distribution.enabled or not lost:
            raise
        raise RelaError(
            f"lost contact with the other ranks (another rank failed or the collective timed out: {_gist(text) or type(error).__name__}); "
            "torchrun names the failed rank"
        ) from None


def _gist(message: str) -> str:
    """The first sentence of a backend error, without its source-location prefix
    (``[.../pair.cc:537] Read error ...: Connection reset by peer. This is ...`` -> ``Read error ...: Connection reset by peer``)."""
    first = next((line.strip() for line in message.splitlines() if line.strip()), "")
    first = re.sub(r"^\[[^\]]*\]\s*", "", first)
    return first.split(". ")[0][:160]


@contextlib.contextmanager
def quiet_unless_main(distribution: Distribution) -> Iterator[None]:
    """Log only warnings and errors on ranks other than 0 while the block runs (rank 0 speaks for the job)."""
    if distribution.is_main:
        yield
        return
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)
