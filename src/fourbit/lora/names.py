"""Where each layer of a LoRA file lands in a model: model knowledge as data, no per-architecture code.

A LoRA layer name is looked up, in order, as
  1. a module name of the model (diffusers/PEFT files: ``transformer_blocks.0.attn.to_q``),
  2. the same with dots written as underscores (kohya files: ``transformer_blocks_0_attn_to_q``),
  3. a row of ``ALIASES``: another naming of the same model (FLUX.1 LoRAs in Black Forest Labs' original names,
     ``double_blocks.0.img_attn.qkv``, dotted or underscored), whose output rows are shared out, in order, to
     one or more of the model's layers (``img_attn.qkv`` -> ``attn.to_q``, ``to_k``, ``to_v``).
A target written ``name[c/n]`` is the c-th of n equal row chunks of that layer (FLUX's final modulation stores
shift and scale in the opposite order from diffusers).

Each target then resolves to the layer that computes it: the layer itself, or, for a sibling fused by
``fourbit.siblings``, the group's fused layer and the sibling's first output row in it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from torch import nn

from ..nn import QuantLinear
from ..siblings import SiblingOutput

_D = "transformer_blocks.{i}"
_S = "single_transformer_blocks.{i}"
#: other namings -> the diffusers module names they stand for (sources' rows split over the targets in order)
ALIASES: tuple = (
    # FLUX.1 (diffusers FluxTransformer2DModel) in Black Forest Labs' original names
    ("double_blocks.{i}.img_attn.qkv", (f"{_D}.attn.to_q", f"{_D}.attn.to_k", f"{_D}.attn.to_v")),
    ("double_blocks.{i}.txt_attn.qkv", (f"{_D}.attn.add_q_proj", f"{_D}.attn.add_k_proj", f"{_D}.attn.add_v_proj")),
    ("double_blocks.{i}.img_attn.proj", (f"{_D}.attn.to_out.0",)),
    ("double_blocks.{i}.txt_attn.proj", (f"{_D}.attn.to_add_out",)),
    ("double_blocks.{i}.img_mlp.0", (f"{_D}.ff.net.0.proj",)),
    ("double_blocks.{i}.img_mlp.2", (f"{_D}.ff.net.2",)),
    ("double_blocks.{i}.txt_mlp.0", (f"{_D}.ff_context.net.0.proj",)),
    ("double_blocks.{i}.txt_mlp.2", (f"{_D}.ff_context.net.2",)),
    ("double_blocks.{i}.img_mod.lin", (f"{_D}.norm1.linear",)),
    ("double_blocks.{i}.txt_mod.lin", (f"{_D}.norm1_context.linear",)),
    ("single_blocks.{i}.linear1", (f"{_S}.attn.to_q", f"{_S}.attn.to_k", f"{_S}.attn.to_v", f"{_S}.proj_mlp")),
    ("single_blocks.{i}.linear2", (f"{_S}.proj_out",)),
    ("single_blocks.{i}.modulation.lin", (f"{_S}.norm.linear",)),
    ("img_in", ("x_embedder",)),
    ("txt_in", ("context_embedder",)),
    ("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
    ("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
    ("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
    ("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",)),
    ("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",)),
    ("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",)),
    ("final_layer.linear", ("proj_out",)),
    ("final_layer.adaLN_modulation.1", ("norm_out.linear[1/2]", "norm_out.linear[0/2]")),  # shift, scale swapped
)


def _alias_patterns():
    out = []
    for src, targets in ALIASES:
        for sep in (".", "_"):
            pattern = re.escape(src.replace(".", sep)).replace(re.escape("{i}"), r"(?P<i>\d+)")
            out.append((re.compile(pattern + "$"), targets))
    return out


_PATTERNS = _alias_patterns()


@dataclass
class Target:
    """Rows [src_lo, src_hi) of a LoRA layer's up factor, for rows [row, row + src_hi - src_lo) of ``layer``."""

    layer_name: str  # the module that computes it: a QuantLinear (maybe a fused sibling group's) or an nn.Linear
    layer: nn.Module
    src_lo: int
    src_hi: int
    row: int
    model_name: str  # the model's name for the adapted layer (the sibling, not the group)


def adaptable(mod: nn.Module) -> bool:
    return isinstance(mod, (QuantLinear, SiblingOutput, nn.Linear)) or type(mod) is nn.Conv2d


def _out_features(mod: nn.Module) -> int:
    return mod.out_channels if isinstance(mod, nn.Conv2d) else mod.out_features


class Resolver:
    """Maps LoRA layer names to ``Target``s in one model (built once per ``apply``)."""

    def __init__(self, model: nn.Module):
        self.modules = {n: m for n, m in model.named_modules() if n and adaptable(m)}
        self.names_of = {id(m): n for n, m in model.named_modules()}
        self.underscored: dict[str, Optional[str]] = {}
        for n in self.modules:
            u = n.replace(".", "_")
            self.underscored[u] = None if u in self.underscored else n  # None: ambiguous

    def _model_names(self, key: str) -> Optional[list]:
        """The model layer names (with optional ``[c/n]`` chunks) that ``key`` stands for, or None."""
        if key in self.modules:
            return [key]
        if self.underscored.get(key):
            return [self.underscored[key]]
        for pattern, targets in _PATTERNS:
            m = pattern.match(key)
            if m:
                i = m.groupdict().get("i")
                return [t.replace("{i}", i) if i is not None else t for t in targets]
        return None

    def resolve(self, key: str, lora_name: str, rows: int) -> list:
        """The Targets of LoRA layer ``key`` whose up factor has ``rows`` rows; refuses what does not fit."""
        names = self._model_names(key)
        if names is None:
            raise ValueError(f"LoRA {lora_name!r}: layer {key!r} is not in this model (is the LoRA made for "
                             f"another architecture?)")
        targets, lo = [], 0
        for spec in names:
            m = re.fullmatch(r"(.+)\[(\d+)/(\d+)\]", spec)
            name, chunk, chunks = (m.group(1), int(m.group(2)), int(m.group(3))) if m else (spec, 0, 1)
            mod = self.modules.get(name)
            if mod is None:
                raise ValueError(f"LoRA {lora_name!r}: layer {key!r} maps to {name!r}, which is not in this model "
                                 f"(is the LoRA made for another architecture?)")
            size = _out_features(mod) // chunks
            layer, layer_name, row = self._computing_layer(name, mod)
            targets.append(Target(layer_name, layer, lo, lo + size, row + chunk * size, name))
            lo += size
        if lo != rows:
            raise ValueError(f"LoRA {lora_name!r}: layer {key!r} has {rows} output rows but this model's "
                             f"{', '.join(n.split('[')[0] for n in names)} {'have' if len(names) > 1 else 'has'} "
                             f"{lo}: wrong shape (another model size?)")
        return targets

    def _computing_layer(self, name: str, mod: nn.Module):
        if isinstance(mod, SiblingOutput):
            group = mod.sibling_group
            return group.linear, self.names_of[id(group.linear)], group.bounds[mod.index]
        return mod, name, 0
