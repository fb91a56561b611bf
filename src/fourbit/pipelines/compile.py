"""``compile_pipeline``: a pipeline's (quantized) denoiser on its fast path in one call::

    fourbit.quantize_pipeline(pipe, cfg, prompts)        # or: transformer = fourbit.from_pretrained(...)
    fourbit.compile_pipeline(pipe, call_kwargs=dict(height=1024, width=1024))
    image = pipe("a lighthouse at dawn").images[0]     # GPU kernels, compiled blocks, fusion pass

What it does and why: ``fourbit.nn.compile_model``. The same call on an unquantized pipeline compiles it the same
way: the 16-bit baseline to compare against.
"""
from __future__ import annotations

import sys
import time
from typing import Optional, Sequence, Union

from ..nn.compiling import CompileReport, compile_model
from .calibrate import Prompt, bundled_prompts, find_denoiser, pipeline_forward_loop


def compile_pipeline(pipe, prompt: Optional[Prompt] = None, *, call_kwargs: Optional[dict] = None,
                     guidance_scale: Optional[float] = None, component: Optional[str] = None,
                     kernel: Optional[str] = "auto", blocks: Optional[Sequence[str]] = None, fusion: bool = True,
                     cuda_graphs: Union[bool, str] = "auto", warmup: bool = True, seed: int = 0, verbose: bool = True,
                     **compile_kwargs) -> CompileReport:
    """Compile ``pipe``'s denoiser for speed, in place; returns what was done (``CompileReport``).

    kernel: "auto" moves layers on the plain-torch "reference" kernel to the GPU kernels on an H100/H200 (a plan's
    per-layer choices stay), a name sets every quantized layer, None leaves them. One pipeline call of one step with
    ``prompt`` (a string or a dict of pipeline arguments; default: the first bundled prompt) at ``call_kwargs``
    (``height``, ``width``: the resolution you will generate at) records the rows each layer sees; with ``warmup`` a
    second such call compiles the graphs now (``report.seconds``) instead of inside your first image. blocks: the
    block classes to compile (default: ``fourbit.nn.repeated_blocks``); ``compile_kwargs`` go to ``torch.compile``.
    cuda_graphs: replay each denoiser call from a CUDA graph (``fourbit.nn.graph_forward``: one capture per
    input signature, at the warm-up), so the host launches one graph per step instead of every kernel. "auto" (the
    default): where the denoiser is on CUDA. Without them a quantized step is host-bound (H200, 2026-12-05, FLUX.1:
    W4A4 1.29x bf16 with graphs, 0.81x without; smaller models 0.4-0.5x without); False keeps plain calls.
    A LoRA added later (``fourbit.lora``) is used from the next call: dynamo recompiles where the branch's shape
    changed, and the CUDA graphs are dropped and captured again."""
    name, model = find_denoiser(pipe, component)
    loop = pipeline_forward_loop(pipe, [bundled_prompts(1)[0] if prompt is None else prompt], num_inference_steps=1,
                                 guidance_scale=guidance_scale, seed=seed, call_kwargs=call_kwargs, progress=False)
    report = compile_model(model, loop, kernel=kernel, blocks=blocks, fusion=fusion, cuda_graphs=cuda_graphs,
                           **compile_kwargs)
    if warmup:
        if verbose:
            print(f"fourbit: {name}: warm-up call (compiling {report.compiled} modules"
                  f"{' and capturing a CUDA graph' if report.cuda_graphs else ''}; minutes for a large model)...",
                  file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        loop(model)
        report.seconds = time.perf_counter() - t0
    if verbose:
        print(f"fourbit: {name} ({type(model).__name__}): {report.summary()}", file=sys.stderr)
    return report
