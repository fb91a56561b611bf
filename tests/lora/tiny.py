"""Tiny diffusers models (random weights, small configs) and synthetic LoRAs for the LoRA and export tests."""
from __future__ import annotations

import copy

import torch
from torch import nn

import fourbit

FLUX_EXCLUDE = ("x_embedder", "context_embedder", "time_text_embed.*", "norm_out.*", "proj_out")


def tiny_flux(seed: int = 0) -> nn.Module:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                  attention_head_dim=32, num_attention_heads=2, joint_attention_dim=64,
                                  pooled_projection_dim=32, axes_dims_rope=(8, 12, 12)).eval()


def flux_inputs(seed: int = 1, tokens: int = 32, text: int = 8) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, tokens, 16, generator=g),
                encoder_hidden_states=torch.randn(1, text, 64, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
                img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(text, 3), return_dict=False)


def tiny_sana(seed: int = 0) -> nn.Module:
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(seed)
    return SanaTransformer2DModel(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=32,
                                  num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=32,
                                  cross_attention_dim=64, caption_channels=32, sample_size=8, patch_size=1).eval()


def sana_inputs(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 8, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(1, 6, 32, generator=g), timestep=torch.tensor([500]),
                return_dict=False)


def run(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs)[0]


def quantized(model, inputs: dict, exclude=FLUX_EXCLUDE, rank: int = 8, **kw) -> nn.Module:
    cfg = fourbit.SVDQuantConfig(weights="int4", activations="int4", group_size=64, rank=rank, exclude=exclude,
                                 **kw)
    return fourbit.quantize(copy.deepcopy(model), cfg, forward_loop=lambda m: run(m, inputs), progress=False,
                            verbose=False)


def lora_factors(model, names, rank: int = 4, strength: float = 0.3, seed: int = 0) -> dict:
    """{layer name: (A (r, K), B (N, r))} with ||B A|| ~ strength * ||W|| for each named nn.Linear."""
    g = torch.Generator().manual_seed(seed)
    mods = dict(model.named_modules())
    out = {}
    for n in names:
        w = mods[n].weight.detach()
        a = torch.randn(rank, w.shape[1], generator=g)
        b = torch.randn(w.shape[0], rank, generator=g)
        b *= strength * w.norm() / (b @ a).norm()
        out[n] = (a, b)
    return out


def diffusers_state_dict(factors: dict, prefix: str = "transformer.") -> dict:
    sd = {}
    for n, (a, b) in factors.items():
        sd[f"{prefix}{n}.lora_A.weight"] = a.clone()
        sd[f"{prefix}{n}.lora_B.weight"] = b.clone()
    return sd


def kohya_state_dict(factors: dict, alpha: float) -> dict:
    """kohya naming; B divided by alpha / r so that the file's scale restores it."""
    sd = {}
    for n, (a, b) in factors.items():
        stem = "lora_unet_" + n.replace(".", "_")
        r = a.shape[0]
        sd[f"{stem}.lora_down.weight"] = a.clone()
        sd[f"{stem}.lora_up.weight"] = b / (alpha / r)
        sd[f"{stem}.alpha"] = torch.tensor(alpha)
    return sd


def merged(model, factors: dict, strength: float = 1.0) -> nn.Module:
    """A copy of the 16-bit ``model`` with W += strength * B A in every named layer."""
    m = copy.deepcopy(model)
    mods = dict(m.named_modules())
    with torch.no_grad():
        for n, (a, b) in factors.items():
            mods[n].weight += strength * (b @ a)
    return m


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return float((a - b).norm() / b.norm())
