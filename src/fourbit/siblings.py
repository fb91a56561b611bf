"""Sibling linears: layers that read the very same input tensor (attention's Q, K and V projections, FLUX's
single-block ``proj_mlp`` next to them) fused into one wider layer, so the input is quantized once and one
GEMM runs instead of several.

    groups = find_siblings(model, forward_loop)          # [["blocks.0.attn.to_q", "...to_k", "...to_v"], ...]
    fuse_siblings(model, groups)                         # before fourbit.quantize
    fourbit.quantize(model, cfg, forward_loop)           # the groups go into the checkpoint header
    fourbit.load(fresh_model, path)                      # fuses the fresh model the same way first

After fusion each sibling is a ``SiblingOutput`` that returns its slice of the group's output; the group holds
one ``nn.Linear`` (concatenated weights and biases) at ``<first sibling>.group.linear``, which is what
``fourbit.quantize`` quantizes (one smoothing vector and one activation quantization for the shared input).
The group computes its output once per input tensor and hands each sibling its columns as a view (no copy: a
strided slice of the group's output, which ``view``/``unflatten`` of the last dimension accept; pass
``contiguous=True`` to ``fuse_siblings`` for code that needs contiguous outputs); the cached output is released
as soon as every sibling has taken its share. Calling a sibling with another input recomputes.
"""
from __future__ import annotations

import functools
from collections import defaultdict
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from .calibration import select_targets
from .nn import set_module


def _version(x: torch.Tensor):
    """The tensor's in-place version counter; None for inference-mode tensors, which do not track one (there a
    cached output is trusted for the same tensor object)."""
    try:
        return x._version
    except RuntimeError:
        return None


class SiblingGroup(nn.Module):
    """One linear layer (``self.linear``) whose output columns are shared out to ``len(sizes)`` siblings."""

    def __init__(self, linear: nn.Module, sizes: Sequence[int], contiguous: bool = False, spans_blocks: bool = False):
        super().__init__()
        self.linear = linear
        self.contiguous = contiguous
        self.spans_blocks = spans_blocks  # members in several repeated blocks: served outside compiled graphs
        self.sizes = [int(s) for s in sizes]
        bounds = [0]
        for s in self.sizes:
            bounds.append(bounds[-1] + s)
        self.bounds = bounds
        self._clear()

    def _clear(self) -> None:
        self._x, self._key, self._out, self._served = None, None, None, set()

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Sibling ``index``'s columns of ``linear(x)`` (computed once per input tensor)."""
        if torch.compiler.is_compiling():
            return self._output_traced(index, x)
        return _uncompiled_output()(self, index, x)

    def _output_traced(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """What dynamo traces: the same sharing keyed on the traced tensor's identity (data pointers and
        version counters are not traceable); within one graph the siblings' input is one traced value."""
        return self._serve(index, x, None)

    def _output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return self._serve(index, x, (x.data_ptr(), tuple(x.shape), tuple(x.stride()), _version(x), x.dtype,
                                      x.device))

    def _serve(self, index: int, x: torch.Tensor, key) -> torch.Tensor:
        """Sibling ``index``'s columns, computing ``linear(x)`` unless it is cached for this input (``key``)."""
        if self._x is not x or self._key != key or index in self._served:
            self._x, self._key, self._out, self._served = x, key, self.linear(x), set()
        out = self._out[..., self.bounds[index]: self.bounds[index + 1]]  # (..., sizes[index]) view
        if self.contiguous:  # measured: the copies cost ~14 ms per FLUX.1 step on an H100 (2026-11-22c)
            out = out.contiguous()
        self._served = self._served | {index}  # a new set: dynamo traces it without in-place mutation
        if len(self._served) == len(self.sizes):
            self._clear()  # every sibling has its share: drop the references
        return out

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}"


@functools.lru_cache(maxsize=1)
def _eager_sibling():
    """A sibling of a group that spans blocks, served outside dynamo's graphs (a graph break): the sibling's index
    is then never traced, so every block's graph stays the same and one compile serves all blocks."""
    return torch.compiler.disable(lambda sibling, x: sibling.sibling_group._output(sibling.index, x))


@functools.lru_cache(maxsize=1)
def _uncompiled_output():
    """``SiblingGroup._output`` kept out of dynamo's graphs (its Python-side cache is a graph break), wrapped
    on first use so that ``import fourbit`` does not import torch._dynamo (and with it Triton)."""
    return torch.compiler.disable(SiblingGroup._output)


class SiblingOutput(nn.Module):
    """Stands where sibling ``index`` was; the first sibling owns the group as a submodule (``group``), the
    others refer to it without registering it, so its weights appear once in ``state_dict``."""

    def __init__(self, group: SiblingGroup, index: int, owner: bool, in_features: int, out_features: int):
        super().__init__()
        if owner:
            self.group = group
        else:
            object.__setattr__(self, "_shared_group", group)
        self.index = index
        self.in_features, self.out_features = in_features, out_features

    @property
    def sibling_group(self) -> SiblingGroup:
        return self._modules["group"] if "group" in self._modules else self._shared_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sibling_group.spans_blocks and torch.compiler.is_compiling():
            return _eager_sibling()(self, x)
        return self.sibling_group.output(self.index, x)

    def extra_repr(self) -> str:
        return f"index={self.index}, in_features={self.in_features}, out_features={self.out_features}"


def _linears(model: nn.Module, names: Optional[Iterable[str]]) -> dict:
    wanted = None if names is None else set(names)
    return {n: m for n, m in model.named_modules()
            if type(m) is nn.Linear and (wanted is None or n in wanted)}


