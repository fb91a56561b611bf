"""``plan_pipeline``: ``fourbit.plan_precision`` for a diffusers pipeline's denoiser, at the shapes the pipeline
calls it with (one pipeline call of ``num_inference_steps`` steps at ``call_kwargs``' resolution)::

    plan = fourbit.pipelines.plan_pipeline(pipe, cfg, call_kwargs=dict(height=1024, width=1024),
                                           kernels=("triton", "triton-cublas"))
    fourbit.quantize_pipeline(pipe, plan.config, prompts)   # the layers not faster in 4 bits stay 16-bit
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from ..config import QuantConfig
from ..precision_plan import PrecisionPlan, plan_precision
from .calibrate import Prompt, bundled_prompts, find_denoiser, fuse_pipeline_siblings, pipeline_forward_loop
from .presets import apply_preset, find_preset


def plan_pipeline(pipe, config: QuantConfig, prompt: Optional[Prompt] = None, *, num_inference_steps: int = 1,
                  guidance_scale: Optional[float] = None, call_kwargs: Optional[dict] = None,
                  component: Optional[str] = None, preset: Optional[str] = None, kernel: Optional[str] = None,
                  kernels: Sequence[str] = (), fallbacks: Sequence[dict] = (), min_speedup: float = 1.0, seed: int = 0, progress: bool = True,
                  verbose: bool = True, timer=None, siblings: bool = False, prefer: str = "first") -> PrecisionPlan:
    """Plan which of the denoiser's layers to quantize by timing them on this GPU (``fourbit.plan_precision``).

    The config is merged with the family preset as ``quantize_pipeline`` merges it (``preset``), so the plan
    covers the layers that will be quantized; ``plan.config`` carries the preset and the plan's per-layer
    overrides and can be given to ``quantize_pipeline`` as it is. prompt: a string or a dict of pipeline
    arguments (default: the first bundled prompt); call_kwargs: e.g. ``height``/``width`` of the images you will
    generate (the rows of every layer follow the resolution and the batch). kernel, kernels, fallbacks, min_speedup,
    timer, prefer: as for ``plan_precision``. siblings: fuse the sibling linears first, in place (``fuse_pipeline_siblings``; then
    plan and quantize see the fused layers: Q/K/V timed as one wider GEMM)."""
    name, model = find_denoiser(pipe, component)
    full = apply_preset(config, find_preset(model, preset))
    if siblings:
        fuse_pipeline_siblings(pipe, full, prompt, component=name, guidance_scale=guidance_scale,
                               call_kwargs=call_kwargs, seed=seed,
                               say=(lambda msg: print(f"fourbit: {msg}", file=sys.stderr)) if verbose else None)
    loop = pipeline_forward_loop(pipe, [bundled_prompts(1)[0] if prompt is None else prompt],
                                 num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=seed,
                                 call_kwargs=call_kwargs, progress=False)
    plan = plan_precision(model, full, loop, fallbacks=fallbacks, min_speedup=min_speedup, kernel=kernel,
                          kernels=kernels, progress=progress, timer=timer, prefer=prefer)
    if verbose:
        print(f"fourbit: {name} ({type(model).__name__})\n{plan.summary()}", file=sys.stderr)
    return plan
