"""Which layers get quantized: include/exclude fnmatch patterns over module names, plus geometry checks."""
from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Optional

from torch import nn

from ..config import QuantConfig

SUPPORTED = (nn.Linear, nn.Conv2d)
#: zero-padding of a layer's input dimension is allowed up to max(K, MAX_PAD) columns: a group size far beyond K
#: (a typo, group_size=10**9) would otherwise allocate a (N, group_size) weight
MAX_PAD = 1024
KEPT_BY_OVERRIDE = "kept 16-bit by an override"


@dataclass
class Target:
    """One layer to quantize with its resolved per-layer config."""

    name: str
    module: nn.Module
    config: QuantConfig
    in_features: int  # K: Linear in_features, or Cin*kh*kw for a conv
    padded_in: int  # K rounded up to the group size (== in_features when no padding is needed)


@dataclass
class Skipped:
    name: str
    reason: str


def layer_in_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    kh, kw = module.kernel_size
    return module.in_channels * kh * kw


def _matches(name: str, patterns) -> bool:
    return any(fnmatchcase(name, p) for p in patterns)


def required_multiple(weight_format, act_format=None) -> int:
    """The multiple of K a layer with these formats needs (lcm of their group sizes; 4-bit codes pack in pairs)."""
    from math import lcm

    m = 1
    for fmt in (weight_format, act_format):
        if fmt is not None and fmt.group_size is not None:
            m = lcm(m, fmt.group_size)
    if weight_format.code_bits == 4:
        m = lcm(m, 2)  # two codes per byte
    return m


def padded_in_features(k: int, weight_format, act_format=None) -> int:
    """K zero-padded to ``required_multiple`` (SANA's 5600 -> 5632 for int4p2 W4A4), as ``fourbit.quantize`` pads."""
    mult = required_multiple(weight_format, act_format)
    return -(-k // mult) * mult


def select_targets(model: nn.Module, cfg: QuantConfig) -> tuple[list[Target], list[Skipped]]:
    """Walk ``model`` and decide, per Linear/Conv2d, whether and how it is quantized."""
    targets: list[Target] = []
    skipped: list[Skipped] = []
    for name, module in model.named_modules():
        if not isinstance(module, SUPPORTED):
            continue
        if not _matches(name, cfg.include) or _matches(name, cfg.exclude):
            continue
        layer_cfg: Optional[QuantConfig] = cfg.for_layer(name)
        if layer_cfg is None:
            skipped.append(Skipped(name, KEPT_BY_OVERRIDE))
            continue
        if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"
                                              or isinstance(module.padding, str)):
            skipped.append(Skipped(name, "conv with groups>1, non-zero padding mode or string padding: kept 16-bit"))
            continue
        k = layer_in_features(module)
        mult = required_multiple(layer_cfg.weight_format(), layer_cfg.activation_format())
        kp = -(-k // mult) * mult
        if kp - k > max(k, MAX_PAD):
            raise ValueError(f"layer {name}: padding in_features {k} to a multiple of {mult} (the group size) would "
                             f"add {kp - k} zero columns, more than the layer has; choose a group size <= {k}")
        if kp != k and layer_cfg.pad == "skip":
            skipped.append(Skipped(name, f"in_features {k} not a multiple of {mult}: kept 16-bit (pad='skip')"))
            continue
        targets.append(Target(name, module, layer_cfg, k, kp))
    return targets, skipped
