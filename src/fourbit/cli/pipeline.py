"""Any diffusers pipeline from the command line: ``fourbit quantize --pipeline`` (resumable), ``fourbit generate``
and ``fourbit compare --pipeline``. The ``--pipeline`` options of quantize and compare are added to those commands
(``cli/bundled.py``) by ``add_quantize_arguments``/``add_compare_arguments`` and run here.

``quantize --pipeline`` and ``compare --pipeline`` also run under torchrun (``python -m torch.distributed.run
--nproc-per-node N -m fourbit ...``): the prompts are spread over the processes and rank 0 writes."""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from . import command

DTYPES = ("float32", "float16", "bfloat16")


def _device(args) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _call_kwargs(args) -> dict:
    return {k: v for k, v in (("height", args.height), ("width", args.width)) if v is not None}


def _add_common(g) -> None:
    g.add_argument("--component", default=None, help="the denoiser's component name (default: transformer or unet)")
    g.add_argument("--dtype", default=None, choices=DTYPES, help="load the pipeline in this dtype")
    g.add_argument("--height", type=int, default=None, help="image height (default: the pipeline's)")
    g.add_argument("--width", type=int, default=None, help="image width (default: the pipeline's)")
    g.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the pipeline's)")


# ---- quantize --pipeline --------------------------------------------------------------------------
def add_quantize_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("a diffusers pipeline instead of a bundled model")
    g.add_argument("--pipeline", default=None, help="diffusers pipeline folder; --out is then a folder for "
                   "fourbit.from_pretrained, and --calib-samples/--calib-steps count prompts/steps (default 32/4)")
    g.add_argument("--prompts", default=None, help="calibration prompt file, one per line (default: bundled prompts)")
    g.add_argument("--preset", default=None, help="layer preset (default: by the denoiser's class; 'none' for none)")
    g.add_argument("--convert-device", default=None, help="convert layers there (e.g. cuda), model stays on --device")
    g.add_argument("--work", default=None, help="work folder for a resumable run (default: OUT.work); converted "
                   "layers are saved there as they finish and a rerun continues; removed once OUT is written "
                   "(one process only: under torchrun the run is not resumable)")
    g.add_argument("--max-shard-size", default="5GB", help="shard the checkpoint above this size")
    g.add_argument("--speed-plan", action="store_true", help="first time every layer on this GPU at the rows of one "
                   "pipeline call at --height/--width (bf16 vs the variant, its GEMM on Triton and on cuBLAS) and keep "
                   "16-bit the layers that are not faster in low precision (fourbit.plan_pipeline); the others get the "
                   "faster kernel ('triton' or 'triton-cublas'); the plan is printed and written to "
                   "OUT/fourbit_plan.json")
    g.add_argument("--min-speedup", type=float, default=1.0, help="with --speed-plan: keep a layer in low precision "
                   "only if it is at least this many times faster than bf16 (default 1.0)")
    g.add_argument("--fallback", action="append", default=[], metavar="FIELD=VALUE,...",
                   help="with --speed-plan: a precision to try where the variant does not pay, as config field "
                   "changes, e.g. weights=fp8,activations=fp8,rank=0 (FP8 W8A8 without the low-rank branch); "
                   "repeat for more, tried in order before 16 bits")
    g.add_argument("--prefer-fastest", action="store_true", help="with --speed-plan: keep per layer the fastest "
                   "precision that pays, not the first (e.g. an fp8 --fallback over a slower 4-bit layer)")
    g.add_argument("--fuse-siblings", action="store_true", help="fuse the layers that read one input (Q/K/V) into "
                   "one wider layer first: one activation quantization and one GEMM (the checkpoint records the "
                   "groups; from_pretrained fuses the same way)")
    g.add_argument("--plan", default=None, help="use a saved plan (OUT/fourbit_plan.json of an earlier run, or "
                   "PrecisionPlan.save) instead of timing; its variant must be --variant")
    _add_common(g)


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def run_quantize(args) -> int:
    from ..distributed import launch
    from ..harness.variants import parse_variant
    from ..pipelines import quantize_pipeline, save_pretrained
    from ..pipelines.calibrate import bundled_prompts, read_prompts
    from ..pipelines.pretrained import load_pipeline

    variant = parse_variant(args.variant)
    if variant.is_baseline or variant.posts:
        raise ValueError(f"{args.variant!r}: give a quantization variant without +suffixes (e.g. svdquant:w4a4:r32)")
    config = variant.config()
    plan = None
    if args.speed_plan and args.plan:
        raise ValueError("give --speed-plan (time the layers now) or --plan FILE (a saved plan), not both")
    if args.plan:
        plan = _saved_plan(args.plan, config)
        config = plan.config
    if not args.min_speedup > 0:
        raise ValueError(f"--min-speedup must be > 0 (1.0: at least as fast as bf16), got {args.min_speedup}")
    if args.min_speedup != 1.0 and not args.speed_plan:
        raise ValueError("--min-speedup applies to --speed-plan only")
    if args.fallback and not args.speed_plan:
        raise ValueError("--fallback applies to --speed-plan only")
    if args.prefer_fastest and not args.speed_plan:
        raise ValueError("--prefer-fastest applies to --speed-plan only")
    fallbacks = [parse_fallback(text, config) for text in args.fallback]
    if args.speed_plan and not _device(args).startswith("cuda"):
        raise ValueError("--speed-plan times the GPU kernels against bf16: run it with a CUDA device (--device cuda)")
    prompts = read_prompts(args.prompts) if args.prompts else bundled_prompts()
    prompts = prompts[:args.calib_samples or 32]
    out = Path(args.out)
    several = _world_size() > 1
    if several and args.work:
        raise ValueError("--work makes a run resumable in one process only; drop --work under torchrun, or run "
                         "the resumable quantization without torchrun")
    # under torchrun no work folder: resuming would need every rank to reload the same state (not done yet)
    work = None if several else Path(args.work) if args.work else out.with_name(out.name + ".work")
    with launch(args.device) as ranks:
        device = ranks.device if several else _device(args)
        pipe = load_pipeline(args.pipeline, args.dtype, device)
        if args.speed_plan:
            from ..pipelines import plan_pipeline

            plan = shared_plan(ranks, lambda: plan_pipeline(
                pipe, config, prompts[0], guidance_scale=args.guidance, component=args.component, preset=args.preset,
                call_kwargs=_call_kwargs(args), kernels=("triton", "triton-cublas"), progress=True, verbose=True,
                siblings=args.fuse_siblings, min_speedup=args.min_speedup, fallbacks=fallbacks,
                prefer="fastest" if args.prefer_fastest else "first"))
            config = plan.config
        elif plan is not None:
            _check_plan_layers(pipe, plan, config, prompts, args)
        quantize_pipeline(pipe, config, prompts, num_inference_steps=args.calib_steps or 4,
                          guidance_scale=args.guidance, component=args.component, preset=args.preset, seed=args.seed,
                          call_kwargs=_call_kwargs(args), convert_device=args.convert_device, work_dir=work,
                          collective=ranks, siblings=args.fuse_siblings)
        ranks.barrier("the end of quantization")  # also for methods without calibration data (no collective)
        if not ranks.is_root:  # every rank holds the same quantized denoiser; rank 0 writes it
            return 0
        from ..pipelines.calibrate import find_denoiser

        name, model = find_denoiser(pipe, args.component)
        extra = {"variant": variant.name, "pipeline_path": str(args.pipeline)}
        if plan is not None:
            extra["precision_plan"] = {"counts": plan.counts(), "environment": plan.environment,
                                       "min_speedup": plan.min_speedup}
        save_pretrained(model, out, max_shard_size=args.max_shard_size, extra=extra)
        if plan is not None:
            plan.save(out / PLAN_FILE)
    if work is not None:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {out}; use it with: fourbit generate --pipeline {args.pipeline} --quantized {out} --prompt ... "
          f"(Python: fourbit.from_pretrained({str(out)!r}) as the pipeline's {name})")
    return 0


