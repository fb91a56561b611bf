"""``record_rows``: the rows each layer is called with over one run of a forward loop; ``record_calls``: any key of
each call (e.g. a convolution's input shape)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def output_rows(mod: nn.Module, args: tuple, out: torch.Tensor) -> int:
    """The rows of one call: the output's elements over its features (a linear's leading dimensions, a
    convolution's batch x output positions)."""
    return out.numel() // (getattr(mod, "out_features", None) or mod.out_channels)


def record_rows(model: nn.Module, modules: dict, forward_loop: Callable[[nn.Module], None]) -> dict:
    """{key: {rows per call: calls}} for ``modules`` ({key: linear-like or conv layer}) over one run of
    ``forward_loop(model)`` without gradients (rows: ``output_rows``)."""
    return record_calls(model, modules, forward_loop, output_rows)


def record_calls(model: nn.Module, modules: dict, forward_loop: Callable[[nn.Module], None],
                 call_key: Callable[[nn.Module, tuple, torch.Tensor], object]) -> dict:
    """{key: {call_key(module, args, output): calls}} for ``modules`` over one run of ``forward_loop(model)`` without
    gradients."""
    seen: dict = {key: {} for key in modules}

    def hook(key):
        def record(mod, args, out):
            ck = call_key(mod, args, out)
            seen[key][ck] = seen[key].get(ck, 0) + 1
        return record

    handles = [mod.register_forward_hook(hook(key)) for key, mod in modules.items()]
    try:
        with torch.no_grad():
            forward_loop(model)
    finally:
        for h in handles:
            h.remove()
    return seen
