"""Calibration for any model: prepare observers, run the user's forward loop, collect statistics."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from ..utils.progress import Progress
from .observers import ActivationObserver, CalibrationError, LayerStats
from .targets import Skipped, Target, layer_in_features, select_targets


def calibrate(model: nn.Module, targets: list[Target], forward_loop: Callable[[nn.Module], None],
              max_rows: int = 512, seed: int = 0, progress: bool = True) -> dict[str, LayerStats]:
    """Run ``forward_loop(model)`` with observers on ``targets``; hooks are always removed afterwards.
    ``progress`` counts the model's forward calls on stderr (the loop's length is unknown)."""
    step = [0]
    bar = Progress(None, f"fourbit calibration ({len(targets)} layers)", enabled=progress, unit="forward calls")

    def count_step(_module, _args):
        step[0] += 1
        bar.update(1)

    top_handle = model.register_forward_pre_hook(count_step)
    observers = [ActivationObserver(t.name, t.module, max_rows, seed + i, step) for i, t in enumerate(targets)]
    try:
        with torch.no_grad():
            forward_loop(model)
        return {o.name: o.finish() for o in observers}
    finally:
        bar.close()
        top_handle.remove()
        for o in observers:
            o.remove()


__all__ = ["calibrate", "select_targets", "Target", "Skipped", "LayerStats", "CalibrationError",
           "ActivationObserver", "layer_in_features"]
