"""Several processes through ``torch.distributed`` (torchrun): the process group, batch sharding, gathers.

``python -m torch.distributed.run --nproc-per-node N -m fourbit compare ...`` runs each evaluation and calibration
batch on one rank (batches dealt round-robin, the same batches as one process), gathers the results in batch order
and lets rank 0 write. In a single process ``Ranks()`` is the identity and ``torch.distributed`` is never touched.
"""
from .group import DEFAULT_TIMEOUT_S, RankFailure, Ranks, init_from_env, launch
from .shard import batch_slices, owner_of_batches, shard_batches, split_items

__all__ = ["Ranks", "RankFailure", "init_from_env", "launch", "DEFAULT_TIMEOUT_S", "batch_slices",
           "shard_batches", "owner_of_batches", "split_items"]
