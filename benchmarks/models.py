"""One compiled denoising step of five model families at 1024x1024: bf16 vs FP8 W8A8 vs fourbit W4A4 and W8A8.

    python benchmarks/models.py                         # H100/H200; needs diffusers (carry its wheel)
    python benchmarks/models.py --models pixart-sigma,sd3-medium
    python benchmarks/models.py --models sana-1.6b --budget 240   # variants that would end after 240 s are skipped
    python benchmarks/models.py --tiny                  # tiny configs on CPU, reference kernel (smoke test)
    python benchmarks/models.py --models pixart-sigma --profile   # also CUDA time by kernel kind per variant
    python benchmarks/models.py --models pixart-sigma --siblings-across-blocks   # text K/V of all blocks in one GEMM

Models (``FAMILIES``): diffusers classes with the published configs written out below, random bf16 weights
(random weights say nothing about image quality, only about speed and memory), the latent of a 1024x1024 image
and the batch each pipeline runs: 2 (classifier-free guidance) except FLUX.1-dev (guidance-distilled, batch 1).
The layers quantized are the linears (and 1x1 convolutions) inside each family's repeated blocks (``blocks``);
the same blocks are compiled (regional ``torch.compile``, inductor default mode) in every variant, by
``fourbit.nn.compile_model`` (what ``fourbit.compile_pipeline`` runs for a pipeline's user):

  bf16           the model as loaded
  fp8-peer       FP8 rowwise dynamic W8A8, the recipe of torchao's
                 ``Float8DynamicActivationFloat8WeightConfig(PerRow())`` in plain torch (``Fp8RowwiseLinear``:
                 per-token amax, scale and cast in torch ops that inductor fuses into the producer,
                 ``torch._scaled_mm`` rowwise); ``--torchao`` runs torchao itself where it imports; the row's
                 ``fp8_recipe`` says which ran
  fourbit-w4a4   sibling linears fused, ``RTNConfig(int4p2, int4p2)`` plus synthetic rank-32 factors and smoothing
                 (the kernels an SVDQuant r32 checkpoint runs; values random), ``kernel="triton"``,
                 ``prepare_kernels``, blocks compiled with ``fourbit.nn.inductor_options()``
  fourbit-fp8    sibling linears fused, ``RTNConfig(fp8, fp8)`` (no branch), same kernels and compile options
  fourbit-w4a4-inline, fourbit-fp8-inline
                 the same quantization, compiled with ``inductor_options(act_quant="inline")``: each layer's
                 activation quantization in torch ops that inductor generates inside the kernel producing X, then
                 the GEMM alone (``fourbit::scaled_gemm``); the row's ``lowered_layers`` counts the layers lowered
                 (``--tiny`` runs the reference kernel, which has nothing to lower: these rows equal the plain ones)
  fourbit-w4a4-cublas, fourbit-fp8-cublas
                 the same quantization on ``fourbit.nn.set_gemm_backend("cublas")``: ``torch._scaled_mm`` with the
                 branch folded into K (``kernels/gemm_cublas.py``); layers with an epilogue activation keep Triton;
                 the row's ``folded_layers`` counts the layers on cuBLAS
  bf16-siblings  the bf16 model with the block linears that read one input fused (one wider GEMM), the control for
                 the planned variants, whose 16-bit layers keep their fusion
  fourbit-w4a4-planned, fourbit-fp8-planned
                 W4A4 (fp8) only where it pays: ``fourbit.plan_precision`` times every block linear's shape at the rows
                 the step calls it with (bf16 vs SVDQuant int4p2 r32 on this GPU, its GEMM on Triton and on cuBLAS:
                 ``kernels=("triton", "triton-cublas")``); a layer not faster than bf16 stays 16-bit, the others run
                 the faster kernel; the row lists the times and choice per layer shape (``plan_shapes``) and
                 ``folded_layers`` (those on cuBLAS)
  fourbit-w4a4-cublas-planned
                 the same plan with every layer on the process-wide 'cublas' backend (Triton not a candidate)
  bf16-copy      a deep copy of the bf16 model, compiled and captured like the others: a control for what being the
                 first model built, compiled and captured does to a step's time
  fourbit-mixed-planned
                 the plan with fp8 W8A8 (no branch) as the fallback: per layer W4A4 if it pays, else fp8 if that pays,
                 else 16 bits, each on its faster GEMM: what a Hopper user would deploy; ``plan_counts`` says how
                 many layers took each (a mixed-precision model, not a W4A4 one)
  fourbit-mixed-fastest-planned
                 the same candidates, each layer on the fastest that pays (``prefer="fastest"``): fp8 where it beats
                 a W4A4 layer that also pays
  fourbit-w4a4-given-planned
                 fourbit-w4a4-planned compiled with ``inductor_options(act_quant="given")``: where a fourbit GEMM
                 produces a layer's input, its epilogue hands the input's row maxima over, and the layer's activation
                 quantization reads it once (the row's ``row_maxima_layers`` counts the rewrites: layers per compiled
                 graph, so blocks that share one compiled graph count once); the default "pass" (each
                 layer finds its own maxima, X read twice at large K) is the control. Run 2026-12-05n (H100) named
                 the two the other way round (``fourbit-w4a4-pass-planned`` was the control); each row's
                 ``act_quant`` says which ran

Timing: each variant's step is captured in a CUDA graph after compilation and warm-up; the graphs of all variants
of a model are replayed in alternation (``--rounds`` rounds after 3 warm-up rounds, median ms per variant), so clock
and temperature drift touch all alike. Also: compile time (compile + first step, incl. Triton autotuning),
weight bytes (parameters + buffers + fourbit's cached operands) and the step's peak memory above what was resident.
Each model appends one row to ``benchmarks/results/models.jsonl`` (``--out``) with ``meta`` (device, date,
versions, git commit: ``git rev-parse`` or the environment variable FOURBIT_GIT_COMMIT).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from typing import Optional

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import (KERNEL_CATEGORY_NAMES, add_synthetic_branch, environment, md_table, next_run,  # noqa: E402
                   profile_step)

# ---- the model families (published configs; tiny ones for the CPU smoke test) -------------------------------
# inputs: name -> ("randn", shape) | ("timestep", shape, value) | ("ids", side, text tokens) for FLUX's position
# ids | a literal; "B" in a shape is the batch.
FAMILIES = {
    "pixart-sigma": dict(  # PixArt-alpha/PixArt-Sigma-XL-2-1024-MS, 0.6B; 300 T5 tokens
        cls="PixArtTransformer2DModel", batch=2, blocks=("BasicTransformerBlock",),
        config=dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                    cross_attention_dim=1152, attention_bias=True, sample_size=128, patch_size=2,
                    activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                    norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=2,
                    use_additional_conditions=False, caption_channels=4096),
        inputs=dict(hidden_states=("randn", ("B", 4, 128, 128)), encoder_hidden_states=("randn", ("B", 300, 4096)),
                    timestep=("timestep", ("B",), 500.0), added_cond_kwargs={"resolution": None, "aspect_ratio": None}),
        tiny=dict(config=dict(num_attention_heads=2, attention_head_dim=16, num_layers=2, cross_attention_dim=32,
                              sample_size=8, caption_channels=32, norm_num_groups=4),
                  inputs=dict(hidden_states=("randn", ("B", 4, 8, 8)), encoder_hidden_states=("randn", ("B", 6, 32))))),
    "sd3-medium": dict(  # stabilityai/stable-diffusion-3-medium-diffusers, 2B; 77 CLIP + 256 T5 tokens
        cls="SD3Transformer2DModel", batch=2, blocks=("JointTransformerBlock",),
        config=dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                    pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192),
        inputs=dict(hidden_states=("randn", ("B", 16, 128, 128)), encoder_hidden_states=("randn", ("B", 333, 4096)),
                    pooled_projections=("randn", ("B", 2048)), timestep=("timestep", ("B",), 500.0)),
        tiny=dict(config=dict(sample_size=8, num_layers=2, attention_head_dim=16, num_attention_heads=2,
                              joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=16,
                              pos_embed_max_size=8),
                  inputs=dict(hidden_states=("randn", ("B", 16, 8, 8)), encoder_hidden_states=("randn", ("B", 6, 32)),
                              pooled_projections=("randn", ("B", 16))))),
    "sana-1.6b": dict(  # Efficient-Large-Model/Sana_1600M_1024px_diffusers; 32x32 DC-AE latent, 300 Gemma tokens
        cls="SanaTransformer2DModel", batch=2, blocks=("SanaTransformerBlock",),
        config=dict(in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32, num_layers=20,
                    num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240,
                    caption_channels=2304, mlp_ratio=2.5, attention_bias=False, sample_size=32, patch_size=1,
                    norm_elementwise_affine=False, norm_eps=1e-6),
        inputs=dict(hidden_states=("randn", ("B", 32, 32, 32)), encoder_hidden_states=("randn", ("B", 300, 2304)),
                    timestep=("timestep", ("B",), 500.0)),
        tiny=dict(config=dict(num_attention_heads=2, attention_head_dim=16, num_layers=2, num_cross_attention_heads=2,
                              cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=32, sample_size=8),
                  inputs=dict(hidden_states=("randn", ("B", 32, 8, 8)), encoder_hidden_states=("randn", ("B", 6, 32))))),
    "sdxl-unet": dict(  # stabilityai/stable-diffusion-xl-base-1.0 unet, 2.6B; 77 tokens of CLIP-L + bigG
        cls="UNet2DConditionModel", batch=2, blocks=("BasicTransformerBlock",),
        config=dict(sample_size=128, in_channels=4, out_channels=4,
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                    block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
                    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                    projection_class_embeddings_input_dim=2816),
        inputs=dict(sample=("randn", ("B", 4, 128, 128)), timestep=("timestep", ("B",), 500.0),
                    encoder_hidden_states=("randn", ("B", 77, 2048)),
                    added_cond_kwargs={"text_embeds": ("randn", ("B", 1280)), "time_ids": ("randn", ("B", 6))}),
        tiny=dict(config=dict(sample_size=8, block_out_channels=(32, 32, 64), cross_attention_dim=32,
                              transformer_layers_per_block=(1, 1, 1), attention_head_dim=(2, 2, 4), norm_num_groups=8,
                              addition_time_embed_dim=8, projection_class_embeddings_input_dim=64),
                  inputs=dict(sample=("randn", ("B", 4, 8, 8)), encoder_hidden_states=("randn", ("B", 6, 32)),
                              added_cond_kwargs={"text_embeds": ("randn", ("B", 16)), "time_ids": ("randn", ("B", 6))}))),
    "flux-dev": dict(  # black-forest-labs/FLUX.1-dev transformer, 12B; 4096 image + 512 T5 tokens, batch 1
        cls="FluxTransformer2DModel", batch=1, blocks=("FluxTransformerBlock", "FluxSingleTransformerBlock"),
        config=dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
                    attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                    pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
        inputs=dict(hidden_states=("randn", ("B", 4096, 64)), encoder_hidden_states=("randn", ("B", 512, 4096)),
                    pooled_projections=("randn", ("B", 768)), timestep=("timestep", ("B",), 0.5),
                    guidance=("timestep", ("B",), 3.5), img_ids=("ids", 64, 0), txt_ids=("ids", 0, 512)),
        tiny=dict(config=dict(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                              num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                              axes_dims_rope=(4, 6, 6)),
                  inputs=dict(hidden_states=("randn", ("B", 64, 16)), encoder_hidden_states=("randn", ("B", 8, 32)),
                              pooled_projections=("randn", ("B", 16)), img_ids=("ids", 8, 0), txt_ids=("ids", 0, 8)))),
}
VARIANTS = ("bf16", "fp8-peer", "fourbit-w4a4", "fourbit-fp8", "fourbit-w4a4-cublas", "fourbit-fp8-cublas",
            "fourbit-w4a4-inline", "fourbit-fp8-inline", "fourbit-w4a4-planned", "fourbit-w4a4-cublas-planned",
            "fourbit-fp8-planned", "bf16-siblings", "fourbit-mixed-planned", "fourbit-mixed-fastest-planned",
            "bf16-copy", "fourbit-w4a4-given-planned")


def family(name: str, tiny: bool) -> dict:
    fam = dict(FAMILIES[name])
    if tiny:
        fam["config"] = {**fam["config"], **fam["tiny"]["config"]}
        fam["inputs"] = {**fam["inputs"], **fam["tiny"]["inputs"]}
    return fam


def build(fam: dict, device, dtype=torch.bfloat16, seed=0) -> nn.Module:
    import diffusers

    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in bf16 on the device directly: no fp32 copy of 12B parameters
    try:
        with torch.device(device):
            model = getattr(diffusers, fam["cls"])(**fam["config"])
    finally:
        torch.set_default_dtype(old)
    return model.to(device=device, dtype=dtype).eval()


def make_inputs(fam: dict, device, dtype=torch.bfloat16, seed=0) -> dict:
    g = torch.Generator(device=device).manual_seed(seed)
    b = fam["batch"]

    def make(spec):
        if isinstance(spec, dict):
            return {k: make(v) for k, v in spec.items()}
        if not isinstance(spec, tuple):
            return spec
        kind, *rest = spec
        if kind == "randn":
            shape = tuple(b if d == "B" else d for d in rest[0])
            return torch.randn(shape, device=device, generator=g).to(dtype)
        if kind == "timestep":
            return torch.full((b,), rest[1], device=device, dtype=dtype)
        side, text = rest  # FLUX position ids: (side * side, 3) image grid or (text, 3) zeros
        if text:
            return torch.zeros(text, 3, device=device)
        ids = torch.zeros(side, side, 3, device=device)
        ids[..., 1] = torch.arange(side, device=device)[:, None]
        ids[..., 2] = torch.arange(side, device=device)[None, :]
        return ids.reshape(-1, 3)

    return {**make(fam["inputs"]), "return_dict": False}


def block_names(model: nn.Module, fam: dict) -> list[str]:
    return [n for n, m in model.named_modules() if type(m).__name__ in fam["blocks"]]


def in_blocks(fqn: str, blocks: list[str]) -> bool:
    return any(fqn.startswith(b + ".") for b in blocks)


def _plain_tensors(t: torch.Tensor) -> list:
    """The plain tensors under a tensor subclass (torchao's quantized weights: ``__tensor_flatten__``), or [t]."""
    if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return [p for n in names for p in _plain_tensors(getattr(t, n))]
    return [t]


def weight_bytes(model: nn.Module) -> int:
    """Parameters + buffers + fourbit's cached kernel operands (speed mode), each storage counted once."""
    tensors = list(model.parameters()) + list(model.buffers())
    for m in model.modules():
        st = getattr(m, "_cache", {}).get("fourbit.kernels.linear") if hasattr(m, "_cache") else None
        if st is not None and st.weight is not None:
            f = st.weight.folded  # first: the operand w is a view of its w_ext (storages are counted once)
            parts = () if f is None else (f.w_ext, f.col_scale, f.lr_mult)
            parts += (st.weight.w, st.weight.col_scale, st.weight.group_scale)
            tensors += [t for t in parts if t is not None]
    seen, total = set(), 0
    for t in (p for t in tensors for p in _plain_tensors(t)):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


# ---- the FP8 peer ------------------------------------------------------------------------------------------
class Fp8RowwiseLinear(nn.Module):
    """torchao's FP8 rowwise dynamic W8A8 recipe in plain torch: weight e4m3 with one fp32 scale per output
    channel (amax / 448); per call, per-token amax, scale and cast (torch ops: inductor fuses them into the kernel
    that produces X), then ``torch._scaled_mm`` with row and column scales, bias and bf16 output."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        w = lin.weight.detach().float()
        s = w.abs().amax(1, keepdim=True).clamp(min=1e-12) / 448.0  # (N, 1)
        self.register_buffer("w8", (w / s).clamp(-448, 448).to(torch.float8_e4m3fn))  # (N, K)
        self.register_buffer("w_scale", s.t().contiguous())  # (1, N)
        self.bias = None if lin.bias is None else nn.Parameter(lin.bias.detach(), requires_grad=False)
        self.in_features, self.out_features = lin.in_features, lin.out_features

    def forward(self, x):
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        a = x2.abs().amax(-1, keepdim=True).float().clamp(min=1e-12) / 448.0  # (M, 1)
        xq = (x2.float() / a).clamp(-448, 448).to(torch.float8_e4m3fn)
        y = torch._scaled_mm(xq, self.w8.t(), scale_a=a, scale_b=self.w_scale, bias=self.bias, out_dtype=x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


def fp8_peer(model: nn.Module, blocks: list[str], prefer_torchao: bool = True) -> str:
    """Quantize the blocks' linears with the FP8 rowwise recipe in place; returns which implementation ran."""
    def eligible(m, fqn):
        return (isinstance(m, nn.Linear) and in_blocks(fqn, blocks)
                and m.in_features % 16 == 0 and m.out_features % 16 == 0)

    if prefer_torchao:
        try:
            import torchao
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

            quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=eligible)
            return f"torchao {torchao.__version__} Float8DynamicActivationFloat8WeightConfig(PerRow())"
        except Exception as e:  # noqa: BLE001 - any failure: the plain-torch recipe, said so
            print(f"torchao unavailable ({type(e).__name__}: {str(e).splitlines()[0][:200]}); plain-torch recipe",
                  flush=True)
    from fourbit.nn import set_module

    for fqn, m in list(model.named_modules()):
        if eligible(m, fqn):
            set_module(model, fqn, Fp8RowwiseLinear(m))
    return "plain torch (per-token amax + cast under inductor, torch._scaled_mm rowwise)"


