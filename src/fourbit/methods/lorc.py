"""LoRC: quantize W, then compensate the quantization error W - Q(W) with a 16-bit rank-r branch."""
from __future__ import annotations

from ..config import LoRCConfig
from . import register_method
from ..nn.state import QuantizedLinearState
from .common import low_rank, quantize_weight, rounding_kwargs


@register_method(LoRCConfig)
def lorc(weight, stats, cfg):
    wf = cfg.weight_format()
    q = quantize_weight(weight, wf, **rounding_kwargs(cfg, stats, weight))
    lr_down, lr_up = low_rank(weight - wf.dequantize(q), cfg.rank)
    return QuantizedLinearState(q, wf, cfg.activation_format(), lr_down=lr_down, lr_up=lr_up)