@torch.no_grad()
def find_siblings(model: nn.Module, forward_loop: Callable[[nn.Module], None], config=None,
                  names: Optional[Iterable[str]] = None, across_blocks: bool = False) -> list:
    """Groups (lists of module names, in call order) of ``nn.Linear`` layers that, in every call made by
    ``forward_loop(model)``, read the same input tensor as each other and no other candidate. ``config``
    (a fourbit config): only layers it quantizes, grouped only with layers it quantizes the same way;
    ``names`` restricts the candidates further.

    A group does not span two repeated blocks (entries of a ``ModuleList``: every block's cross-attention K and V
    read the same text embeddings): it is split into one group per block, so that each block's code is the same
    and ``torch.compile`` of one block serves them all. ``across_blocks=True`` keeps such groups (one wider GEMM);
    under ``torch.compile`` their members run outside the graphs (a graph break at each, so not with
    ``fullgraph=True``), which keeps the blocks' graphs shared (traced, a group's sibling index would specialise
    every block's graph: one compile per block)."""
    layer_config: dict = {}
    if config is not None:

        targets, _ = select_targets(model, config)
        layer_config = {t.name: repr(t.config.to_dict()) for t in targets}
        names = [n for n in layer_config if names is None or n in set(names)]
    linears = _linears(model, names)
    events: list = []  # one list of names per distinct input tensor, in order
    current: dict = {}  # this forward's inputs: key -> (x, names); x is kept alive so its id is not reused

    def hook(name):
        def pre(module, args):
            x = args[0]
            key = (id(x), x.data_ptr(), tuple(x.shape), _version(x))
            if key not in current:
                current[key] = (x, [])
                events.append(current[key][1])
            current[key][1].append(name)
        return pre

    def reset(module, args):
        current.clear()

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    handles.append(model.register_forward_pre_hook(reset))
    try:
        forward_loop(model)
    finally:
        for h in handles:
            h.remove()
        current.clear()
    seen: dict = defaultdict(set)  # name -> every co-caller set it was part of
    for names_ in events:
        for n in names_:
            seen[n].add(tuple(names_))
    groups, done = [], set()
    for names_ in events:
        g = tuple(names_)
        if len(g) < 2 or len(set(g)) != len(g) or g[0] in done:
            continue
        same_config = len({layer_config.get(n) for n in g}) == 1
        if same_config and all(seen[n] == {g} for n in g) and _compatible([linears[n] for n in g]):
            groups.extend(sub for sub in ([list(g)] if across_blocks else _split_by_block(list(g))) if len(sub) > 1)
            done.update(g)
    return groups


def _split_by_block(names: list) -> list:
    """``names`` split by the repeated block each lies in: the innermost ModuleList entry among its ancestors
    (``...transformer_blocks.3``; none: the model itself). Members of one block stay together, in call order."""
    def block(name: str) -> str:
        parts = name.split(".")[:-1]  # the layer's ancestors
        last = max((i for i, p in enumerate(parts) if p.isdigit()), default=-1)
        return ".".join(parts[:last + 1])

    by_block: dict = {}
    for n in names:
        by_block.setdefault(block(n), []).append(n)
    return list(by_block.values())


def _compatible(mods: list) -> bool:
    w = mods[0].weight
    return all(m.in_features == mods[0].in_features and m.weight.dtype == w.dtype and m.weight.device == w.device
               for m in mods)


def fuse_siblings(model: nn.Module, groups: Sequence[Sequence[str]], contiguous: bool = False) -> nn.Module:
    """Replace each group of sibling ``nn.Linear`` layers by one fused layer (see the module docstring).
    Works on the meta device. Records the groups at ``model.fourbit_siblings`` (``fourbit.quantize`` puts them
    in the header). Returns ``model``."""

    if getattr(model, "fourbit_header", None) is not None:
        raise ValueError("fuse siblings before quantizing: this model is already quantized by fourbit")
    modules = dict(model.named_modules())
    flat = [n for g in groups for n in g]
    if len(set(flat)) != len(flat):
        raise ValueError("a layer appears in two sibling groups")
    for g in groups:
        if len(g) < 2:
            raise ValueError(f"a sibling group needs two or more layers, got {list(g)}")
        missing = [n for n in g if n not in modules]
        if missing:
            raise ValueError(f"sibling layer(s) not in the model: {', '.join(missing)}")
        mods = [modules[n] for n in g]
        if not all(type(m) is nn.Linear for m in mods) or not _compatible(mods):
            raise ValueError(f"sibling group {list(g)}: every layer must be an nn.Linear with the same "
                             f"in_features, dtype and device")
        w0 = mods[0].weight
        fused = nn.Linear(mods[0].in_features, sum(m.out_features for m in mods),
                          bias=any(m.bias is not None for m in mods), device=w0.device, dtype=w0.dtype)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([m.weight for m in mods]))  # (sum N, K)
            if fused.bias is not None:
                fused.bias.copy_(torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features,
                                            device=w0.device, dtype=w0.dtype) for m in mods]))
        group = SiblingGroup(fused, [m.out_features for m in mods], contiguous,
                             spans_blocks=len(_split_by_block(list(g))) > 1)
        for i, (name, m) in enumerate(zip(g, mods)):
            set_module(model, name, SiblingOutput(group, i, i == 0, m.in_features, m.out_features))
    model.fourbit_siblings = [list(g) for g in list(getattr(model, "fourbit_siblings", [])) + list(groups)]
    return model
