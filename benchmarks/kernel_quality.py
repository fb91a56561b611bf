"""Do the GPU kernels change the images? One quantized model, sampled through each kernel with the same seeds.

    python benchmarks/kernel_quality.py                             # on a CUDA GPU; ~2 min on an H100

For each bundled model: quantize once (SVDQuant W4A4 r32, the Hopper-native int4p2 format, calibrated on the
model's own trajectories through the plain-torch reference), then sample the same classes and seeds with kernel
"reference" (the emulation every quality number in the README was measured with), "triton" (speed mode: FP8 GEMMs
whose tensor cores accumulate with reduced precision), the same with the accumulator promoted to fp32,
"triton-memory", "triton" with the cuBLAS GEMM backend (branch folded into K), "triton" with the model under
``torch.compile`` and the fusion pass (GELU in the GEMM epilogue), also with the activation quantization generated
inside X's producer (``act_quant="inline"``), the quantized model cast to bf16 through the reference and through
"triton" (its GEMMs' low-rank branch then in 16 bits); and, as a control, the reference with its fp32 GEMMs in TF32
(a perturbation of the same size). Reports each against the reference kernel's images (LPIPS-Alex, PSNR) and against
the 16-bit model's.
Appends a row to benchmarks/results/kernel_quality.jsonl.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import environment, finish, md_table  # noqa: E402


def _sample_all(model, spec, args, classes, seeds):
    from fourbit.sampling import sample

    _sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        imgs = sample(model, classes, seeds, steps=args.steps, sampler="ddim", eta=0.0,
                      guidance_scale=spec.default_guidance_scale, batch_size=args.batch_size, progress=False)
    _sync()
    return imgs, time.perf_counter() - t0


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextlib.contextmanager
def _tf32_matmuls():
    """The reference's fp32 GEMMs in TF32 (10-bit mantissa inputs): a perturbation of the same size as the FP8
    accumulator's, to show how far sampling alone carries such a difference."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _precise_fp8_gemm():
    """The Triton GEMM with its FP8 accumulator promoted to fp32 every K tile (``GemmConfig(precise=True)``)."""
    from fourbit.kernels import gemm

    return gemm.default_configs(torch.float8_e4m3fn, lambda cfg: dataclasses.replace(cfg, precise=True))


@contextlib.contextmanager
def _cublas_gemms():
    """FP8-operand layers' GEMMs through cuBLAS (``set_gemm_backend("cublas")``), the branch folded into K, at every
    row count (``min_rows=0``, so the bundled models' small batches take it too)."""
    from fourbit.nn import set_gemm_backend

    set_gemm_backend("cublas", min_rows=0)
    try:
        yield
    finally:
        set_gemm_backend("triton")


#: (label, kernel, compiled with the fusion pass: None, its act_quant mode, or "front door": ``compile_model``'s
#: repeated blocks + fusion pass on a copy of the model, each call replayed from a CUDA graph, or "bf16": a copy of
#: the quantized model cast to bf16, eager (its layers' up-projection is then 16-bit: the GEMM's 16-bit branch);
#: setting while sampling)
VARIANTS = [("reference", "reference", None, contextlib.nullcontext),
            ("reference, TF32 matmuls (control)", "reference", None, _tf32_matmuls),
            ("triton", "triton", None, contextlib.nullcontext),
            ("triton, FP8 accumulator promoted", "triton", None, _precise_fp8_gemm),
            ("triton-memory", "triton-memory", None, contextlib.nullcontext),
            ("triton, cuBLAS GEMM backend (every row count)", "triton", None, _cublas_gemms),
            ("triton, compiled + fusion pass", "triton", "pass", contextlib.nullcontext),
            ("triton, compiled + inline quantization", "triton", "inline", contextlib.nullcontext),
            ("triton, front door: compile_model + CUDA graphs", "triton", "front door", contextlib.nullcontext),
            ("reference, model in bf16", "reference", "bf16", contextlib.nullcontext),
            ("triton, model in bf16 (the branch in 16 bits)", "triton", "bf16", contextlib.nullcontext)]


