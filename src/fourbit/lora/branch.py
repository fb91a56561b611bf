"""Per-layer LoRA state: the pieces each LoRA adds to one layer, and rebuilding the layer's branch from them.

A quantized layer computes its 16-bit branch on the smoothed input x^ = x * (1 / smooth) (``kernels/reference``):

    y_branch = (x^ @ lr_down^T) @ lr_up^T,        lr_down (r, Kp), lr_up (N, r)

A LoRA y += s * c * (x @ A^T) @ B^T (A (r', K), B (N, r'), c = alpha / r', strength s) is the same product on x^
with A's columns multiplied by smooth: x @ A^T = x^ @ (A diag(smooth))^T. So the branch grows to rank r + r':

    lr_down = [lr_down; pad(A) * smooth]  (r + r', Kp)        lr_up = [lr_up, s * c * B]  (N, r + r')

which every kernel already runs (no kernel change). The layer's own branch stays in the first r rows/columns,
so removing every LoRA (or setting all strengths to 0: such LoRAs are left out, not multiplied by 0) restores the
original tensors' values exactly. Layers without a branch (RTN, SmoothQuant, ... and 16-bit ``nn.Linear`` layers
kept out of quantization) get a separate 16-bit branch: a branch created from the LoRA alone (quantized layers)
or a forward hook adding it (``nn.Linear``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import QuantLinear

ATTR = "fourbit_lora"  # the LayerLoras of an adapted layer


@dataclass
class Piece:
    """One LoRA layer's contribution to one model layer: rows of ``up`` already placed at the layer's outputs."""

    down: Tensor  # (r', K) fp32, the LoRA's A
    up: Tensor  # (N, r') fp32, B placed at the layer's output rows (zeros elsewhere)
    scale: float  # alpha / r'


@dataclass
class LayerLoras:
    """The LoRAs on one layer. ``base_rank``: rank of the layer's own branch (0: none)."""

    base_rank: int
    pieces: dict = field(default_factory=dict)  # lora name -> [Piece]
    hook: Optional[object] = None  # nn.Linear: the forward hook's handle while a LoRA is active
    active: list = field(default_factory=list)  # nn.Linear: [(A, s * c * B)] the hook adds, in the layer's dtype

    def __call__(self, module: nn.Module, args, out: Tensor) -> Tensor:  # forward hook of a 16-bit nn.Linear
        x = args[0]
        for down, up in self.active:
            out = out + (x @ down.t()) @ up.t()  # (..., K) -> (..., r') -> (..., N)
        return out


def slot(layer: nn.Module) -> LayerLoras:
    """The layer's LayerLoras, created on first use."""
    s = layer.__dict__.get(ATTR)
    if s is None:
        s = LayerLoras(layer.rank if isinstance(layer, QuantLinear) else 0)
        layer.__dict__[ATTR] = s
    return s


def rebuild(layer: nn.Module, strengths: dict) -> None:
    """Set the layer's branch (or hook) from its LoRAs at ``strengths`` (name -> strength)."""
    s = layer.__dict__[ATTR]
    active = [(p, strengths[name]) for name, ps in s.pieces.items() for p in ps if strengths[name] != 0]
    if isinstance(layer, QuantLinear):
        _rebuild_branch(layer, s, active)
    else:
        _rebuild_hook(layer, s, active)
    if not s.pieces:
        del layer.__dict__[ATTR]


def _rebuild_branch(layer: QuantLinear, s: LayerLoras, active: list) -> None:
    r0 = s.base_rank
    cur_down, cur_up = layer.lr_down, layer.lr_up
    if not active:
        if layer.rank != r0:  # the base: the first r0 rows/columns, values unchanged
            layer.set_branch(None if r0 == 0 else cur_down[:r0].clone(),
                             None if r0 == 0 else cur_up[:, :r0].contiguous())
        return
    device = layer.weight_packed.device
    dtype = cur_down.dtype if cur_down is not None else layer.compute_dtype
    smooth = None if layer.smooth is None else layer.smooth.to(device, torch.float32)
    downs, ups = ([cur_down[:r0]], [cur_up[:, :r0]]) if r0 else ([], [])
    for p, strength in active:
        a = F.pad(p.down.to(device), (0, layer.padded_in - p.down.shape[1]))  # (r', Kp), zero columns past K
        if smooth is not None:
            a = a * smooth  # the branch sees x^ = x / smooth
        downs.append(a.to(dtype))
        ups.append((p.up.to(device) * (strength * p.scale)).to(dtype))
    layer.set_branch(torch.cat(downs).contiguous(), torch.cat(ups, dim=1).contiguous())  # (R, Kp), (N, R)


def _rebuild_hook(layer: nn.Module, s: LayerLoras, active: list) -> None:
    w = layer.weight
    s.active = [(p.down.to(w.device, w.dtype), (p.up * (strength * p.scale)).to(w.device, w.dtype))
                for p, strength in active]
    if active and s.hook is None:
        s.hook = layer.register_forward_hook(s)
    elif not active and s.hook is not None:
        s.hook.remove()
        s.hook = None
