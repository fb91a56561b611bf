"""``OutputActivationSpy``: which activation (GELU, tanh-GELU, SiLU) each layer's output goes straight into, seen
over one eager run of a forward loop.

Under ``torch.compile`` the fusion pass (``kernels/fusion.py``) moves such an activation into the GEMM epilogue of a
quantized layer on a Triton GEMM; a plan that times layers (``precision_plan``) times them with it. Seen here: an
activation called on the very tensor a layer returned (``nn.GELU``, ``F.gelu``, ``F.silu``, diffusers' ``GELU``
module...), the same kind on every call of the layer. Not seen (the layer counts as having none): an activation on
a slice or a reshape of the output, or a layer whose calls disagree.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

_GELUS = (F.gelu, torch._C._nn.gelu)
_SILUS = (F.silu, torch._C._nn.silu)


def activation_kind(func, args: tuple, kwargs: dict) -> Optional[str]:
    """The epilogue kind ("gelu", "gelu_tanh", "silu") of one activation call on its first argument, or None (not an
    activation the epilogue has, or with other arguments, e.g. an in-place SiLU)."""
    kwargs = kwargs or {}
    if func in _GELUS:
        approx = kwargs.get("approximate", args[1] if len(args) > 1 else "none")
        if set(kwargs) - {"approximate"} or len(args) > 2 or approx not in ("none", "tanh"):
            return None
        return "gelu_tanh" if approx == "tanh" else "gelu"
    if func in _SILUS:
        if len(args) > 1 or kwargs.get("inplace", False):
            return None
        return "silu"
    return None


class OutputActivationSpy(TorchFunctionMode):
    """Use as ``with OutputActivationSpy(modules) as spy: forward_loop(model)``; then ``spy.kinds()`` is
    {key: kind or None} for ``modules`` ({key: module})."""

    def __init__(self, modules: dict):
        super().__init__()
        self._modules = modules
        self._outputs: dict = {}  # id(output) -> (key, weakref to it): the latest outputs not yet consumed
        self._seen: dict = {key: [] for key in modules}  # key -> per call: the kind its output met, or None
        self._handles: list = []

    def __enter__(self):
        for key, mod in self._modules.items():
            self._handles.append(mod.register_forward_hook(self._hook(key)))
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return super().__exit__(*exc)

    def _hook(self, key):
        def record(mod: nn.Module, args, out):
            if isinstance(out, torch.Tensor):
                self._seen[key].append(None)
                self._outputs[id(out)] = (key, len(self._seen[key]) - 1, weakref.ref(out))
        return record

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if args and isinstance(args[0], torch.Tensor):
            found = self._outputs.get(id(args[0]))
            if found is not None and found[2]() is args[0]:
                kind = activation_kind(func, args, kwargs)
                if kind is not None:
                    key, call, _ = found
                    self._seen[key][call] = kind
        return func(*args, **(kwargs or {}))

    def kinds(self) -> dict:
        """{key: the activation every call's output went into, or None}."""
        out = {}
        for key, calls in self._seen.items():
            out[key] = calls[0] if calls and all(c == calls[0] for c in calls) else None
        return out
