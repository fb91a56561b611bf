"""RTN ("naive"): round-to-nearest weights; activations quantized dynamically at run time. Also NF4 (W4A16)."""
from __future__ import annotations

from ..config import NF4Config, RTNConfig
from . import register_method
from .common import quantize_state, rounding_kwargs


@register_method(RTNConfig)
@register_method(NF4Config)
def rtn(weight, stats, cfg):
    return quantize_state(weight, cfg.weight_format(), cfg.activation_format(),
                          **rounding_kwargs(cfg, stats, weight))