PLAN_FILE = "fourbit_plan.json"


def shared_plan(ranks, make_plan):
    """Rank 0's precision plan on every rank: timings differ from GPU to GPU, and ranks that quantized with
    different plans would disagree on which layers they calibrate. Rank 0 plans (``make_plan()``) while the others
    wait; they fuse siblings, if asked, in ``quantize_pipeline``."""
    from ..precision_plan import PrecisionPlan

    plan = make_plan() if ranks.is_root else None
    if ranks.world_size == 1:
        return plan
    sent = ranks.gather(plan.to_dict() if ranks.is_root else None, "sharing rank 0's precision plan")[0]
    return plan if ranks.is_root else PrecisionPlan.from_dict(sent)


def parse_fallback(text: str, config) -> dict:
    """'weights=fp8,activations=fp8,rank=0' -> {"weights": "fp8", "activations": "fp8", "rank": 0}, refused unless
    it names fields of ``config`` with values it accepts (numbers become int / float; true, false, none)."""
    import dataclasses

    changes = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        field, sep, value = part.partition("=")
        if not sep or not field.strip() or not value.strip():
            raise ValueError(f"--fallback {text!r}: give FIELD=VALUE pairs separated by commas, e.g. "
                             f"weights=fp8,activations=fp8,rank=0")
        changes[field.strip()] = _value(value.strip())
    if not changes:
        raise ValueError("--fallback needs FIELD=VALUE pairs, e.g. weights=fp8,activations=fp8,rank=0")
    names = {f.name for f in dataclasses.fields(config)} - {"include", "exclude", "overrides", "kernel"}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise ValueError(f"--fallback {text!r}: {', '.join(unknown)} is not a field of the variant's config "
                         f"({type(config).__name__}: {', '.join(sorted(names))})")
    dataclasses.replace(config, **changes)  # a value the config refuses fails here, with its message
    return changes


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def _saved_plan(path, config):
    """The plan at ``path``, refused unless it was made for ``config`` (same method and formats)."""
    from ..precision_plan import PrecisionPlan

    plan = PrecisionPlan.load(path)
    ignore = ("overrides", "exclude", "include", "kernel")
    mine = {k: v for k, v in config.to_dict().items() if k not in ignore}
    theirs = {k: v for k, v in plan.config.to_dict().items() if k not in ignore}
    if mine != theirs:
        keys = [k for k in sorted(set(mine) | set(theirs), key=lambda k: (k not in ("method", "weights",
                                                                                   "activations"), k))
                if mine.get(k) != theirs.get(k)]
        diff = ", ".join(f"{k}: plan {theirs.get(k)!r} vs --variant {mine.get(k)!r}" for k in keys[:3])
        raise ValueError(f"{path}: this plan was made for another quantization ({diff}"
                         f"{', ...' if len(keys) > 3 else ''}); plan again with --speed-plan or pass the --variant "
                         f"it was made for")
    return plan


