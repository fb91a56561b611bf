"""Tiny real diffusers pipelines with random weights (no downloads), and the pipeline arguments that replace
their text encoders (``prompt_embeds`` ...). Five families: FLUX, SD3, PixArt-Sigma, SANA and an SDXL-style UNet."""
from __future__ import annotations

import torch

FAMILIES = ("flux", "sd3", "pixart", "sana", "sdxl")


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1,
                         latent_channels=4, norm_num_groups=8, sample_size=16)


def _dc_vae():
    from diffusers import AutoencoderDC

    return AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2,
                         encoder_block_types=("ResBlock", "EfficientViTBlock"),
                         decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
                         decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)),
                         encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
                         upsample_block_type="interpolate", downsample_block_type="stride_conv",
                         decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407)


def build(family: str, seed: int = 0):
    """(pipeline, denoiser name, prompt argument dicts, extra call kwargs) for ``family``."""
    import diffusers as d

    torch.manual_seed(seed)
    flow, none2 = d.FlowMatchEulerDiscreteScheduler(), dict(text_encoder=None, tokenizer=None)
    if family == "flux":
        tr = d.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                      attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                      pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
        pipe = d.FluxPipeline(scheduler=flow, vae=_vae(), transformer=tr, text_encoder_2=None, tokenizer_2=None,
                              **none2)
        embeds = lambda g: dict(prompt_embeds=torch.randn(1, 5, 32, generator=g),  # noqa: E731
                                pooled_prompt_embeds=torch.randn(1, 16, generator=g))
        return pipe, "transformer", embeds, dict(height=16, width=16, guidance_scale=3.5)
    if family == "sd3":
        tr = d.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                     num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                     pooled_projection_dim=8, out_channels=4)
        pipe = d.StableDiffusion3Pipeline(transformer=tr, scheduler=flow, vae=_vae(), text_encoder_2=None,
                                          tokenizer_2=None, text_encoder_3=None, tokenizer_3=None, **none2)
        embeds = lambda g: dict(prompt_embeds=torch.randn(1, 6, 16, generator=g),  # noqa: E731
                                negative_prompt_embeds=torch.randn(1, 6, 16, generator=g),
                                pooled_prompt_embeds=torch.randn(1, 8, generator=g),
                                negative_pooled_prompt_embeds=torch.randn(1, 8, generator=g))
        return pipe, "transformer", embeds, dict(height=16, width=16, guidance_scale=5.0)
    if family in ("pixart", "sana"):
        if family == "pixart":
            tr = d.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                            num_layers=2, cross_attention_dim=16, sample_size=8, patch_size=2,
                                            caption_channels=16, norm_type="ada_norm_single",
                                            use_additional_conditions=False)
            pipe = d.PixArtSigmaPipeline(vae=_vae(), transformer=tr, scheduler=d.DDIMScheduler(), **none2)
            size = 16
        else:
            tr = d.SanaTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=2,
                                          num_attention_heads=2, attention_head_dim=8, num_cross_attention_heads=2,
                                          cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
                                          sample_size=8)
            pipe = d.SanaPipeline(vae=_dc_vae(), transformer=tr, scheduler=flow, **none2)
            size = 32
        embeds = lambda g: dict(prompt_embeds=torch.randn(1, 6, 16, generator=g),  # noqa: E731
                                prompt_attention_mask=torch.ones(1, 6),
                                negative_prompt_embeds=torch.randn(1, 6, 16, generator=g),
                                negative_prompt_attention_mask=torch.ones(1, 6), negative_prompt=None)
        return pipe, "transformer", embeds, dict(height=size, width=size, guidance_scale=4.5,
                                                 use_resolution_binning=False)
    if family == "sdxl":
        un = d.UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
                                    out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                    use_linear_projection=True, addition_embed_type="text_time",
                                    addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
                                    projection_class_embeddings_input_dim=8 * 6 + 16, cross_attention_dim=32,
                                    norm_num_groups=4)
        pipe = d.StableDiffusionXLPipeline(vae=_vae(), unet=un, scheduler=d.EulerDiscreteScheduler(),
                                           text_encoder_2=None, tokenizer_2=None, **none2)
        embeds = lambda g: dict(prompt_embeds=torch.randn(1, 6, 32, generator=g),  # noqa: E731
                                negative_prompt_embeds=torch.randn(1, 6, 32, generator=g),
                                pooled_prompt_embeds=torch.randn(1, 16, generator=g),
                                negative_pooled_prompt_embeds=torch.randn(1, 16, generator=g))
        return pipe, "unet", embeds, dict(height=16, width=16, guidance_scale=5.0)
    raise ValueError(family)


def prompts(embeds, n: int, seed: int = 100) -> list[dict]:
    """``n`` prompt argument dicts (random text embeddings standing in for encoded prompts)."""
    g = torch.Generator().manual_seed(seed)
    return [embeds(g) for _ in range(n)]


def save_sd_pipeline(directory) -> str:
    """A tiny Stable Diffusion 1.x-style pipeline with a real (tiny) CLIP text encoder and a tokenizer built from
    an in-memory vocabulary, saved with ``save_pretrained`` (so the CLI can take prompt strings). Returns the path."""
    import json
    from pathlib import Path

    import diffusers as d
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    directory = Path(directory)
    tok_dir = directory / "_tokenizer_src"
    tok_dir.mkdir(parents=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz,":
        vocab[ch], vocab[ch + "</w>"] = len(vocab), len(vocab) + 1
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=16)
    torch.manual_seed(0)
    enc = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                       num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16))
    un = d.UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                cross_attention_dim=16, norm_num_groups=4)
    pipe = d.StableDiffusionPipeline(vae=_vae(), text_encoder=enc, tokenizer=tok, unet=un,
                                     scheduler=d.DDIMScheduler(clip_sample=False, steps_offset=1), safety_checker=None,
                                     feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(directory / "pipe")
    return str(directory / "pipe")
