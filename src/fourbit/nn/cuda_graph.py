"""``graph_forward``: a module's forward replayed from CUDA graphs, one per input signature.

A compiled denoiser still launches every kernel from Python: a few microseconds each for inductor's kernels, tens
for fourbit's (activation quantization, GEMM, per layer), and on some hosts far more. A pipeline calls its denoiser
once per step with inputs of the same shapes, so the whole call can be captured once and replayed: the host then
launches one graph per step. ``benchmarks/models.py`` times the same thing (one graph of the whole step).

    graph_forward(pipe.transformer)   # after compiling (fourbit.compile_pipeline(..., cuda_graphs=True) does both)

A call is captured per signature (the shapes, dtypes and devices of its tensors and the values of everything else:
``return_dict``, ``None``s, ...): ``warmup`` eager calls first (compilation happens there, never inside a capture),
then the capture; later calls copy their tensors into the captured inputs, replay, and return a copy of the captured
output (the next replay overwrites it). Calls with a tensor off CUDA, or that record gradients, run as before.
Setting an attribute of any quantized layer (a LoRA applied or its strength changed, a kernel or activation format
switched: ``fourbit.nn.linear.state_generation``) drops the graphs; the next call captures again. So does a change of
where the module's parameters and buffers live (a graph reads them by address): ``.to()`` away and back (model CPU
offload), a parameter or buffer replaced, a submodule added or swapped (a LoRA library wrapping layers); each call
compares their addresses with the capture's (0.3 ms per call for FLUX.1's module tree, 1156 tensors, on the 2-core
CPU machine: under 0.5% of a compiled FLUX.1 step).
Changing a tensor's values in place needs nothing (the graph reads the new values).
"""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .linear import state_generation

_ATTR = "_fourbit_graph_forward"
_UNCAPTURABLE = object()  # a signature whose capture failed: its calls run eagerly
_PLAIN = (torch.Tensor, int, float, bool, str, type(None))  # output leaves that are copied (tensors) or immutable


_REGISTRATIONS = [0]  # modules, parameters and buffers registered anywhere in the process since the hooks went in
_HOOKS: list = []


def _watch_registrations() -> None:
    """Count every module / parameter / buffer registration (torch's global hooks, installed once): a graphed
    module's list of tensor holders is rebuilt only after one."""
    if _HOOKS:
        return
    from torch.nn.modules import module as torch_module

    def count(*_):
        _REGISTRATIONS[0] += 1  # returns None: the registered value is kept

    _HOOKS.extend([torch_module.register_module_module_registration_hook(count),
                   torch_module.register_module_parameter_registration_hook(count),
                   torch_module.register_module_buffer_registration_hook(count)])


@dataclass
class _Captured:
    replay: Callable[[], None]
    inputs: list  # the static tensors the graph reads, in leaf order
    output: Any  # the static output (a pytree of tensors the graph writes)


def _signature(leaves: list, spec, device_type: str = "cuda") -> Optional[tuple]:
    """Hashable key of a call: tensor leaves by (shape, stride, dtype, device), other leaves by value; None if a leaf
    can't be keyed (unhashable) or a tensor is not on ``device_type``."""
    key = [spec]  # TreeSpecs hash and compare by structure
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            if leaf.device.type != device_type:
                return None
            key.append(("T", tuple(leaf.shape), leaf.stride(), leaf.dtype, str(leaf.device)))
        else:
            try:
                hash(leaf)
            except TypeError:
                return None
            key.append(("V", type(leaf).__name__, leaf))
    return tuple(key)