def _check_plan_layers(pipe, plan, config, prompts, args) -> None:
    """Refuse a saved plan whose layers this denoiser lacks (a plan made with --fuse-siblings used without it, or
    the reverse): its overrides would match nothing and the layers it keeps 16-bit would be quantized."""
    from ..pipelines.calibrate import find_denoiser, fuse_pipeline_siblings

    if args.fuse_siblings:
        fuse_pipeline_siblings(pipe, config, prompts[0], component=args.component, guidance_scale=args.guidance,
                               call_kwargs=_call_kwargs(args), seed=args.seed)
    from torch import nn

    _, model = find_denoiser(pipe, args.component)
    names = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}  # what can be quantized
    missing = [lp.name for lp in plan.layers if lp.name not in names]
    if missing:
        hint = ("without --fuse-siblings" if any(n.endswith(".group.linear") for n in missing) and not args.fuse_siblings
                else "with --fuse-siblings" if args.fuse_siblings else "for another model")
        raise ValueError(f"{args.plan}: the plan names {len(missing)} layer(s) this denoiser does not have as linears (e.g. "
                         f"{missing[0]}); run --plan {hint}, or plan again with --speed-plan")


# ---- compare --pipeline ---------------------------------------------------------------------------
def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("a diffusers pipeline instead of a bundled model (prompts instead of classes)")
    g.add_argument("--pipeline", default=None, help="diffusers pipeline folder; --samples counts evaluation prompts "
                   "(default 8) and --calib-samples calibration prompts (default 16)")
    g.add_argument("--prompts", default=None, help="evaluation prompt file, one per line (default: bundled prompts)")
    g.add_argument("--component", default=None, help="the denoiser's component name (default: transformer or unet)")
    g.add_argument("--dtype", default=None, choices=DTYPES, help="load the pipeline in this dtype")
    g.add_argument("--height", type=int, default=None, help="image height (default: the pipeline's)")
    g.add_argument("--width", type=int, default=None, help="image width (default: the pipeline's)")


