"""SVD-only: keep the top-r singular directions of W in 16 bits and quantize the residual (no smoothing)."""
from __future__ import annotations

from ..config import SVDConfig
from . import register_method
from .common import low_rank, quantize_state, rounding_kwargs


@register_method(SVDConfig)
def svd_only(weight, stats, cfg):
    lr_down, lr_up = low_rank(weight, cfg.rank)
    return quantize_state(weight - lr_up @ lr_down, cfg.weight_format(), cfg.activation_format(),
                          lr_down=lr_down, lr_up=lr_up, **rounding_kwargs(cfg, stats, weight))
