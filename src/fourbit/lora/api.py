"""``apply`` / ``set_strength`` / ``remove`` / ``list``: LoRAs on a fourbit model without re-quantization."""
from __future__ import annotations

import builtins
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from . import branch
from .keys import parse_lora, read_lora
from .names import Resolver

REGISTRY = "fourbit_loras"  # model attribute: name -> LoraRecord


@dataclass
class LoraRecord:
    """One LoRA applied to a model."""

    name: str
    strength: float
    rank: int  # the largest rank among its layers
    style: str  # "diffusers" | "kohya"
    layers: builtins.list = field(default_factory=builtins.list)  # names of the model layers it changes
    skipped: builtins.list = field(default_factory=builtins.list)  # keys for other components (text encoders)

    def as_dict(self) -> dict:
        return {"name": self.name, "strength": self.strength, "rank": self.rank, "style": self.style,
                "layers": builtins.list(self.layers), "skipped_keys": len(self.skipped)}


def _registry(model: nn.Module) -> dict:
    reg = model.__dict__.get(REGISTRY)
    if reg is None:
        reg = model.__dict__[REGISTRY] = {}
    return reg


def _strengths(model: nn.Module) -> dict:
    return {n: r.strength for n, r in _registry(model).items()}


def _check_strength(strength) -> float:
    s = float(strength)
    if s != s or s in (float("inf"), float("-inf")):
        raise ValueError(f"LoRA strength must be a finite number, got {strength!r}")
    return s


@torch.no_grad()
def apply(model: nn.Module, source: Union[str, Path, dict], name: Optional[str] = None,
          strength: float = 1.0) -> dict:
    """Add a LoRA (a .safetensors path or a state dict; diffusers/PEFT or kohya naming) to ``model`` at
    ``strength``, extending the low-rank branch of its quantized layers (16-bit layers get a 16-bit branch).
    Nothing is re-quantized. Several LoRAs may be applied; each keeps its own strength. Refuses, changing
    nothing, a LoRA whose layers are not in the model or do not fit their shapes. Returns ``list``'s entry."""
    strength = _check_strength(strength)
    reg = _registry(model)
    if name is None:
        name = Path(source).stem if isinstance(source, (str, Path)) else f"lora{len(reg)}"
    if name in reg:
        raise ValueError(f"a LoRA named {name!r} is already applied; remove it first or pass another name=")
    modules, skipped = parse_lora(*read_lora(source))
    resolver = Resolver(model)
    plan: dict[str, tuple] = {}  # layer name -> (layer, [Piece])
    for lm in modules:  # resolve and check everything before changing the model
        targets = resolver.resolve(lm.key, name, lm.up.shape[0])
        by_layer: dict[str, builtins.list] = {}
        for t in targets:
            by_layer.setdefault(t.layer_name, []).append(t)
        for layer_name, ts in by_layer.items():
            layer = ts[0].layer
            if type(layer) is nn.Conv2d:
                raise ValueError(f"LoRA {name!r}: layer {lm.key!r} targets {ts[0].model_name}, a 16-bit Conv2d; "
                                 f"LoRAs apply to quantized layers and nn.Linear only")
            k = layer.in_features
            if lm.down.shape[1] != k:
                raise ValueError(f"LoRA {name!r}: layer {lm.key!r} takes {lm.down.shape[1]} inputs but this model's "
                                 f"{ts[0].model_name} takes {k}: wrong shape (another model size?)")
            up = torch.zeros(layer.out_features, lm.rank)  # (N, r'): B's rows at the layer's outputs
            for t in ts:
                up[t.row: t.row + t.src_hi - t.src_lo] = lm.up[t.src_lo: t.src_hi]
            plan.setdefault(layer_name, (layer, []))[1].append(branch.Piece(lm.down, up, lm.scale))
    record = LoraRecord(name, strength, max(m.rank for m in modules), modules[0].style, sorted(plan), skipped)
    reg[name] = record
    strengths = _strengths(model)
    for layer, pieces in plan.values():
        branch.slot(layer).pieces[name] = pieces
        branch.rebuild(layer, strengths)
    return record.as_dict()


def _record(model: nn.Module, name: str) -> LoraRecord:
    reg = _registry(model)
    if name not in reg:
        have = ", ".join(map(repr, reg)) or "none"
        raise KeyError(f"no LoRA named {name!r} on this model (applied: {have})")
    return reg[name]


def _layers(model: nn.Module, names) -> builtins.list:
    mods = dict(model.named_modules())
    return [mods[n] for n in names]


@torch.no_grad()
def set_strength(model: nn.Module, name: str, strength: float) -> None:
    """Change one LoRA's strength (0 leaves it out of the branch: the outputs are as without it)."""
    rec = _record(model, name)
    rec.strength = _check_strength(strength)
    strengths = _strengths(model)
    for layer in _layers(model, rec.layers):
        branch.rebuild(layer, strengths)


@torch.no_grad()
def remove(model: nn.Module, name: str) -> None:
    """Take a LoRA off; with none left, every layer's branch has its original values again."""
    rec = _record(model, name)
    del _registry(model)[name]
    strengths = _strengths(model)
    for layer in _layers(model, rec.layers):
        del layer.__dict__[branch.ATTR].pieces[name]
        branch.rebuild(layer, strengths)


def list(model: nn.Module) -> builtins.list:  # noqa: A001 - the API's name
    """The LoRAs on ``model``, in the order applied: [{name, strength, rank, style, layers, skipped_keys}]."""
    return [r.as_dict() for r in _registry(model).values()]
