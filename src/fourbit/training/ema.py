"""Exponential moving average of a model's weights, with the usual warm-up of the decay."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Keeps ``self.model``, an fp32 copy whose parameters follow ``p_ema += (1 - d) (p - p_ema)``.

    The decay warms up as d = min(max_decay, (1 + n) / (10 + n)) with n the number of updates so far, so early
    weights are forgotten quickly.
    """

    def __init__(self, model: nn.Module, max_decay: float = 0.9995) -> None:
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)
        self.max_decay = max_decay
        self.updates = 0

    def decay(self) -> float:
        return min(self.max_decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.decay()
        ema_p = list(self.model.parameters())
        src_p = [p.detach().float() for p in model.parameters()]
        torch._foreach_lerp_(ema_p, src_p, 1.0 - d)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)
        self.updates += 1
