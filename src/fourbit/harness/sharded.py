"""Sampling and calibration loops over this rank's batches (see ``fourbit.distributed``).

The batches are those of ``sample(..., batch_size)`` on all items, dealt round-robin across ranks; each batch
is sampled on its own, so a batch's images and activations are the same bits in any world size, and
``Ranks.gather_batches`` puts them back in seed order. With ``Ranks()`` (one process) these are plain loops.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from ..distributed import Ranks
from ..sampling import sample, sample_plan


def sample_sharded(ranks: Ranks, model: nn.Module, classes: torch.Tensor, seeds: Sequence[int], batch_size: int,
                   to_all: bool = False, progress: bool = False, **sample_kwargs: Any) -> Optional[torch.Tensor]:
    """``sample(model, classes, seeds, ...)`` with the batches spread over the ranks: all images in seed order
    on rank 0 (every rank with ``to_all``), None elsewhere."""
    if ranks.world_size == 1:  # the same batches (sample() cuts them alike), under one progress bar
        return sample(model, classes, seeds, batch_size=batch_size, progress=progress, **sample_kwargs)
    parts = [sample(model, classes[s], seeds[s], batch_size=batch_size, progress=progress and ranks.is_root,
                    **sample_kwargs) for s in ranks.shard(len(seeds), batch_size)]
    return ranks.gather_batches(parts, len(seeds), batch_size, to_all=to_all)


def sharded_calibration_loop(ranks: Ranks, num_samples: int, steps: int, *, seed: int, num_classes: int,
                             batch_size: int, **sample_kwargs: Any) -> Callable[[nn.Module], None]:
    """Like ``sampling.calibration_forward_loop``, over this rank's batches only (pass ``collective=ranks`` to
    ``quantize`` so the statistics are merged across ranks)."""
    classes, seeds = sample_plan(num_samples, seed, num_classes)

    def forward_loop(model: nn.Module) -> None:
        for s in ranks.shard(num_samples, batch_size):
            sample(model, classes[s], seeds[s], steps=steps, batch_size=batch_size, **sample_kwargs)

    return forward_loop
