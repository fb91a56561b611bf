"""Which work items a rank runs: fixed batches dealt round-robin, so every batch is the same in any world size.

A batch's numbers depend on its composition (a GEMM over 8 rows may round differently from one over 16), so
the unit of sharding is the batch, never the single sample: with ``batch_size`` fixed, one process and N
processes run exactly the same batches, only on different ranks, and gathering them in batch order gives the
same tensors bit for bit. Pure Python: nothing here touches ``torch.distributed``.
"""
from __future__ import annotations


def batch_slices(n: int, batch_size: int) -> list[slice]:
    """The batches of ``n`` items in order: ``[0:b], [b:2b], ...``, the last one possibly shorter."""
    if n < 0 or batch_size < 1:
        raise ValueError(f"need n >= 0 and batch_size >= 1, got n={n}, batch_size={batch_size}")
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def shard_batches(n: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[slice]:
    """The batches rank ``rank`` runs: batches ``rank, rank + world_size, ...`` of ``batch_slices(n, batch_size)``.

    Round-robin keeps the ranks within one batch of each other. With more ranks than batches some ranks get
    none (they still take part in every collective).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size} process(es)")
    return batch_slices(n, batch_size)[rank::world_size]


def owner_of_batches(n: int, batch_size: int, world_size: int) -> list[int]:
    """For every batch of ``batch_slices(n, batch_size)``, the rank that runs it."""
    return [i % world_size for i in range(len(batch_slices(n, batch_size)))]


def split_items(items: list, batch_size: int, rank: int = 0, world_size: int = 1) -> list[tuple[slice, list]]:
    """This rank's batches of a list (prompts, seeds, ...): ``[(slice, items[slice]), ...]``."""
    return [(s, items[s]) for s in shard_batches(len(items), batch_size, rank, world_size)]