# ---- fourbit -------------------------------------------------------------------------------------------------
FP8_FALLBACK = {"weights": "fp8", "activations": "fp8"}  # W8A8 without a branch (the synthetic one goes to int4p2)


def fourbit_variant(model, blocks, inputs, fmt: str, rank: int, kernel: str, across_blocks: bool = False,
                    plan: bool = False, plan_kernels=(), fallbacks=(), log=print, prefer: str = "first") -> dict:
    """Quantize ``model``'s block linears in place (siblings fused); ``plan``: only the layers that
    ``fourbit.plan_precision`` times faster than bf16 at their rows (SVDQuant with ``rank`` for the timing, then
    ``fallbacks``: rank-0 config changes such as ``FP8_FALLBACK``), the others kept 16-bit; ``plan_kernels``: the
    kernels timed per layer (the faster one kept; default ``kernel``); ``prefer``: as for ``plan_precision``."""
    import fourbit

    call = lambda m: m(**inputs)  # noqa: E731
    cfg = fourbit.RTNConfig(weights=fmt, activations=fmt, kernel=kernel, include=[b + ".*" for b in blocks])
    info = fuse_block_siblings(model, blocks, inputs, across_blocks, cfg)
    if plan:
        t0 = time.perf_counter()
        timing = fourbit.SVDQuantConfig(weights=fmt, activations=fmt, rank=rank, kernel=kernel,
                                        include=cfg.include) if rank else cfg
        # the tiny CPU smoke test times the reference kernel, slower than bf16 everywhere: keep every layer there
        chosen = fourbit.plan_precision(model, timing, call, progress=False, kernels=plan_kernels,
                                        fallbacks=[dict(f, rank=0) if rank else f for f in fallbacks],
                                        min_speedup=1.0 if kernel != "reference" else 1e-9,
                                        rounds=20 if kernel != "reference" else 2, prefer=prefer)
        log(chosen.summary())
        overrides = {pattern: {k: v for k, v in changes.items() if k != "rank"}  # RTN has no rank: the synthetic
                     for pattern, changes in chosen.config.overrides.items()}  # branch goes to `fmt` layers only
        cfg = dataclasses.replace(cfg, overrides=overrides)
        info.update(plan_seconds=time.perf_counter() - t0, plan_counts=chosen.counts(),
                    plan_estimated_speedup=chosen.estimated_speedup(),
                    plan_shapes=plan_shapes(chosen))
        from fourbit.calibration import select_targets

        if not select_targets(model, cfg)[0]:
            return dict(info, quantized_layers=0)  # nothing pays in low precision: the bf16-siblings model
    t0 = time.perf_counter()
    fourbit.quantize(model, cfg, progress=False, verbose=False)
    info.update(quantized_layers=len(model.fourbit_report.layers), quantize_seconds=time.perf_counter() - t0)
    if rank:
        add_synthetic_branch(model, rank, only=lambda layer: layer.weight_format.name == fmt)
    return info


