"""The bundled models as data: architecture, config, recommended sampling settings and quantization exclusions.

Adding a model = one ``ModelSpec`` entry (and, for a new architecture, one entry in ``ARCHITECTURES``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
from torch import nn

from fourbit.models.dit import DiTConfig, FashionDiT
from fourbit.models.unet import FashionUNet, UNetConfig

# architecture name -> (config class, model class)
ARCHITECTURES: dict[str, tuple[type, Callable[[Any], nn.Module]]] = {
    "dit": (DiTConfig, FashionDiT),
    "unet": (UNetConfig, FashionUNet),
}


@dataclass(frozen=True)
class ModelSpec:
    """What the library knows about one bundled model.

    ``quant_exclude``: fnmatch patterns of module names that quantizers should keep in 16 bit (small, sensitive
    layers at the edges: embeddings, the first and last layers). ``null_class``: the class index meaning
    "unconditional" for classifier-free guidance.
    """

    name: str
    arch: str
    config: Any
    description: str
    default_guidance_scale: float
    default_steps: int
    default_sampler: str = "ddim"
    quant_exclude: tuple[str, ...] = ()
    #: named per-layer override sets a variant can ask for with ``policy=NAME`` (see harness/variants.py)
    quant_policies: dict = field(default_factory=dict)
    num_classes: int = 10
    image_shape: tuple[int, int, int] = (1, 28, 28)
    dataset: str = "fashion-mnist"
    extra: dict = field(default_factory=dict)

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def weights_file(self) -> str:
        return f"{self.name}.safetensors"


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="fashion-dit",
            arch="dit",
            config=DiTConfig(width=256, depth=6, num_heads=4, mlp_ratio=2.0, patch_size=2),
            description="Class-conditional DiT (adaLN-Zero, patch 2, width 256, depth 6) on Fashion-MNIST",
            default_guidance_scale=3.0,
            default_steps=20,
            quant_exclude=("x_embedder", "t_embedder.*", "y_embedder.*", "final_layer.*"),
            # SVDQuant's setting for adaLN models (FLUX): layers fed by the modulation embedding run W4A16
            quant_policies={"paper": {"blocks.*.adaLN_modulation.*": {"activations": None}}},
        ),
        ModelSpec(
            name="fashion-unet",
            arch="unet",
            config=UNetConfig(channels=(64, 128, 128), layers_per_level=1, attention_levels=(2,)),
            description="Class-conditional UNet (64-128-128 channels, attention at 7x7) on Fashion-MNIST",
            default_guidance_scale=3.0,
            default_steps=20,
            quant_exclude=("conv_in", "conv_out", "time_embedding.*", "class_embedding"),
        ),
    )
}


def available_models() -> list[str]:
    """Names of the bundled models."""
    return sorted(MODELS)


def get_spec(name: str) -> ModelSpec:
    """The ``ModelSpec`` of a bundled model; KeyError listing the known names otherwise."""
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(available_models())}") from None


def config_from_dict(arch: str, values: dict) -> Any:
    """Rebuild an architecture config from its ``to_dict()`` form; unknown keys are an error."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch][0](**values)


def build_model(
    name: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, **overrides: Any
) -> nn.Module:
    """Build a bundled model with random weights (``device="meta"`` allocates nothing).

    ``overrides`` replace fields of the spec's architecture config (e.g. ``depth=1`` for tests).
    The model is returned in eval mode.
    """
    spec = get_spec(name)
    config = replace(spec.config, **overrides) if overrides else spec.config
    return build_from_config(spec.arch, config, device=device, dtype=dtype)


def build_from_config(
    arch: str, config: Any, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> nn.Module:
    """Build an architecture from a config object, on ``device`` with parameters of ``dtype``, in eval mode."""
    model_cls = ARCHITECTURES[arch][1]
    with torch.device(device):
        model = model_cls(config)
    return model.to(dtype=dtype).eval()
