"""Observers attached to layers during calibration: per-channel statistics and a bounded row sample.

Memory per layer is O(K) for the statistics plus O(max_rows * K) for the sample, however long the
user's forward loop runs. The sample is a uniform random subset of all rows seen (priority sampling
with seeded keys), so it does not depend on how the forward loop batches its inputs... given the same
sequence of calls.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from ..nn.linear import conv_rows


class CalibrationError(RuntimeError):
    """Raised when calibration data is unusable (NaN/Inf inputs, a layer never called, ...)."""


@dataclass
class LayerStats:
    """What calibration learned about one layer's input (K = in_features, unpadded).

    absmax: (K,) fp32 max |x| per input channel over every row seen
    rows:   (n, K) fp32 a uniform sample of at most ``max_rows`` input rows (n <= max_rows)
    rows_seen: total number of rows observed; calls: number of forward calls observed
    """

    absmax: Tensor
    rows: Tensor
    rows_seen: int
    calls: int

    @property
    def zero_channels(self) -> int:
        """Input channels that were exactly zero in every row seen (smoothing cannot size them)."""
        return int((self.absmax == 0).sum())


class ActivationObserver:
    """Forward pre-hook recording a layer's input statistics."""

    def __init__(self, name: str, module: nn.Module, max_rows: int, seed: int, step_counter: list):
        self.name = name
        self.module = module
        self.max_rows = max_rows
        self.generator = torch.Generator().manual_seed(seed)
        self.step_counter = step_counter  # shared [int]: model-level forward calls so far
        self.absmax: Optional[Tensor] = None
        self.rows: Optional[Tensor] = None
        self.keys: Optional[Tensor] = None
        self.rows_seen = 0
        self.calls = 0
        self.handle = module.register_forward_pre_hook(self)

    def to_rows(self, x: Tensor) -> Tensor:
        if isinstance(self.module, nn.Conv2d):
            return conv_rows(self.module, x)
        return x.reshape(-1, x.shape[-1])

    @torch.no_grad()
    def __call__(self, module: nn.Module, args) -> None:
        x = args[0]
        self.calls += 1
        rows = self.to_rows(x.detach()).float()  # (M, K)
        if rows.shape[0] == 0:  # an empty batch: nothing to learn from this call
            return
        if not torch.isfinite(rows).all():
            bad = int((~torch.isfinite(rows)).sum())
            raise CalibrationError(
                f"layer {self.name!r} received {bad} NaN/Inf input values at calibration step "
                f"{self.step_counter[0]} (call {self.calls} of this layer). Check the forward loop's inputs "
                f"and the model in 16-bit before quantizing."
            )
        amax = rows.abs().amax(dim=0).cpu()
        self.absmax = amax if self.absmax is None else torch.maximum(self.absmax, amax)
        self.rows_seen += rows.shape[0]
        keys = torch.rand(rows.shape[0], generator=self.generator)
        take = min(self.max_rows, rows.shape[0])
        top = torch.topk(keys, take).indices  # best new rows first, so the merge stays small
        new_rows, new_keys = rows[top.to(rows.device)].cpu(), keys[top]
        if self.rows is None:
            self.rows, self.keys = new_rows, new_keys
        else:
            all_rows = torch.cat([self.rows, new_rows])
            all_keys = torch.cat([self.keys, new_keys])
            keep = torch.topk(all_keys, min(self.max_rows, all_keys.numel())).indices
            self.rows, self.keys = all_rows[keep], all_keys[keep]

    def finish(self) -> LayerStats:
        self.handle.remove()
        if self.calls == 0:
            raise CalibrationError(
                f"layer {self.name!r} was never called by the forward loop; exclude it from quantization "
                f"(config exclude=[...]) or make the loop exercise it"
            )
        if self.rows_seen == 0:
            raise CalibrationError(
                f"layer {self.name!r} was called {self.calls} time(s) but only with empty (zero-row) inputs; "
                f"give the forward loop batches with at least one row"
            )
        return LayerStats(self.absmax, self.rows, self.rows_seen, self.calls)

    def remove(self) -> None:
        self.handle.remove()