def plan_shapes(plan) -> list[dict]:
    """The plan per distinct (rows, K, N): how many layers, the ms per layer of each candidate, the choice."""
    shapes: dict = {}
    for lp in plan.layers:
        key = (json.dumps(lp.rows), lp.in_features, lp.out_features, lp.choice)
        if key not in shapes:
            shapes[key] = dict(rows=lp.rows, k=lp.in_features, n=lp.out_features, layers=0,
                               ms={c: round(v, 5) for c, v in lp.ms.items()}, choice=lp.choice)
        shapes[key]["layers"] += 1
    return list(shapes.values())


def fuse_block_siblings(model, blocks, inputs, across_blocks: bool = False, cfg=None) -> dict:
    """Fuse the block linears that read one input (``fourbit.find_siblings`` over one step; ``cfg``: only layers it
    quantizes the same way). Alone, on the bf16 model, it is the control for what fusion gives bf16 (the planned
    variants keep some fused groups in bf16)."""
    import fourbit

    cfg = cfg or fourbit.RTNConfig(include=[b + ".*" for b in blocks])
    with torch.inference_mode():
        groups = fourbit.find_siblings(model, lambda m: m(**inputs), config=cfg, across_blocks=across_blocks)
    fourbit.fuse_siblings(model, groups)
    return dict(sibling_groups=len(groups))


