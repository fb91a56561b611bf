"""``fourbit demo``, ``compare``, ``quantize`` and ``train`` on the bundled models (fashion-dit, fashion-unet).

``compare``, ``demo`` and ``quantize`` also run under torchrun
(``python -m torch.distributed.run --nproc-per-node N -m fourbit compare ...``): see ``fourbit.distributed``.
"""
from __future__ import annotations

import argparse

from . import at_least_two, command, nonnegative_int, positive_int, resolve_device


def _model_name(text: str) -> str:
    from ..models import available_models

    if text not in available_models():
        raise argparse.ArgumentTypeError(f"unknown model {text!r}; bundled: {', '.join(available_models())}")
    return text


# ---- compare / demo ---------------------------------------------------------------------------
DEMO_VARIANTS = "fp16,rtn:w4a4,smoothquant:w4a4,svdquant:w4a4:r32,svdquant:w8a8:r16"


def _add_compare_args(p: argparse.ArgumentParser, demo: bool) -> None:
    if not demo:
        p.add_argument("--model", default="fashion-dit", type=_model_name,
                       help="bundled model (fashion-dit, fashion-unet)")
        p.add_argument("--variants", default="fp16,rtn:w4a4,svdquant:w4a4:r32",
                       help="comma-separated METHOD:wXaY[:rN] names, e.g. " + DEMO_VARIANTS)
    p.add_argument("--samples", type=at_least_two, default=20 if demo else None, help="samples per variant (default 64)")
    p.add_argument("--steps", type=positive_int, default=10 if demo else 20, help="sampling steps")
    p.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"])
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (model default)")
    p.add_argument("--seed", type=int, default=0, help="first evaluation seed")
    p.add_argument("--calib-samples", type=positive_int, default=10 if demo else None,
                   help="calibration trajectories (default 20)")
    p.add_argument("--calib-steps", type=positive_int, default=None, help="calibration steps (default: --steps)")
    p.add_argument("--data-samples", type=nonnegative_int, default=500 if demo else 1000,
                   help="Fashion-MNIST test images for FD vs data (0 to skip)")
    p.add_argument("--batch-size", type=positive_int, default=64,
                   help="images per batch; under torchrun the batches are spread over the processes, so use at "
                        "most samples / processes to keep every process busy")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available; under torchrun "
                                                  "cuda:LOCAL_RANK)")
    p.add_argument("--out", default="out/demo" if demo else "out/compare", help="output directory")
    if not demo:
        from .pipeline import add_compare_arguments

        add_compare_arguments(p)


def _run_compare(args, model: str, variants: str) -> int:
    from ..harness.compare import CompareSettings, run_compare
    from ..utils.files import check_output_dir

    if args.device is not None:
        resolve_device(args.device)  # a CUDA device without CUDA: said before any work
    check_output_dir(args.out)
    if getattr(args, "pipeline", None):
        from .pipeline import run_compare as run_pipeline_compare

        return run_pipeline_compare(args, variants)
    args.samples = 64 if args.samples is None else args.samples
    args.calib_samples = 20 if args.calib_samples is None else args.calib_samples
    settings = CompareSettings(
        model=model, variants=tuple(v for v in variants.split(",") if v.strip()), samples=args.samples,
        steps=args.steps, sampler=args.sampler, eta=args.eta, guidance_scale=args.guidance, seed=args.seed,
        calib_samples=args.calib_samples, calib_steps=args.calib_steps, data_samples=args.data_samples,
        batch_size=args.batch_size, device=args.device)
    return run_and_print(run_compare, settings, args)


def run_and_print(run, settings, args) -> int:
    """``run(settings, out, ranks)`` under the torchrun launcher (one process: plain); rank 0 prints the table."""
    from ..distributed import launch
    from ..harness.compare import format_table

    with launch(args.device) as ranks:
        report = run(settings, args.out, ranks)
    if report is None:  # not rank 0 under torchrun: rank 0 prints and writes
        return 0
    print(format_table(report))
    print(f"\nreport: {args.out}/report.json  {args.out}/report.html  grid: {args.out}/grid.png")
    return 0