def run_model(name: str, args, log) -> dict:
    import copy

    import torch._dynamo

    import fourbit
    from fourbit.eval import compare_images
    from fourbit.harness.variants import parse_variant
    from fourbit.models import get_spec, load_pretrained
    from fourbit.nn import compile_model, inductor_options, prepare_kernels, set_kernel
    from fourbit.sampling import calibration_forward_loop, sample_plan

    spec = get_spec(name)
    fp = load_pretrained(name, device=args.device).eval()
    classes, seeds = sample_plan(args.samples, 0, spec.num_classes)
    fp_imgs, _ = _sample_all(fp, spec, args, classes, seeds)
    model = copy.deepcopy(fp)
    cfg = parse_variant("svdquant:w4a4:r32:fmt=int4p2").config(exclude=spec.quant_exclude,
                                                               policies=spec.quant_policies)  # kernel "reference"
    loop = calibration_forward_loop(args.calib_samples, args.steps, guidance_scale=spec.default_guidance_scale,
                                    seed=10_000, num_classes=spec.num_classes, batch_size=args.batch_size)
    fourbit.quantize(model, cfg, forward_loop=loop, progress=False, verbose=False)
    out = {"model": name, "samples": args.samples, "steps": args.steps, "variants": {}}
    images = {}
    for label, kernel, compiled, setting in VARIANTS:
        if label != "reference" and args.variants and not any(v in label for v in args.variants.split(",")):
            continue
        set_kernel(model, kernel)
        run = model
        try:
            if compiled == "bf16":  # the copy keeps the kernel set above; its layers' cached state follows the cast
                run = copy.deepcopy(model).to(torch.bfloat16)
            elif compiled == "front door":  # what compile_pipeline does (CUDA graphs on CUDA), on a copy
                torch._dynamo.reset()
                run = copy.deepcopy(model)
                compile_model(run, kernel=None)
            elif compiled:
                prepare_kernels(model)
                torch._dynamo.reset()
                run = torch.compile(model, options=inductor_options(act_quant=compiled))
            with setting():
                imgs, secs = _sample_all(run, spec, args, classes, seeds)
        except Exception as e:  # one failing variant must not lose the others
            log(f"{name} {label}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            out["variants"][label] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            continue
        images[label] = imgs
        out["variants"][label] = {"sampling_seconds": secs}
        log(f"{name} {label}: sampled in {secs:.1f}s")
    torch._dynamo.reset()
    ref = images["reference"]
    for label, imgs in images.items():
        row = out["variants"][label]
        for against, base in (("reference_kernel", ref), ("fp16", fp_imgs)):
            m = compare_images(imgs, base, None, n_boot=200, fd_n_boot=0, seed=0, device=args.device)
            row[f"lpips_vs_{against}"], row[f"psnr_vs_{against}"] = m["lpips"], m["psnr"]
        row["max_abs_pixel_diff_vs_reference_kernel"] = float((imgs.float() - ref.float()).abs().max())
        same = images.get("reference, model in bf16")
        if "model in bf16" in label and same is not None and label != "reference, model in bf16":
            m = compare_images(imgs, same, None, n_boot=200, fd_n_boot=0, seed=0, device=args.device)
            row["lpips_vs_reference_kernel_bf16"] = m["lpips"]  # the same bf16 model through the reference
            log(f"{name} {label}: LPIPS vs the reference kernel on the bf16 model {m['lpips']['mean']:.4f}")
        log(f"{name} {label}: LPIPS vs reference kernel {row['lpips_vs_reference_kernel']['mean']:.4f}, "
            f"vs fp16 {row['lpips_vs_fp16']['mean']:.4f}")
    return out


def _ci(m, nd=4) -> str:
    if not m or m.get("mean") is None:
        return "-"
    return f"{m['mean']:.{nd}f} [{m['lo']:.{nd}f}, {m['hi']:.{nd}f}]"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="fashion-dit,fashion-unet")
    p.add_argument("--variants", default=None, help="comma list of label parts, e.g. 'inline,fusion' (the reference "
                   "kernel always runs): only the variants whose label contains one")
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cuda", help="cuda; cpu only checks the script (the Triton kernels fail)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("kernel_quality.py needs a CUDA GPU (the Triton kernels); --device cpu checks the script", file=sys.stderr)
        return 2
    env = environment()
    log = lambda s: print(s, flush=True)  # noqa: E731
    res = {"models": [run_model(n, args, log) for n in args.models.split(",")]}
    md = []
    for r in res["models"]:
        rows = [[label, _ci(v.get("lpips_vs_reference_kernel")), _ci(v.get("psnr_vs_reference_kernel"), 2),
                 f"{v['max_abs_pixel_diff_vs_reference_kernel']:.3f}" if "max_abs_pixel_diff_vs_reference_kernel" in v
                 else v.get("error", "-"), _ci(v.get("lpips_vs_fp16")), _ci(v.get("psnr_vs_fp16"), 2)]
                for label, v in r["variants"].items()]
        md.append(f"### {r['model']}: SVDQuant W4A4 r32 int4p2, {r['samples']} samples (seeds 0..{r['samples'] - 1}, "
                  f"class = i mod 10), DDIM {r['steps']} steps\n\n"
                  + md_table(["kernel", "LPIPS vs reference kernel", "PSNR vs reference kernel (dB)",
                              "max |pixel diff|", "LPIPS vs fp16", "PSNR vs fp16 (dB)"], rows))
    text = ("Same quantized model sampled through each kernel; LPIPS-Alex and PSNR with 95% bootstrap intervals "
            "(200 resamples).\n\n" + "\n\n".join(md))
    return finish(args.out, "kernel-quality", env, res, text, log)


if __name__ == "__main__":
    sys.exit(main())