# ---- compile, capture, time ------------------------------------------------------------------------------------
def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def prepare(model, fam, inputs, device, fourbit_kernels: bool, tiny: bool, compile_: bool = True,
            act_quant: str = "pass") -> dict:
    """Compile the blocks (fourbit: after ``prepare_kernels``, with ``inductor_options(act_quant)``) and run the first
    step: {compile_seconds, peak_step_bytes, out, graphs (dynamo graphs compiled)} (fourbit: also ``lowered_layers``,
    the inline lowering's count, and ``row_maxima_layers``, rewrite 4's)."""
    from fourbit.kernels.fusion import fusion_stats
    from fourbit.nn import compile_model, prepare_kernels

    from torch._dynamo.utils import counters

    t0 = time.perf_counter()
    lowered = fusion_stats().get("inline", 0)
    handed = fusion_stats().get("row_maxima", 0)
    graphs = counters["stats"]["unique_graphs"]
    with torch.inference_mode():
        if compile_:  # what fourbit.compile_pipeline does: kernels prepared, the blocks compiled with the pass
            compile_model(model, lambda m: m(**inputs), kernel=None, blocks=fam["blocks"],
                          fusion=fourbit_kernels and not tiny, act_quant=act_quant,
                          cuda_graphs=False)  # the step's graph is captured below, around the whole call
        elif fourbit_kernels and not tiny:
            prepare_kernels(model, forward_loop=lambda m: m(**inputs))
        out = model(**inputs)[0]
        lowered = fusion_stats().get("inline", 0) - lowered
        handed = fusion_stats().get("row_maxima", 0) - handed
        sync(device)
        secs = time.perf_counter() - t0
        peak = None
        if device == "cuda":
            model(**inputs)  # a second step (recompiles, if any, happen on the first)
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            out = model(**inputs)[0]
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
    info = dict(lowered_layers=lowered, row_maxima_layers=handed) if fourbit_kernels else {}
    return dict(compile_seconds=secs, peak_step_bytes=peak, out=out.float(),
                graphs=counters["stats"]["unique_graphs"] - graphs, **info)  # dynamo graphs compiled for this variant


