"""``record_rows``: the rows each layer is called with over one run of a forward loop."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def record_rows(model: nn.Module, modules: dict, forward_loop: Callable[[nn.Module], None]) -> dict:
    """{key: {rows per call: calls}} for ``modules`` ({key: linear-like or conv layer}) over one run of
    ``forward_loop(model)`` without gradients. Rows are the output's elements over its features: a linear's leading
    dimensions, a convolution's batch x output positions."""
    seen: dict = {key: {} for key in modules}

    def hook(key):
        def record(mod, args, out):
            features = getattr(mod, "out_features", None) or mod.out_channels
            rows = out.numel() // features
            seen[key][rows] = seen[key].get(rows, 0) + 1
        return record

    handles = [mod.register_forward_hook(hook(key)) for key, mod in modules.items()]
    try:
        with torch.no_grad():
            forward_loop(model)
    finally:
        for h in handles:
            h.remove()
    return seen
