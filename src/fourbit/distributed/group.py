"""The process group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and the few
collectives fourbit needs, each under one timeout.

``Ranks`` is also the single-process case (world size 1): then nothing imports or initialises
``torch.distributed`` and every collective is the identity, so one code path serves both.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch

from .failure import injected_failure, install_signal_report, report_and_exit, short
from .shard import batch_slices, shard_batches

DEFAULT_TIMEOUT_S = 1800.0  # per collective, torch's own default for gloo; FOURBIT_DIST_TIMEOUT overrides (s)


class RankFailure(RuntimeError):
    """A collective failed or timed out: another rank died, stalled or was stopped."""


@dataclass(frozen=True)
class Ranks:
    """Where this process stands: ``rank`` of ``world_size``, its device, and the collectives."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    backend: Optional[str] = None  # "gloo" / "nccl" when world_size > 1
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    @property
    def label(self) -> str:
        return f"fourbit: rank {self.rank} of {self.world_size}"

    def shard(self, n: int, batch_size: int) -> list[slice]:
        """This rank's batches of ``n`` items (see ``shard.shard_batches``)."""
        return shard_batches(n, batch_size, self.rank, self.world_size)

    # ---- collectives (identity in a single process) --------------------------------------------------
    def _run(self, what: str, fn):
        import torch.distributed as dist

        try:
            return fn(dist)
        except Exception as e:  # gloo/nccl raise RuntimeError subclasses with multi-line messages
            raise RankFailure(f"{what} failed or passed the {self.timeout_s:g}s timeout: another rank failed, "
                              f"stalled or was stopped (see its line); {short(e)}") from e

    def gather(self, obj: Any, what: str = "gather") -> list:
        """Every rank's ``obj``, in rank order, on every rank (pickled: keep tensors on the CPU)."""
        if self.world_size == 1:
            return [obj]
        out: list = [None] * self.world_size
        self._run(what, lambda dist: dist.all_gather_object(out, obj))
        return out

    def gather_to_root(self, obj: Any, what: str = "gather to rank 0") -> Optional[list]:
        """Every rank's ``obj`` in rank order on rank 0; None on the other ranks."""
        if self.world_size == 1:
            return [obj]
        out: Optional[list] = [None] * self.world_size if self.is_root else None
        self._run(what, lambda dist: dist.gather_object(obj, out, dst=0))
        return out

    def barrier(self, what: str = "barrier") -> None:
        if self.world_size > 1:
            self._run(what, lambda dist: dist.barrier())

    def gather_batches(self, parts: Sequence[torch.Tensor], n: int, batch_size: int,
                       to_all: bool = False) -> Optional[torch.Tensor]:
        """Put back together per-batch results: ``parts`` are this rank's outputs for ``self.shard(n, batch_size)``
        in order; returns all ``n`` rows in item order (on rank 0, or on every rank with ``to_all``), else None."""
        batches = self._in_batch_order([p.cpu() for p in parts], n, batch_size, to_all)
        if batches is None:
            return None
        return torch.cat(batches) if batches else torch.empty(0)

    def gather_items(self, parts: Sequence[list], n: int, batch_size: int, to_all: bool = False) -> Optional[list]:
        """Like ``gather_batches`` for lists of any picklable items (PIL images, file names, ...): one flat list
        of all ``n`` items in order."""
        batches = self._in_batch_order([list(p) for p in parts], n, batch_size, to_all)
        return None if batches is None else [item for batch in batches for item in batch]

    def _in_batch_order(self, parts: list, n: int, batch_size: int, to_all: bool) -> Optional[list]:
        if len(parts) != len(self.shard(n, batch_size)):
            raise ValueError(f"rank {self.rank} has {len(parts)} result batches for "
                             f"{len(self.shard(n, batch_size))} assigned batches")
        per_rank = self.gather(parts, "gather results") if to_all else self.gather_to_root(parts, "gather results")
        if per_rank is None:
            return None
        return [per_rank[i % self.world_size][i // self.world_size] for i in range(len(batch_slices(n, batch_size)))]


def _timeout_from_env() -> float:
    raw = os.environ.get("FOURBIT_DIST_TIMEOUT")
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ValueError(f"FOURBIT_DIST_TIMEOUT={raw!r} is not a positive number of seconds; set e.g. 600")
    return value


def init_from_env(device: Optional[str] = None, timeout_s: Optional[float] = None) -> Ranks:
    """Join torchrun's process group (gloo on CPU, nccl on CUDA), or return the single-process ``Ranks``.

    ``device``: "cpu", "cuda" or None (cuda when available); under torchrun a CUDA rank uses ``cuda:LOCAL_RANK``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = device.startswith("cuda") if device else torch.cuda.is_available()
    timeout = _timeout_from_env() if timeout_s is None else float(timeout_s)
    if world <= 1:
        return Ranks(device=device or ("cuda" if want_cuda else "cpu"), timeout_s=timeout)
    from datetime import timedelta

    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        if torch.cuda.device_count() <= local_rank:
            raise ValueError(f"rank {rank} needs GPU {local_rank} but {torch.cuda.device_count()} are visible; "
                             f"start at most that many processes per node")
        torch.cuda.set_device(local_rank)
        os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")  # a timed-out collective raises in Python
        backend, dev = "nccl", f"cuda:{local_rank}"
    else:
        backend, dev = "gloo", "cpu"
    ranks = Ranks(rank, world, local_rank, dev, backend, timeout)
    if not dist.is_initialized():
        ranks._run("joining the process group", lambda d: d.init_process_group(
            backend, timeout=timedelta(seconds=timeout), rank=rank, world_size=world))
    ranks.barrier("the start barrier")  # every rank is up before any work (and before the test hooks fire)
    return ranks


@contextmanager
def launch(device: Optional[str] = None, timeout_s: Optional[float] = None) -> Iterator[Ranks]:
    """``with launch(device) as ranks:`` run one command on this rank; in a multi-process run any error (its own
    or a failed collective) or the launcher's SIGTERM prints one line and ends the process at once.

    No barrier on the way out: end the collective work with ``ranks.barrier(...)`` so that a rank that stalls
    after its last collective is caught by the others' timeout instead of keeping the launcher waiting.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield init_from_env(device, timeout_s)
        return
    label = Ranks(int(os.environ.get("RANK", "0")), world).label
    install_signal_report(label)  # before the rendezvous: the launcher may stop us as soon as a peer fails
    try:
        ranks = init_from_env(device, timeout_s)
        injected_failure(ranks.rank)
        yield ranks
    except BaseException as e:  # noqa: BLE001 - every way out of a rank must end it, with one line
        if isinstance(e, SystemExit) and not e.code:
            raise
        report_and_exit(f"{label} stopped" if isinstance(e, RankFailure) else f"{label} failed", e)
    import torch.distributed as dist

    dist.destroy_process_group()
