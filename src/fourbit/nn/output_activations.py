"""``OutputActivationSpy``: which activation (GELU, tanh-GELU, SiLU) each layer's output, or a column slice of it,
goes straight into, seen over one eager run of a forward loop.

Under ``torch.compile`` the fusion pass (``kernels/fusion.py``) moves such an activation into the GEMM epilogue of a
quantized layer on a Triton GEMM; a plan that times layers (``precision_plan``) times them with it. Seen here: an
activation called on the very tensor a layer returned (``nn.GELU``, ``F.gelu``, ``F.silu``, diffusers' ``GELU``
module...) or on a slice of its last dimension (``y[..., lo:hi]``: a sibling group's member, FLUX's MLP columns),
the same on every call of the layer, with nothing else reading those columns (as the fusion pass requires). Not seen
(the layer counts as having none): an activation on a reshape of the output, columns also read by other code (a
residual of the pre-activation values), or a layer whose calls disagree. At most one activation range per call.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..utils.activation_calls import activation_kind, last_dim_slice

class OutputActivationSpy(TorchFunctionMode):
    """Use as ``with OutputActivationSpy(modules) as spy: forward_loop(model)``; then ``spy.kinds()`` is
    {key: (kind, lo, hi) or None} for ``modules`` ({key: module}): the activation on output columns [lo, hi)."""

    def __init__(self, modules: dict):
        super().__init__()
        self._modules = modules
        self._tracked: dict = {}  # id(tensor) -> (key, call, lo, hi, weakref): an output or a column slice of one
        self._seen: dict = {key: [] for key in modules}  # key -> per call: (kind, lo, hi) its output met, or None
        self._reads: dict = {key: [] for key in modules}  # key -> per call: column ranges other code read
        self._handles: list = []

    def __enter__(self):
        for key, mod in self._modules.items():
            self._handles.append(mod.register_forward_hook(self._hook(key)))
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._tracked.clear()
        return super().__exit__(*exc)

    def _track(self, t: torch.Tensor, key, call: int, lo: int, hi: int) -> None:
        self._tracked[id(t)] = (key, call, lo, hi, weakref.ref(t))

    def _find(self, t):
        found = self._tracked.get(id(t)) if isinstance(t, torch.Tensor) else None
        return None if found is None or found[4]() is not t else found[:4]

    def _hook(self, key):
        def record(mod: nn.Module, args, out):
            if isinstance(out, torch.Tensor) and out.dim() >= 1:
                self._seen[key].append(None)
                self._reads[key].append([])
                self._track(out, key, len(self._seen[key]) - 1, 0, out.shape[-1])
        return record

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not (isinstance(out, torch.Tensor)
                or (isinstance(out, (tuple, list)) and any(isinstance(t, torch.Tensor) for t in out))):
            return out  # .shape, .dim(), .device...: no values read
        found = self._find(args[0]) if args else None
        if found is not None:
            key, call, lo, hi = found
            if func is torch.Tensor.__getitem__ and isinstance(out, torch.Tensor) and len(args) == 2:
                sl = last_dim_slice(args[1], args[0].dim())
                if sl is not None:  # a column slice: its readers count, not the slicing
                    a, b, _ = sl.indices(hi - lo)
                    self._track(out, key, call, lo + a, lo + max(a, b))
                    return out
            kind = activation_kind(func, args, kwargs)
            if kind is not None and self._seen[key][call] is None and hi > lo:
                self._seen[key][call] = (kind, lo, hi)
                return out
        for t in _tensors(args, kwargs):  # any other reader of tracked columns (a residual, attention, a cat...)
            other = self._find(t)
            if other is not None:
                self._reads[other[0]][other[1]].append((other[2], other[3]))
        return out

    def kinds(self) -> dict:
        """{key: the (kind, lo, hi) every call's output met, or None}. An activation counts only where nothing else
        read its columns in that call (the fusion pass removes the pre-activation values)."""
        out = {}
        for key, calls in self._seen.items():
            calls = [None if c is not None and any(lo < c[2] and c[1] < hi for lo, hi in reads) else c
                     for c, reads in zip(calls, self._reads[key])]
            out[key] = calls[0] if calls and all(c == calls[0] for c in calls) else None
        return out


def _tensors(args: tuple, kwargs) -> list:
    """The tensors among a call's arguments (one level into lists and tuples, as torch.cat takes them)."""
    found = []
    for a in list(args) + list((kwargs or {}).values()):
        if isinstance(a, torch.Tensor):
            found.append(a)
        elif isinstance(a, (list, tuple)):
            found.extend(t for t in a if isinstance(t, torch.Tensor))
    return found
