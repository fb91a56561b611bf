"""Quantization methods. A method = a config class (``fourbit.config``) + one registered transform.

A transform is ``fn(weight (N, Kp) fp32, stats: LayerStats | None, cfg) -> QuantizedLinearState``:
it turns one layer's (padded) weight, given what calibration saw of its inputs, into a quantized state.
"""
from __future__ import annotations

from typing import Callable

from ..config import QuantConfig

Transform = Callable
METHODS: dict[type, Transform] = {}


def register_method(config_cls: type[QuantConfig]):
    """Decorator: ``@register_method(MyConfig) def transform(weight, stats, cfg): ...``."""

    def deco(fn: Transform) -> Transform:
        METHODS[config_cls] = fn
        return fn

    return deco


def get_transform(cfg: QuantConfig) -> Transform:
    for cls in type(cfg).__mro__:
        if cls in METHODS:
            return METHODS[cls]
    raise ValueError(f"no transform registered for {type(cfg).__name__}; known: "
                     f"{', '.join(c.__name__ for c in METHODS)}")


# importing the modules registers them
from . import rtn, smoothquant, svd, lorc, svdquant  # noqa: E402,F401
from . import quartz  # noqa: E402,F401

__all__ = ["register_method", "get_transform", "METHODS"]
