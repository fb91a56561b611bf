"""Reading a LoRA file: its key style (diffusers/PEFT or kohya) and one (down, up, alpha) per adapted layer.

Key styles recognized (the prefix before the layer name is dropped, see ``PREFIXES``):

    diffusers / PEFT   <prefix><layer.path>.lora_A[.<adapter>].weight   (r, K)    .lora_B[...].weight  (N, r)
    old diffusers      <prefix><layer.path>.lora.down.weight / .lora.up.weight  (also lora_linear_layer.*)
    kohya              lora_unet_<layer_path_with_underscores>.lora_down.weight / .lora_up.weight / .alpha

The scale a LoRA is trained with is alpha / r: kohya files carry ``.alpha`` per layer; diffusers files may
carry ``lora_alpha`` (and ``r``) in the safetensors metadata key ``lora_adapter_metadata``; without either
the scale is 1. Conv LoRAs (4-D factors) are flattened to the (r, Cin*kh*kw) / (N, r) matrices a quantized
conv multiplies with.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor

#: prefixes in front of the layer name, longest first; text-encoder prefixes are in ``OTHER_COMPONENTS``
PREFIXES = ("base_model.model.", "transformer.", "unet.", "diffusion_model.", "model.diffusion_model.",
            "lora_unet_", "lora_transformer_")
#: keys for other components of a pipeline (text encoders): not for the model being adapted, skipped
OTHER_COMPONENTS = ("lora_te", "text_encoder")

_SUFFIXES = (  # (regex on the key's tail, role)
    (re.compile(r"\.lora_A(\.[^.]+)?\.weight$"), "down"),
    (re.compile(r"\.lora_B(\.[^.]+)?\.weight$"), "up"),
    (re.compile(r"\.lora(_linear_layer)?\.down\.weight$"), "down"),
    (re.compile(r"\.lora(_linear_layer)?\.up\.weight$"), "up"),
    (re.compile(r"\.lora_down\.weight$"), "down"),
    (re.compile(r"\.lora_up\.weight$"), "up"),
    (re.compile(r"\.alpha$"), "alpha"),
)
_UNSUPPORTED = ("dora_scale", "lora_magnitude_vector", "lora_B.bias", "lora_up.bias", "hada_", "lokr_", "diff_b",
                ".diff")


@dataclass
class LoraModule:
    """One adapted layer of a LoRA file: y += scale * (x @ down^T) @ up^T."""

    key: str  # the layer's name in the file, prefix dropped (dots for diffusers/PEFT, underscores for kohya)
    style: str  # "diffusers" | "kohya"
    down: Tensor  # (r, K) fp32
    up: Tensor  # (N, r) fp32
    scale: float  # alpha / r (1 without alpha)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


def read_lora(source: Union[str, Path, dict]) -> tuple[dict, dict]:
    """A safetensors path or a state dict -> (tensors, metadata)."""
    if isinstance(source, dict):
        return dict(source), {}
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist; pass a .safetensors path or a state dict")
    from ..utils.safetensors_io import read_safetensors

    try:
        return read_safetensors(path)
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{path} is not a readable safetensors LoRA file ({e}); convert it to safetensors") from None


def _split(key: str) -> tuple[Optional[str], Optional[str]]:
    for pattern, role in _SUFFIXES:
        m = pattern.search(key)
        if m:
            return key[: m.start()], role
    return None, None


def _strip(stem: str) -> tuple[str, str]:
    """(layer name without prefix, style)."""
    style = "kohya" if stem.startswith(("lora_unet_", "lora_transformer_")) else "diffusers"
    for p in PREFIXES:
        if stem.startswith(p):
            return stem[len(p):], style
    return stem, style


def _metadata_alpha(metadata: dict) -> Optional[float]:
    """``lora_alpha / r`` from diffusers' ``lora_adapter_metadata`` (global values only), else None."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        return None
    meta = next(iter(meta.values())) if meta and all(isinstance(v, dict) for v in meta.values()) else meta
    if meta.get("alpha_pattern") or meta.get("rank_pattern"):
        raise ValueError("this LoRA sets per-layer alpha/rank patterns in its metadata, which fourbit does not "
                         "read; merge the patterns into per-layer '.alpha' tensors first")
    alpha, r = meta.get("lora_alpha"), meta.get("r")
    return None if alpha is None or not r else float(alpha) / float(r)


def parse_lora(tensors: dict, metadata: Optional[dict] = None) -> tuple[list, list]:
    """(LoraModules, skipped keys of other components). Refuses keys it cannot interpret, naming the first."""
    metadata = metadata or {}
    parts: dict[str, dict] = {}
    skipped = []
    for key in sorted(tensors):
        if key.startswith(OTHER_COMPONENTS):
            skipped.append(key)
            continue
        bad = next((u for u in _UNSUPPORTED if u in key), None)
        if bad is not None:
            raise ValueError(f"LoRA key {key!r} is a {bad.strip('._')} tensor, which fourbit does not support "
                             f"(plain LoRA down/up/alpha only)")
        stem, role = _split(key)
        if stem is None:
            raise ValueError(f"LoRA key {key!r} is not a LoRA down/up/alpha tensor in diffusers, PEFT or kohya "
                             f"naming; is this a LoRA file?")
        parts.setdefault(stem, {})[role] = tensors[key]
    global_scale = _metadata_alpha(metadata)
    modules = []
    for stem, p in parts.items():
        if "down" not in p or "up" not in p:
            raise ValueError(f"LoRA layer {stem!r} has no {'up' if 'down' in p else 'down'} matrix; the file is "
                             f"incomplete")
        name, style = _strip(stem)
        down = p["down"].detach().float().reshape(p["down"].shape[0], -1)  # (r, K) (conv: (r, Cin*kh*kw))
        up = p["up"].detach().float()
        if up.dim() == 4 and up.shape[2:] != (1, 1):
            raise ValueError(f"LoRA layer {stem!r}: the up factor is a {tuple(up.shape[2:])} conv; only 1x1 up "
                             f"factors are supported")
        up = up.reshape(up.shape[0], -1)  # (N, r)
        if up.shape[1] != down.shape[0]:
            raise ValueError(f"LoRA layer {stem!r}: down has rank {down.shape[0]} but up has {up.shape[1]}; "
                             f"the file is inconsistent")
        r = down.shape[0]
        if "alpha" in p:
            scale = float(p["alpha"].float().item()) / r
        else:
            scale = 1.0 if global_scale is None else global_scale
        modules.append(LoraModule(name, style, down, up, scale))
    if not modules:
        raise ValueError("the LoRA has no layers for this model" + (f" (only other components: {skipped[0]}, ...)"
                                                                   if skipped else " (no tensors)"))
    return modules, skipped