@command("compare", "quantize a bundled model several ways and compare samples with the 16-bit model")
def _compare(p):
    _add_compare_args(p, demo=False)


_compare.run = lambda args: _run_compare(args, args.model, args.variants)


@command("demo", "the main job: compare fp16, RTN, SmoothQuant and SVDQuant W4A4/W8A8 on fashion-dit (CPU, minutes)")
def _demo(p):
    _add_compare_args(p, demo=True)


_demo.run = lambda args: _run_compare(args, "fashion-dit", DEMO_VARIANTS)


# ---- quantize -----------------------------------------------------------------------------------
@command("quantize", "quantize a bundled model or a diffusers pipeline's denoiser (--pipeline) and write a checkpoint")
def _quantize(p):
    from .pipeline import add_quantize_arguments

    p.add_argument("--model", default="fashion-dit", type=_model_name, help="bundled model (fashion-dit, fashion-unet)")
    p.add_argument("--variant", default="svdquant:w4a4:r32", help="METHOD:wXaY[:rN][:key=value], as in compare")
    p.add_argument("--calib-samples", type=positive_int, default=None, help="calibration trajectories (classes spread "
                   "evenly; default 20)")
    p.add_argument("--calib-steps", type=positive_int, default=None, help="sampler steps per calibration trajectory (default 20)")
    p.add_argument("--seed", type=int, default=10_000, help="first calibration seed")
    p.add_argument("--batch-size", type=positive_int, default=64, help="calibration trajectories per batch (under torchrun "
                   "the batches are spread over the processes; the checkpoint is the same for any number of them)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--out", required=True, help="checkpoint path (.safetensors), written atomically")
    add_quantize_arguments(p)


def _run_quantize(args) -> int:
    import torch

    if args.device is not None:
        resolve_device(args.device)  # a CUDA device without CUDA: said before any work
    if args.pipeline:
        from .pipeline import run_quantize

        return run_quantize(args)

    from ..api import quantize
    from ..checkpoint import save
    from ..distributed import launch
    from ..harness.sharded import sharded_calibration_loop
    from ..harness.variants import parse_variant
    from ..calibration import select_targets
    from ..models import get_spec, load_pretrained
    from ..utils.files import check_output_file

    variant = parse_variant(args.variant)
    if variant.is_baseline or variant.posts:
        raise ValueError(f"{args.variant!r}: give a quantization variant without +suffixes (e.g. svdquant:w4a4:r32)")
    spec = get_spec(args.model)
    cfg = variant.config(exclude=spec.quant_exclude, policies=spec.quant_policies)
    check_output_file(args.out)  # before the work, not after it
    with launch(args.device) as ranks:
        device = ranks.device if ranks.world_size > 1 else (args.device or ("cuda" if torch.cuda.is_available()
                                                                             else "cpu"))
        model = load_pretrained(args.model, device=device)
        select_targets(model, cfg)  # the config against this model's layers, before calibration
        loop = sharded_calibration_loop(ranks, args.calib_samples or 20, args.calib_steps or 20, seed=args.seed,
                                        guidance_scale=spec.default_guidance_scale, num_classes=spec.num_classes,
                                        batch_size=args.batch_size)
        quantize(model, cfg, forward_loop=loop, collective=ranks, progress=ranks.is_root, verbose=ranks.is_root)
        ranks.barrier("the end of quantization")  # also for methods without calibration data (no collective)
        if not ranks.is_root:  # every rank holds the same quantized model; rank 0 writes it
            return 0
        path = save(model, args.out, extra={"model": args.model, "variant": variant.name})
    print(f"wrote {path} ({path.stat().st_size / 2**20:.2f} MiB); load it with "
          f"fourbit.load(fourbit.models.build_model({args.model!r}, device='meta'), {str(path)!r})")
    return 0


_quantize.run = _run_quantize


# ---- train --------------------------------------------------------------------------------------
@command("train", "train a bundled model from scratch (GPU recommended); see docs/models.md")
def _train(p):
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of python -m fourbit.training.train "
                   "(--model NAME --minutes M --out DIR ...)")


_train.run = lambda args: 0  # main() hands `fourbit train ...` to the trainer's own parser
