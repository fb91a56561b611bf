"""Per-family quantization presets, as data: which layers of a denoiser stay 16-bit or run W4A16.

A preset is found by the denoiser's class name; an unknown class gets ``GENERIC``. Patterns are fnmatch patterns
over module names (as in ``QuantConfig.exclude``). ``keep``: layers left 16-bit (embedders, first/last projections,
time and text conditioning: few FLOPs, large error). ``w4a16``: layers with 4-bit weights and 16-bit activations
(the adaptive-norm modulation linears, whose inputs are outlier-heavy; for cross-attention models the key/value
projections of the text tokens, cheap because the text is short). Sources: SVDQuant (Li et al. 2024) section 5 and
appendix; the names are those of diffusers 0.42.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Iterable, Optional

from ..config import QuantConfig


@dataclass(frozen=True)
class Preset:
    name: str
    classes: tuple  # denoiser class names this preset is for
    keep: tuple  # patterns kept 16-bit
    w4a16: tuple = ()  # patterns quantized weight-only (activations 16-bit)
    optional: tuple = ()  # kept 16-bit where present (layers some configs of the class lack): never reported


_CROSS_KV = ("*.attn2.to_k", "*.attn2.to_v")

PRESETS: tuple = (
    Preset("flux", ("FluxTransformer2DModel",),
           keep=("x_embedder", "context_embedder", "time_text_embed.*", "norm_out.*", "proj_out"),
           w4a16=("*.norm1.linear", "*.norm1_context.linear", "single_transformer_blocks.*.norm.linear")),
    Preset("sd3", ("SD3Transformer2DModel",),
           keep=("pos_embed.*", "context_embedder", "time_text_embed.*", "norm_out.*", "proj_out"),
           w4a16=("*.norm1.linear", "*.norm1_context.linear")),
    Preset("pixart", ("PixArtTransformer2DModel",),
           keep=("pos_embed.*", "adaln_single.*", "caption_projection.*", "proj_out") + _CROSS_KV),
    Preset("sana", ("SanaTransformer2DModel",),
           keep=("patch_embed.*", "time_embed.*", "caption_projection.*", "proj_out") + _CROSS_KV),
    Preset("unet", ("UNet2DConditionModel", "UNet2DModel"),
           keep=("conv_in", "conv_out", "time_embedding.*", "*.time_emb_proj") + _CROSS_KV,
           optional=("add_embedding.*", "class_embedding*")),
    Preset("qwen-image", ("QwenImageTransformer2DModel",),
           keep=("img_in", "txt_in", "time_text_embed.*", "norm_out.*", "proj_out"),
           w4a16=("*.img_mod.*", "*.txt_mod.*")),
)

#: any other class: embedders, top-level input/output projections and time/text conditioning stay 16-bit,
#: modulation (adaptive norm) linears run W4A16
GENERIC = Preset("generic", (),
                 keep=("*embed*", "*time*", "*caption*", "*context_embedder*", "conv_in", "conv_out", "proj_in",
                       "proj_out", "img_in", "txt_in", "norm_out*", "final_layer*", "*.time_emb_proj"),
                 w4a16=("*norm*.linear", "*adaln*", "*adaLN*", "*_mod.*", "*modulation*"))

NONE = Preset("none", (), keep=())


def find_preset(model, name: Optional[str] = None) -> Preset:
    """The preset for ``model``: by ``name`` if given ("flux", ..., "generic", "none"), else by class name."""
    every = PRESETS + (GENERIC, NONE)
    if name is not None:
        for p in every:
            if p.name == name:
                return p
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(p.name for p in every)}")
    cls = type(model).__name__
    for p in PRESETS:
        if cls in p.classes:
            return p
    return GENERIC


def apply_preset(config: QuantConfig, preset: Preset) -> QuantConfig:
    """``config`` with the preset's layers added: ``keep`` to exclude, ``w4a16`` as activation overrides placed
    before the user's overrides (so the user's win)."""
    overrides = {p: {"activations": None} for p in preset.w4a16 if p not in config.overrides}
    overrides.update(config.overrides)
    exclude = tuple(config.exclude) + tuple(p for p in preset.keep + preset.optional if p not in config.exclude)
    return dataclasses.replace(config, exclude=exclude, overrides=overrides)


def unmatched_patterns(names: Iterable[str], config: QuantConfig, preset: Preset) -> dict:
    """{pattern: where it came from} for every pattern of the user's config and of a family preset that matches
    no module name (a typo, or a layer renamed by a diffusers release). The generic preset's guesses are not
    reported."""
    names = list(names)
    sources = [(p, "include") for p in config.include if p != "*"]
    sources += [(p, "exclude") for p in config.exclude]
    sources += [(p, "overrides") for p in config.overrides]
    if preset.classes:  # a family preset: a pattern matching nothing means diffusers renamed a layer
        sources += [(p, f"preset {preset.name} keep") for p in preset.keep]
        sources += [(p, f"preset {preset.name} w4a16") for p in preset.w4a16]
    out = {}
    for pattern, where in sources:
        if pattern not in out and not any(fnmatchcase(n, pattern) for n in names):
            out[pattern] = where
    return out
