"""Any diffusers pipeline, end to end: calibrate from the pipeline, save and reload the diffusers way.

    pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", torch_dtype=torch.bfloat16).to("cuda")
    fourbit.quantize_pipeline(pipe, fourbit.SVDQuantConfig(rank=32), prompts=fourbit.pipelines.bundled_prompts(64))
    fourbit.save_pretrained(pipe.transformer, "flux-svdq-w4a4/transformer")
    transformer = fourbit.from_pretrained("flux-svdq-w4a4/transformer", device="cuda")

Modules: ``presets`` (the per-family layer table), ``calibrate`` (``quantize_pipeline``), ``pretrained``
(``save_pretrained``/``from_pretrained``, sharded folders), ``plan`` (``plan_pipeline``: which layers pay in 4 bits on this GPU), ``compile`` (``compile_pipeline``: the
denoiser on GPU kernels, its blocks compiled with the fusion pass), ``compat`` (what diffusers users call next on a
quantized component), ``resume`` (the work folder that makes a long run resumable). diffusers itself is imported
only where a class must be found by name (``from_pretrained``).
"""
from .calibrate import (bundled_prompts, find_denoiser, fuse_pipeline_siblings, pipeline_forward_loop,
                        quantize_pipeline)
from .compile import compile_pipeline
from .plan import plan_pipeline
from .presets import GENERIC, PRESETS, Preset, apply_preset, find_preset
from .pretrained import from_pretrained, save_pretrained

__all__ = ["quantize_pipeline", "plan_pipeline", "compile_pipeline", "save_pretrained", "from_pretrained", "bundled_prompts", "find_denoiser",
           "pipeline_forward_loop", "fuse_pipeline_siblings", "Preset", "PRESETS", "GENERIC", "find_preset", "apply_preset"]