def run_compare(args, variants: str) -> int:
    from .bundled import run_and_print
    from ..harness.pipeline_compare import PipelineCompareSettings, run_pipeline_compare

    settings = PipelineCompareSettings(
        pipeline=args.pipeline, variants=tuple(v for v in variants.split(",") if v.strip()), prompts=args.prompts,
        samples=args.samples if args.samples is not None else 8, steps=args.steps, guidance_scale=args.guidance,
        seed=args.seed, calib_samples=args.calib_samples if args.calib_samples is not None else 16,
        calib_steps=args.calib_steps or 4, height=args.height, width=args.width, dtype=args.dtype,
        component=args.component, device=args.device)
    return run_and_print(run_pipeline_compare, settings, args)


# ---- generate -------------------------------------------------------------------------------------
@command("generate", "make an image with a diffusers pipeline, its denoiser loaded from a fourbit folder")
def _generate(p):
    p.add_argument("--pipeline", required=True, help="diffusers pipeline folder (the 16-bit base)")
    p.add_argument("--quantized", default=None, help="folder written by `fourbit quantize --pipeline` "
                   "(omit to generate with the 16-bit denoiser)")
    p.add_argument("--prompt", required=True, help="text prompt")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (CPU generator)")
    p.add_argument("--steps", type=int, default=None, help="inference steps (default: the pipeline's)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--out", required=True, help="image file (.png)")
    p.add_argument("--compile", action="store_true", help="first put the denoiser on its fast path "
                   "(fourbit.compile_pipeline: GPU kernels on an H100/H200, repeated blocks compiled with the fusion "
                   "pass, one warm-up call); the compile time and the image's time are printed")
    p.add_argument("--repeat", type=int, default=1, help="make the image this many times (same seed) and print the "
                   "median time, e.g. to compare the 16-bit and the quantized pipeline (default 1)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="with --compile: call the compiled denoiser "
                   "plainly instead of replaying each call from a CUDA graph (the default on CUDA: "
                   "fourbit.nn.graph_forward)")
    _add_common(p)


def _run_generate(args) -> int:
    import torch

    from ..pipelines import from_pretrained
    from ..pipelines.pretrained import load_pipeline, read_folder_header

    if args.no_cuda_graphs and not args.compile:
        raise ValueError("--no-cuda-graphs is about the compiled denoiser: add --compile")
    if args.repeat < 1:
        raise ValueError(f"--repeat must be at least 1, got {args.repeat}")
    device = _device(args)
    components = {}
    if args.quantized:
        name = args.component or read_folder_header(args.quantized).get("extra", {}).get("pipeline", {}).get(
            "component")
        if not name:
            raise ValueError(f"{args.quantized}: the folder does not say which component it is; pass --component")
        components[name] = from_pretrained(args.quantized, device=device)
    pipe = load_pipeline(args.pipeline, args.dtype, device, **components)
    kw = {**_call_kwargs(args), "prompt": args.prompt}
    for key, value in (("negative_prompt", args.negative_prompt), ("num_inference_steps", args.steps),
                       ("guidance_scale", args.guidance)):
        if value is not None:
            kw[key] = value
    if args.compile:
        from ..pipelines import compile_pipeline

        compile_pipeline(pipe, args.prompt, call_kwargs=_call_kwargs(args), guidance_scale=args.guidance,
                         component=args.component, cuda_graphs=False if args.no_cuda_graphs else "auto")

    times = []
    for _ in range(args.repeat):  # the same seed each time: the same image
        t0 = time.perf_counter()
        image = pipe(**kw, generator=torch.Generator().manual_seed(args.seed)).images[0]  # a PIL image: synchronised
        times.append(time.perf_counter() - t0)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out)
    took = f"{times[0]:.2f} s" if len(times) == 1 else (
        f"median {statistics.median(times):.2f} s of {len(times)} (min {min(times):.2f}, max {max(times):.2f})")
    print(f"wrote {args.out} ({image.size[0]}x{image.size[1]}, seed {args.seed}"
          f"{', denoiser from ' + args.quantized if args.quantized else ', 16-bit'}"
          f"{', compiled' if args.compile else ''}; {took})", file=sys.stderr)
    return 0


_generate.run = _run_generate