@contextlib.contextmanager
def gemm_backend(name):
    """fourbit's GEMM backend while a variant is prepared, compiled and captured (None: leave it alone)."""
    if name is None:
        yield
        return
    from fourbit.nn import set_gemm_backend

    set_gemm_backend(name)
    try:
        yield
    finally:
        set_gemm_backend("triton")


COPY_HEADROOM = 1.3  # a variant starts as a bf16 copy of the model; quantizing and compiling need some more


def memory_short(base, device: str):
    """Why a copy of ``base`` would not fit in the GPU's free memory now (None if it fits, or on the CPU)."""
    if device != "cuda":
        return None
    need = COPY_HEADROOM * sum(t.numel() * t.element_size() for t in list(base.parameters()) + list(base.buffers()))
    free, _ = torch.cuda.mem_get_info()
    if free >= need:
        return None
    return (f"memory: {free / 2**30:.1f} GiB free, a copy of the model needs ~{need / 2**30:.1f} GiB with the variants "
            f"before it resident; run fewer variants per call (--variants)")


def folded_layers(model) -> int:
    """How many quantized layers carry the 'cublas' backend's folded weight."""
    from fourbit.kernels.linear import _CACHE_KEY
    from fourbit.nn import quantized_layers

    n = 0
    for _, layer in quantized_layers(model):
        st = layer._cache.get(_CACHE_KEY)
        n += st is not None and st.weight is not None and st.weight.folded is not None
    return n


def capture(model, inputs):
    from _util import capture_graph

    with torch.inference_mode():
        return capture_graph([lambda: model(**inputs)], min_calls=1)