def cuda_capture(fn: Callable[[], Any], pool) -> tuple:
    """(replay, output): ``fn`` captured into a CUDA graph on a side stream (the graphs of one module share
    ``pool``)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph.replay, out


class GraphForward:
    """The replacement ``forward``: replays a captured graph per signature (see the module docstring).
    ``capture(fn, pool) -> (replay, output)`` is ``cuda_capture``; another capture and ``device_type`` are the seam
    the CPU tests use."""

    def __init__(self, module: nn.Module, warmup: int = 2, max_graphs: int = 8, capture=cuda_capture,
                 device_type: str = "cuda"):
        self.module, self.eager = module, module.forward
        # pipelines read the denoiser's parameters (``inspect.signature(transformer.forward)``): keep them visible
        self.__wrapped__, self.__signature__ = self.eager, inspect.signature(self.eager)
        self.warmup, self.max_graphs, self.capture, self.device_type = warmup, max_graphs, capture, device_type
        self.graphs: dict = {}
        self.pool = None
        self.eager_calls = 0  # calls that ran without a graph (not capturable, or past max_graphs)
        self.eager_calls_past_max = 0  # of those, the ones past max_graphs (the first warns)
        self.generation = state_generation()  # the quantized layers' state the graphs were captured with
        self.dropped = 0  # times the graphs were dropped because a quantized layer or a tensor's address changed
        _watch_registrations()
        self._holders, self._registrations = [], -1  # the submodules that hold tensors, as of that count
        self.placement = None  # the addresses of the module's parameters and buffers when the graphs were captured

    def _placement(self) -> tuple:
        """The addresses of the module's parameters and buffers (what a captured graph reads)."""
        if self._registrations != _REGISTRATIONS[0]:
            self._holders = [m for m in self.module.modules() if m._parameters or m._buffers]
            self._registrations = _REGISTRATIONS[0]
        out = []
        for m in self._holders:
            for group in (m._parameters, m._buffers):
                for t in group.values():
                    if t is not None:
                        out.append(t.data_ptr())
        return tuple(out)

    def __call__(self, *args, **kwargs):
        leaves, spec = tree_flatten((args, kwargs))
        key = _signature(leaves, spec, self.device_type)
        if key is None or (torch.is_grad_enabled() and any(
                isinstance(t, torch.Tensor) and t.requires_grad for t in leaves)):
            self.eager_calls += 1
            return self.eager(*args, **kwargs)
        placement = self._placement()
        if state_generation() != self.generation or placement != self.placement:  # changed since the captures
            self.dropped += bool(self.graphs)
            self.graphs.clear()
            self.generation, self.placement = state_generation(), placement
        entry = self.graphs.get(key)
        if entry is None:
            if len(self.graphs) >= self.max_graphs:
                if not self.eager_calls_past_max:
                    warnings.warn(f"fourbit: graph_forward holds {self.max_graphs} CUDA graphs of "
                                  f"{type(self.module).__name__}; calls with a new signature run without one from "
                                  f"now on (an argument that changes value every call, e.g. a Python float "
                                  f"timestep, makes a new signature each time: pass it as a tensor)", stacklevel=2)
                self.eager_calls_past_max += 1
                self.eager_calls += 1
                return self.eager(*args, **kwargs)
            try:
                entry = self._capture(leaves, spec)
            except RuntimeError as err:  # e.g. a host synchronisation inside the forward: this signature runs eagerly
                entry = _UNCAPTURABLE
                warnings.warn(f"fourbit: graph_forward could not capture a call of {type(self.module).__name__} "
                              f"({str(err).splitlines()[0][:200]}); calls like it run without a CUDA graph",
                              stacklevel=2)
            self.graphs[key] = entry
        if entry is _UNCAPTURABLE:
            self.eager_calls += 1
            return self.eager(*args, **kwargs)
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
        for static, t in zip(entry.inputs, tensors):
            static.copy_(t)
        entry.replay()
        return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, entry.output)

    def _capture(self, leaves: list, spec) -> _Captured:
        static = [t.clone() if isinstance(t, torch.Tensor) else t for t in leaves]
        args, kwargs = tree_unflatten(static, spec)
        call = lambda: self.eager(*args, **kwargs)  # noqa: E731
        if self.pool is None and self.capture is cuda_capture:
            self.pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream() if self.capture is cuda_capture else None
        if side is not None:  # warm-up (and compilation) on a side stream, as CUDA graph capture requires
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    call()
            torch.cuda.current_stream().wait_stream(side)
        else:
            for _ in range(self.warmup):
                call()
        replay, out = self.capture(call, self.pool)
        opaque = [type(leaf).__name__ for leaf in tree_flatten(out)[0] if not isinstance(leaf, _PLAIN)]
        if opaque:  # a container pytree can't see into: its tensors would be the graph's, overwritten by the next replay
            raise RuntimeError(f"its output holds a {opaque[0]}, which can't be copied out of the graph")
        # had the calls above set a layer attribute or moved a tensor, the graph holds that state
        self.generation, self.placement = state_generation(), self._placement()
        return _Captured(replay, [t for t in static if isinstance(t, torch.Tensor)], out)


def graph_forward(module: nn.Module, warmup: int = 2, max_graphs: int = 8, capture=cuda_capture,
                  device_type: str = "cuda") -> GraphForward:
    """Replace ``module.forward`` by a ``GraphForward`` (in place; ``release_graphs`` undoes it); returns it."""
    if isinstance(getattr(module, _ATTR, None), GraphForward):
        return getattr(module, _ATTR)
    graphed = GraphForward(module, warmup, max_graphs, capture, device_type)
    module.forward = graphed
    setattr(module, _ATTR, graphed)
    return graphed


def release_graphs(module: nn.Module) -> None:
    """Undo ``graph_forward``: the module's own forward again, the graphs and their memory released."""
    graphed = getattr(module, _ATTR, None)
    if isinstance(graphed, GraphForward):
        del module.forward  # the instance attribute: the class's forward shows again
        delattr(module, _ATTR)
        graphed.graphs.clear()
