"""Calibration for any model: prepare observers, run the user's forward loop, collect statistics."""
from __future__ import annotations

from typing import Any, Callable, Optional, Protocol

import torch
from torch import nn

from ..utils.progress import Progress
from .observers import ActivationObserver, CalibrationError, InputHealth, LayerStats, PartialStats, merge_partials
from .targets import Skipped, Target, layer_in_features, select_targets


class Collective(Protocol):
    """What calibration needs from a group of processes (``fourbit.distributed.Ranks`` is one)."""

    rank: int
    world_size: int

    def gather(self, obj: Any, what: str = ...) -> list:
        """Every process's ``obj`` in rank order, on every process."""


def calibrate(model: nn.Module, targets: list[Target], forward_loop: Callable[[nn.Module], None],
              max_rows: int = 512, seed: int = 0, collective: Optional[Collective] = None,
              progress: bool = True) -> dict[str, LayerStats]:
    """Run ``forward_loop(model)`` with observers on ``targets``; hooks are always removed afterwards.
    ``progress`` counts the model's forward calls on stderr (the loop's length is unknown).

    With a ``collective`` of several processes, each runs its own share of the calibration data and the
    statistics are merged exactly (every process gets the same result, equal to one process seeing all rows).
    """
    step = [0]
    bar = Progress(None, f"fourbit calibration ({len(targets)} layers)", enabled=progress, unit="forward calls")
    health = InputHealth()
    observers: list = []

    def count_step(_module, _args):  # NaN/Inf of the previous forward call: one device sync per model call
        health.check(observers)
        step[0] += 1
        bar.update(1)

    top_handle = model.register_forward_pre_hook(count_step)
    observers += [ActivationObserver(t.name, t.module, max_rows, seed + i, step, health)
                  for i, t in enumerate(targets)]
    try:
        with torch.no_grad():
            forward_loop(model)
        health.check(observers)
        partials = {o.name: o.partial() for o in observers}
    finally:
        bar.close()
        top_handle.remove()
        for o in observers:
            o.remove()
    stats = {}
    for name, part in partials.items():  # one layer at a time: bounded memory in the gather
        parts = [part] if collective is None or collective.world_size == 1 else \
            collective.gather(part, f"calibration statistics of {name!r}")
        stats[name] = merge_partials(name, parts, max_rows)
    return stats


__all__ = ["calibrate", "select_targets", "Target", "Skipped", "LayerStats", "PartialStats", "CalibrationError",
           "ActivationObserver", "InputHealth", "Collective", "merge_partials", "layer_in_features"]
