"""The bundled diffusion models (``fashion-dit``, ``fashion-unet``): registry, architectures, weights I/O.

All models share ``model(x (B,1,28,28) float, t (B,) long 0..999, y (B,) long 0..10) -> eps (B,1,28,28)``,
with class 10 meaning unconditional (classifier-free guidance).
"""

from fourbit.models.dit import DiTConfig, FashionDiT
from fourbit.models.io import (
    load_pretrained,
    load_weights,
    pretrained_available,
    read_metadata,
    save_weights,
    weights_path,
)
from fourbit.models.registry import MODELS, ModelSpec, available_models, build_from_config, build_model, get_spec
from fourbit.models.unet import FashionUNet, UNetConfig

__all__ = [
    "DiTConfig",
    "FashionDiT",
    "FashionUNet",
    "UNetConfig",
    "MODELS",
    "ModelSpec",
    "available_models",
    "build_from_config",
    "build_model",
    "get_spec",
    "load_pretrained",
    "load_weights",
    "pretrained_available",
    "read_metadata",
    "save_weights",
    "weights_path",
]