def rounds_for(rounds: int, variants: int) -> int:
    """At least ``rounds``, a multiple of ``variants``: with the order rotated each round, every variant then takes
    every position equally often."""
    return -(-max(rounds, 1) // variants) * variants


def alternate(graphs: dict, rounds: int, warmup: int = 3, samples: Optional[dict] = None) -> dict:
    """Replay the graphs in turn, ``warmup`` + ``rounds`` rounds: median ms per graph over the timed rounds. The
    order rotates each round, so that no variant is always first after the synchronisation between rounds. (This
    did not explain what it was added for: on the H200, 2026-12-05, PixArt's first model built replayed 4.5% faster
    than a deep copy of it in either order; ``solo`` times each graph alone beside this.) ``samples``: a dict that
    receives each graph's ms per timed round, in round order (``round_ratios``)."""
    times = {k: [] for k in graphs}
    keys = list(graphs)
    for r in range(warmup + rounds):
        events = []
        shift = r % len(keys)
        for k in keys[shift:] + keys[:shift]:
            g, calls = graphs[k]
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            events.append((k, a, b, calls))
        torch.cuda.synchronize()
        if r >= warmup:
            for k, a, b, calls in events:
                times[k].append(a.elapsed_time(b) / calls)
    if samples is not None:
        samples.update(times)
    return {k: float(statistics.median(v)) for k, v in times.items()}


def round_ratios(samples: dict, base: str = "bf16") -> dict:
    """Per variant, the speed-up over ``base`` within each alternated round (base's ms / the variant's, the same
    round): [10th percentile, median, 90th percentile] over the rounds (nearest rank), the run's own spread of the
    ratio, beside the ratio of the medians."""
    if base not in samples:
        return {}
    out = {}
    for k, v in samples.items():
        r = sorted(b / t for b, t in zip(samples[base], v))
        pick = lambda q: r[min(len(r) - 1, max(0, round(q * (len(r) - 1))))]  # noqa: E731
        out[k] = [pick(0.1), float(statistics.median(r)), pick(0.9)]
    return out


def solo(graphs: dict, rounds: int, warmup: int = 3) -> dict:
    """Each graph replayed ``warmup`` + ``rounds`` times back to back (no other model in between): median ms."""
    out = {}
    for k, (g, calls) in graphs.items():
        times = []
        for r in range(warmup + rounds):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            torch.cuda.synchronize()
            if r >= warmup:
                times.append(a.elapsed_time(b) / calls)
        out[k] = float(statistics.median(times))
    return out


def uncaptured(models: dict, inputs: dict, rounds: int, calls: int = 4, warmup: int = 2) -> dict:
    """Each compiled model called ``calls`` times in a row without a CUDA graph, as a pipeline calls its denoiser
    (no synchronisation between the calls: the host may run ahead), the order rotated each round: median ms per
    call, launch gaps included (the start event is recorded before the first launch)."""
    times = {k: [] for k in models}
    keys = list(models)
    with torch.inference_mode():
        for r in range(warmup + rounds):
            shift = r % len(keys)
            for k in keys[shift:] + keys[:shift]:
                torch.cuda.synchronize()
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                for _ in range(calls):
                    models[k](**inputs)
                b.record()
                torch.cuda.synchronize()
                if r >= warmup:
                    times[k].append(a.elapsed_time(b) / calls)
    return {k: float(statistics.median(v)) for k, v in times.items()}


def front_door(models: dict, inputs: dict, rounds: int, calls: int = 4) -> tuple[dict, dict]:
    """``uncaptured``'s timing with each model's forward under ``fourbit.nn.graph_forward``, as
    ``compile_pipeline`` leaves a denoiser on CUDA by default: its host work per call (the signature, the addresses
    of the module's tensors compared with the capture's, the inputs copied into the captured ones) is timed too.
    Returns (ms per call, host ms per call: the median wall time of a call returning while the GPU is still busy,
    i.e. ``graph_forward``'s own host cost, which stays hidden while it is below the step's GPU time). The graphs
    are released afterwards."""
    from fourbit.nn import graph_forward, release_graphs

    try:
        for m in models.values():
            graph_forward(m)
        ms = uncaptured(models, inputs, rounds, calls)  # graph_forward's 2 eager calls and capture: warm-up round 1
        return ms, {k: host_ms_per_call(m, inputs) for k, m in models.items()}
    finally:
        for m in models.values():
            release_graphs(m)


def host_ms_per_call(model, inputs: dict, calls: int = 8) -> float:
    """Median wall ms of ``calls`` calls in a row, none waiting for the GPU (the host time to issue one call)."""
    times = []
    with torch.inference_mode():
        torch.cuda.synchronize()
        for _ in range(calls):
            t0 = time.perf_counter()
            model(**inputs)
            times.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
    return float(statistics.median(times))


class TimeLimit(BaseException):
    """SIGTERM (the run script's ``timeout``) arrived: the profile stops and the timed row is still written."""


def stop_on_sigterm():
    def handler(signum, frame):
        raise TimeLimit()

    signal.signal(signal.SIGTERM, handler)


def git_commit() -> str:
    if os.environ.get("FOURBIT_GIT_COMMIT"):  # a copy of the tree (the GPU machine) inside another checkout
        return os.environ["FOURBIT_GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=os.path.dirname(os.path.abspath(__file__)), check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_model(name: str, args, device: str, log) -> dict:
    tiny = args.tiny
    fam = family(name, tiny)
    kernel = "reference" if tiny else "triton"
    t0 = time.perf_counter()
    base = build(fam, device)
    inputs = make_inputs(fam, device)
    blocks = block_names(base, fam)
    row = dict(model=name, cls=fam["cls"], batch=fam["batch"], blocks=len(blocks),
               params=sum(p.numel() for p in base.parameters()), siblings_across_blocks=args.siblings_across_blocks,
               variants={})
    log(f"{name}: built {fam['cls']} ({row['params'] / 1e9:.2f} B params, {len(blocks)} blocks) in "
        f"{time.perf_counter() - t0:.1f}s")
    models, graphs, ref = {}, {}, None
    longest = 0.0  # the longest compile + first step so far: a variant that would not finish in budget is skipped
    for i, variant in enumerate(args.variants):
        res = row["variants"].setdefault(variant, {})
        spent = time.perf_counter() - t0
        if i and args.budget is not None and spent + longest > args.budget:  # time what is compiled, not lose it all
            res["skipped"] = (f"budget: {spent:.0f} s spent of {args.budget:.0f} s before this variant, whose compile "
                              f"may take {longest:.0f} s as the longest so far did")
            log(f"{name} {variant}: skipped ({res['skipped']})")
            continue
        act_quant = "inline" if variant.endswith("-inline") else "given" if "-given" in variant else "pass"
        gemm = "cublas" if "-cublas" in variant else "triton"  # the process-wide GEMM backend
        # planned on Triton's GEMM: each layer also timed with its GEMM on cuBLAS, the faster kernel kept per layer
        per_layer = variant.endswith("-planned") and gemm == "triton" and not tiny
        plan_kernels = ("triton", "triton-cublas") if per_layer else ()
        short = memory_short(base, device) if variant != "bf16" else None
        if short:  # every model stays resident for the alternated replay: FLUX.1's copies fill an H200
            res["skipped"] = short
            log(f"{name} {variant}: skipped ({short})")
            continue
        try:
            m = base if variant == "bf16" else copy.deepcopy(base)
            if variant == "fp8-peer":
                res["fp8_recipe"] = fp8_peer(m, blocks, prefer_torchao=args.torchao and not tiny)
            elif variant == "bf16-siblings":
                res.update(fuse_block_siblings(m, blocks, inputs, args.siblings_across_blocks))
            elif variant.startswith("fourbit-w4a4"):
                with gemm_backend(gemm if variant.endswith("-planned") and not tiny else None):  # plan as it runs
                    res.update(fourbit_variant(m, blocks, inputs, "int4p2", args.rank, kernel,
                                               args.siblings_across_blocks, plan=variant.endswith("-planned"),
                                               plan_kernels=plan_kernels, log=log), format="int4p2", rank=args.rank)
            elif variant.startswith("fourbit-mixed"):
                res.update(fourbit_variant(m, blocks, inputs, "int4p2", args.rank, kernel,
                                           args.siblings_across_blocks, plan=True, plan_kernels=plan_kernels,
                                           fallbacks=[FP8_FALLBACK], log=log,
                                           prefer="fastest" if "-fastest" in variant else "first"),
                           format="int4p2 / fp8", rank=args.rank)
            elif variant.startswith("fourbit-fp8"):
                with gemm_backend(gemm if variant.endswith("-planned") and not tiny else None):
                    res.update(fourbit_variant(m, blocks, inputs, "fp8", 0, kernel, args.siblings_across_blocks,
                                               plan=variant.endswith("-planned"), plan_kernels=plan_kernels, log=log),
                               format="fp8", rank=0)
            if variant.startswith("fourbit"):
                res["act_quant"] = act_quant
                res["gemm"] = "per layer" if per_layer else gemm
            if variant.endswith("-planned") and res.get("quantized_layers") == 0:
                res["skipped"] = "the plan kept every layer 16-bit: this model is the bf16-siblings variant"
                log(f"{name} {variant}: {res['skipped']}")
                continue
            with gemm_backend(gemm if variant.startswith("fourbit") and not tiny else None):
                p = prepare(m, fam, inputs, device, variant.startswith("fourbit"), tiny, not args.no_compile,
                            act_quant)
                out = p.pop("out")
                if device == "cuda":
                    graphs[variant] = capture(m, inputs)
            res["weight_bytes"] = weight_bytes(m)
            res.update(p)
            longest = max(longest, res["compile_seconds"])
            if gemm == "cublas" or per_layer:
                res["folded_layers"] = folded_layers(m)
            if ref is None:
                ref = out
            res["rel_diff_vs_bf16"] = float((out - ref).norm() / ref.norm())  # random weights: only a sanity check
            res["finite"] = bool(torch.isfinite(out).all())
            models[variant] = m
            log(f"{name} {variant}: compile+first step {res['compile_seconds']:.1f}s, weights "
                f"{res['weight_bytes'] / 2**30:.2f} GiB, rel. diff vs bf16 {res['rel_diff_vs_bf16']:.3f}")
        except Exception as e:  # noqa: BLE001 - one variant failing must not lose the others
            res["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            log(f"{name} {variant}: FAILED {res['error']}")
        except TimeLimit:  # SIGTERM while building: time the variants built so far, no profile, write the row
            res["skipped"] = "time limit (SIGTERM) while building this variant"
            row["cut"] = f"SIGTERM while building {variant}: later variants not built, no profile"
            log(f"{name} {variant}: cut by the time limit; timing the {len(graphs)} variants built")
            break
    if graphs:
        rounds = row["rounds"] = rounds_for(args.rounds, len(graphs))
        samples = {}
        ms = alternate(graphs, rounds, samples=samples)
        for k, v in round_ratios(samples).items():  # the ratio's spread within this run
            row["variants"][k]["speedup_vs_bf16_rounds"] = v
        for k, v in solo(graphs, args.rounds).items():  # each graph alone, back to back: beside the alternated time
            row["variants"][k]["step_ms_solo"] = v
        log(f"{name} solo: " + ", ".join(f"{k} {row['variants'][k]['step_ms_solo']:.2f} ms" for k in graphs))
        for k, v in ms.items():
            row["variants"][k]["step_ms"] = v
        b = ms.get("bf16")
        for k, v in ms.items():
            row["variants"][k]["speedup_vs_bf16"] = b / v if b else None
        log(f"{name}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()))
        if args.uncaptured_rounds:  # what a pipeline's user gets: the compiled blocks, no whole-step CUDA graph
            try:
                calls = uncaptured({k: models[k] for k in graphs}, inputs, args.uncaptured_rounds)
                for k, v in calls.items():
                    row["variants"][k]["call_ms_uncaptured"] = v
                    row["variants"][k]["uncaptured_speedup_vs_bf16"] = calls["bf16"] / v if "bf16" in calls else None
                log(f"{name} uncaptured: " + ", ".join(f"{k} {v:.2f} ms" for k, v in calls.items()))
            except TimeLimit:
                row["uncaptured_cut"] = "SIGTERM (time limit) during the uncaptured timing"
        if args.front_door_rounds:  # what compile_pipeline's user gets by default: graph_forward's replays
            graphs_kept = list(graphs)
            graphs.clear()  # the whole-step graphs' memory pools go before graph_forward captures its own
            try:
                calls, host = front_door({k: models[k] for k in graphs_kept}, inputs, args.front_door_rounds)
                for k, v in calls.items():
                    row["variants"][k]["call_ms_front_door"] = v
                    row["variants"][k]["host_ms_front_door"] = host[k]
                    row["variants"][k]["front_door_speedup_vs_bf16"] = calls["bf16"] / v if "bf16" in calls else None
                log(f"{name} front door (graph_forward): " + ", ".join(
                    f"{k} {v:.2f} ms (host {host[k]:.3f} ms per call)" for k, v in calls.items()))
            except TimeLimit:
                row["front_door_cut"] = "SIGTERM (time limit) during the front-door timing"
    if args.profile and device == "cuda" and "cut" not in row:  # after the timing: it does not disturb it
        try:
            for k, m in models.items():
                gemm = row["variants"][k].get("gemm")  # "per layer": the layers' own kernels, Triton process-wide
                with gemm_backend("cublas" if gemm == "cublas" else None):
                    top = []
                    prof = profile_step(m, inputs, top=top)
                row["variants"][k]["profile_ms"] = {c: round(v, 3) for c, v in prof.items()}
                row["variants"][k]["profile_top"] = top  # the 20 kernels with the most CUDA time: (name, ms, calls)
                log(f"{name} {k} profile (ms): {json.dumps(row['variants'][k]['profile_ms'])}")
                log(f"{name} {k} top kernels (name, ms, calls): {json.dumps(top)}")
        except TimeLimit:  # the time limit came during the profile: keep the timed row, profile what was done
            row["profile_cut"] = "SIGTERM (time limit) during the profile"
            log(f"{name}: profile cut by the time limit; the timed row is kept")
    row.setdefault("rounds", args.rounds)
    row["replay_order"] = "rotated each round"
    graphs.clear()
    models.clear()
    del base
    if device == "cuda":
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    return row


def _ratio(num, den, spread=None) -> str:
    """'1.23x' for num / den (times in ms: a speed-up of den's variant), '-' where either is missing; with
    ``spread`` ([p10, median, p90] of the per-round ratios) '1.23x (1.21-1.25)'."""
    if not (num and den):
        return "-"
    return f"{num / den:.2f}x" + ("" if not spread else f" ({spread[0]:.2f}-{spread[2]:.2f})")


def table(rows: list[dict]) -> str:
    """The run's markdown: per variant the alternated step and its ratio to bf16 (with the 10th-90th percentile of
    the per-round ratios where timed) and to the FP8 peer (the acceptance's two baselines), the solo ratio to bf16,
    the uncaptured calls, compile time, bytes; then the profile if taken."""
    out = []
    for r in rows:
        variants = r["variants"]
        b, peer = (variants.get(k, {}).get("step_ms") for k in ("bf16", "fp8-peer"))
        b_solo = variants.get("bf16", {}).get("step_ms_solo")
        for k, v in variants.items():
            ms, unc, door = v.get("step_ms"), v.get("uncaptured_speedup_vs_bf16"), v.get("front_door_speedup_vs_bf16")
            out.append([r["model"], k, "-" if ms is None else f"{ms:.2f}",
                        _ratio(b, ms, None if k == "bf16" else v.get("speedup_vs_bf16_rounds")), _ratio(peer, ms),
                        _ratio(b_solo, v.get("step_ms_solo")),
                        "-" if unc is None else f"{v['call_ms_uncaptured']:.2f} ({unc:.2f}x)",
                        "-" if door is None else f"{v['call_ms_front_door']:.2f} ({door:.2f}x)",
                        f"{v.get('compile_seconds', 0):.0f}", v.get("graphs", "-"),
                        f"{v.get('weight_bytes', 0) / 2**30:.2f}",
                        "-" if v.get("peak_step_bytes") is None else f"{v['peak_step_bytes'] / 2**30:.2f}",
                        (v.get("error") or v.get("skipped") or "")[:80]])
    md = md_table(["model", "variant", "step ms", "vs bf16", "vs FP8 peer", "solo vs bf16", "no graph ms (vs bf16)",
                   "graph_forward ms (vs bf16)",
                   "compile s", "graphs", "weights GiB", "step peak GiB", "error"], out)
    prof = [[r["model"], k] + [f"{v['profile_ms'][c]:.2f}" for c in KERNEL_CATEGORY_NAMES]
            for r in rows for k, v in r["variants"].items() if v.get("profile_ms")]
    if prof:
        md += ("\nCUDA time of one compiled step by kernel kind (ms; torch.profiler, not graph-replayed):\n\n"
               + md_table(["model", "variant"] + list(KERNEL_CATEGORY_NAMES), prof))
    return md


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--models", default=",".join(FAMILIES), help="comma list of " + ", ".join(FAMILIES))
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of " + ", ".join(VARIANTS))
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--tiny", action="store_true", help="tiny configs on CPU, reference kernel (smoke test)")
    p.add_argument("--torchao", action="store_true", help="the FP8 peer through torchao where it imports (torchao "
                   "0.17 on torch 2.11, H200, 2026-12-04: compiling PixArt-Sigma took 397 s against 13.5 s for bf16, "
                   "so the default is the same recipe in plain torch)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (the quick test of this script)")
    p.add_argument("--siblings-across-blocks", action="store_true", help="fourbit variants: sibling groups may "
                   "span blocks (every block's text K/V in one wide GEMM, run outside the compiled graphs)")
    p.add_argument("--uncaptured-rounds", type=int, default=8, help="also time each compiled model called "
                   "without a CUDA graph, 4 calls in a row (a pipeline compiled with cuda_graphs=False), this many "
                   "rounds (0: not)")
    p.add_argument("--front-door-rounds", type=int, default=8, help="also time each compiled model under "
                   "fourbit.nn.graph_forward (compile_pipeline's default on CUDA), 4 calls in a row with the host's "
                   "work per call, this many rounds (0: not)")
    p.add_argument("--profile", action="store_true", help="also one compiled step of each variant under "
                   "torch.profiler: CUDA time by kernel kind (fourbit act_quant / GEMM / fold_lr, attention, cuBLAS, "
                   "elementwise)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds per model for building and compiling: a variant is skipped (recorded as such) when "
                        "the time spent plus the longest compile so far exceeds it, and the compiled ones are still "
                        "timed; the first always runs")
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in args.variants if v not in VARIANTS] + [m for m in args.models.split(",") if m not in FAMILIES]
    if bad:
        p.error(f"unknown model(s)/variant(s) {bad}; models: {', '.join(FAMILIES)}; variants: {', '.join(VARIANTS)}")
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    args.tiny = device == "cpu"
    meta = {**environment(), "git_commit": git_commit(), "command": "python " + " ".join(["benchmarks/models.py"]
                                                                                           + sys.argv[1:])}
    log = lambda s: print(s, flush=True)  # noqa: E731
    if device == "cuda":
        stop_on_sigterm()
    log(json.dumps(meta))
    rows = []
    for name in args.models.split(","):
        row = run_model(name, args, device, log)
        row["meta"] = meta
        rows.append(row)
        if not args.tiny:  # the smoke test writes nothing
            os.makedirs(args.out, exist_ok=True)
            path = os.path.join(args.out, "models.jsonl")
            with open(path, "a") as f:
                f.write(json.dumps({"benchmark": "models", "run": next_run(path, meta["date"]), **row}) + "\n")
    log(table(rows))
    return rows


if __name__ == "__main__":
    main()
