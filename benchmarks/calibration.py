"""Calibration at full scale: ``fourbit.quantize_pipeline`` on full-size FLUX.1-dev, SD3-medium and the SDXL UNet.

Each denoiser is built from its published config with random weights (bf16, on the GPU), placed in its real
diffusers pipeline (no text encoders: synthetic text embeddings of the real shapes; a stand-in VAE that is never
run), and quantized with SVDQuant W4A4 r32 calibrated on N prompts x S steps at the given resolution. One row per
model goes to ``benchmarks/results/calibration.jsonl``: wall time per phase (build, calibration, conversion),
peak GPU memory, and how much of each phase ran inside the time budget. A phase cut by the budget is recorded as
such (``complete: false``), with the per-layer conversion time measured and the projection it implies labelled as
a projection.

    python benchmarks/calibration.py --models flux,sd3,sdxl --prompts 64 --steps 4        # H200
    python benchmarks/calibration.py --scale tiny --models flux,sd3,sdxl --out /tmp/x.jsonl  # CPU smoke test
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# ---- the published configs (diffusers config.json of each model), and tiny ones for the CPU smoke test -------
FULL = {
    "flux": dict(cls="FluxTransformer2DModel", pipeline="FluxPipeline", component="transformer", config=dict(
        attention_head_dim=128, guidance_embeds=True, in_channels=64, joint_attention_dim=4096,
        num_attention_heads=24, num_layers=19, num_single_layers=38, patch_size=1, pooled_projection_dim=768,
        axes_dims_rope=(16, 56, 56)),
        text=(512, 4096), pooled=768, latent_channels=16, guidance=3.5, cfg=False,
        scheduler=("FlowMatchEulerDiscreteScheduler", dict(base_image_seq_len=256, base_shift=0.5,
                   max_image_seq_len=4096, max_shift=1.15, shift=3.0, use_dynamic_shifting=True))),
    "sd3": dict(cls="SD3Transformer2DModel", pipeline="StableDiffusion3Pipeline", component="transformer", config=dict(
        attention_head_dim=64, caption_projection_dim=1536, in_channels=16, joint_attention_dim=4096,
        num_attention_heads=24, num_layers=24, out_channels=16, patch_size=2, pooled_projection_dim=2048,
        pos_embed_max_size=192, sample_size=128),
        text=(333, 4096), pooled=2048, latent_channels=16, guidance=7.0, cfg=True,
        scheduler=("FlowMatchEulerDiscreteScheduler", dict(shift=3.0))),
    "sdxl": dict(cls="UNet2DConditionModel", pipeline="StableDiffusionXLPipeline", component="unet", config=dict(
        addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
        attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], in_channels=4,
        layers_per_block=2, out_channels=4, projection_class_embeddings_input_dim=2816, sample_size=128,
        transformer_layers_per_block=[1, 2, 10], up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                                                 "UpBlock2D"], use_linear_projection=True),
        text=(77, 2048), pooled=1280, latent_channels=4, guidance=5.0, cfg=True,
        scheduler=("EulerDiscreteScheduler", dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                  steps_offset=1, timestep_spacing="leading"))),
}
TINY = {
    "flux": dict(attention_head_dim=16, in_channels=64, joint_attention_dim=32, num_attention_heads=2, num_layers=1,
                 num_single_layers=2, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6), text=(8, 32), pooled=16),
    "sd3": dict(attention_head_dim=16, caption_projection_dim=32, joint_attention_dim=32, num_attention_heads=2,
                num_layers=2, pooled_projection_dim=16, pos_embed_max_size=16, sample_size=8, text=(8, 32), pooled=16),
    "sdxl": dict(attention_head_dim=[2, 4, 4], block_out_channels=[32, 32, 64], cross_attention_dim=32,
                 addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 16, norm_num_groups=8,
                 transformer_layers_per_block=[1, 1, 1], layers_per_block=1, text=(8, 32), pooled=16),
}


def build_pipeline(name: str, scale: str, device: str, dtype: torch.dtype, seed: int = 0):
    """(pipeline, spec, parameter count): the denoiser with random weights, built directly on ``device``."""
    import diffusers

    spec = {**FULL[name], "config": dict(FULL[name]["config"])}
    if scale == "tiny":
        tiny = dict(TINY[name])
        spec["text"], spec["pooled"] = tiny.pop("text"), tiny.pop("pooled")
        spec["config"].update(tiny)
    torch.manual_seed(seed)
    with torch.device(device):
        model = getattr(diffusers, spec["cls"])(**spec["config"])
    model = model.to(dtype).eval()
    # a 4-level VAE stand-in (never run: latents are the output) so the pipeline derives the real latent size
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=spec["latent_channels"],
                                  norm_num_groups=8, layers_per_block=1)
    sched_cls, sched_kw = spec["scheduler"]
    parts = dict(vae=vae, scheduler=getattr(diffusers, sched_cls)(**sched_kw), text_encoder=None, tokenizer=None,
                 text_encoder_2=None, tokenizer_2=None)
    if name == "sd3":
        parts.update(text_encoder_3=None, tokenizer_3=None)
    parts[spec["component"]] = model
    pipe = getattr(diffusers, spec["pipeline"])(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe, spec, sum(p.numel() for p in model.parameters())


def synthetic_prompts(spec: dict, n: int, device: str, dtype: torch.dtype, seed: int = 1) -> list[dict]:
    """``n`` dicts of pipeline arguments: random text embeddings with the shapes the real encoders produce."""
    g = torch.Generator().manual_seed(seed)
    tokens, width = spec["text"]

    def emb(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    out = []
    for _ in range(n):
        p = dict(prompt_embeds=emb(1, tokens, width), pooled_prompt_embeds=emb(1, spec["pooled"]))
        if spec["cfg"]:
            p.update(negative_prompt_embeds=emb(1, tokens, width), negative_pooled_prompt_embeds=emb(1, spec["pooled"]))
        out.append(p)
    return out


class _Deadline(Exception):
    pass


class _Prompts(list):
    """The prompt list, counting the prompts the pipeline loop reads (``run``); a prompt read after the calibration
    deadline stops the run (``_Deadline``: calibration cut short, recorded as such)."""

    def __init__(self, items, deadline):
        super().__init__(items)
        self.deadline, self.run = deadline, 0

    def __getitem__(self, i):
        if self.run and time.perf_counter() > self.deadline:  # at least one prompt
            raise _Deadline
        self.run = max(self.run, i + 1)
        return list.__getitem__(self, i)


class _ConvertClock:
    """A ``store`` for ``fourbit.quantize`` that times each converted layer and stops the run at a deadline."""

    def __init__(self, deadline):
        self.deadline, self.times, self.last, self.calib_end = deadline, [], None, None

    def load_stats(self):
        return None

    def save_stats(self, stats):
        self.last = self.calib_end = time.perf_counter()

    def load_layer(self, name):
        return None

    def save_layer(self, name, layer):
        now = time.perf_counter()
        self.times.append(now - self.last)
        self.last = now
        if now > self.deadline:
            raise _Deadline


def run_one(name: str, args, device: str) -> dict:
    import fourbit
    from fourbit.calibration import select_targets
    from fourbit.harness.variants import parse_variant
    from fourbit.pipelines import apply_preset, find_preset

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    t_start = time.perf_counter()
    budget = args.budget.get(name, 300.0)
    gc.collect()  # the previous model's reference cycles (a run cut by its budget leaves some) must go first
    resident = 0.0
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated() / 2**30
    pipe, spec, n_params = build_pipeline(name, args.scale, device, dtype)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    build_s = time.perf_counter() - t_start
    size = args.size if args.scale == "full" else 32
    model = getattr(pipe, spec["component"])
    config = parse_variant(args.variant).config()
    targets, _ = select_targets(model, apply_preset(config, find_preset(model)))
    remaining = budget - build_s
    prompts = _Prompts(synthetic_prompts(spec, args.prompts, device, dtype), time.perf_counter() + remaining * args.calibration_share)
    clock = _ConvertClock(t_start + budget)
    row = dict(model=name, scale=args.scale, denoiser=spec["cls"], parameters=n_params, dtype=str(dtype)[6:],
               variant=args.variant, resolution=size, prompts_planned=args.prompts, steps=args.steps,
               guidance_scale=spec["guidance"], cfg_batch=2 if spec["cfg"] else 1, layers_total=len(targets),
               budget_s=budget, build_s=round(build_s, 2), gpu_resident_before_gib=round(resident, 2))
    t0 = time.perf_counter()
    try:
        fourbit.quantize_pipeline(pipe, config, prompts, num_inference_steps=args.steps,
                                  guidance_scale=spec["guidance"], call_kwargs=dict(height=size, width=size),
                                  seed=0, store=clock, progress=True)
        row["complete"] = prompts.run == args.prompts
    except _Deadline:
        row["complete"] = False
    except Exception as e:  # recorded, not hidden: the row says what failed
        row.update(complete=False, error=f"{type(e).__name__}: {e}"[:500])
    row["prompts_run"] = prompts.run
    row["calibration_s"] = round((clock.calib_end or time.perf_counter()) - t0, 2)
    row["layers_converted"] = len(clock.times)
    row["convert_s"] = round(sum(clock.times), 2)
    if clock.times:
        row["convert_s_per_layer_mean"] = round(sum(clock.times) / len(clock.times), 3)
        row["convert_s_projected_all_layers"] = round(row["convert_s_per_layer_mean"] * len(targets), 1)
    if prompts.run:
        row["calibration_s_projected_all_prompts"] = round(row["calibration_s"] * args.prompts / prompts.run, 1)
    row["wall_s"] = round(time.perf_counter() - t_start, 2)
    if device == "cuda":
        row["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    del pipe, model, targets
    gc.collect()
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="flux,sd3,sdxl")
    p.add_argument("--scale", default="full", choices=["full", "tiny"])
    p.add_argument("--variant", default="svdquant:w4a4:r32")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--size", type=int, default=1024, help="image height and width (full scale)")
    p.add_argument("--budget", default="flux=300,sd3=100,sdxl=100",
                   help="seconds per model (build + calibration + conversion); calibration gets --calibration-share "
                        "of what the build leaves; a phase cut short is recorded as incomplete")
    p.add_argument("--calibration-share", type=float, default=0.5,
                   help="the part of the budget left after the build that calibration may use (default 0.5)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                   help="folder of calibration.jsonl (or a .jsonl file)")
    args = p.parse_args(argv)
    args.budget = {k: float(v) for k, v in (kv.split("=") for kv in args.budget.split(","))}
    from _util import environment, next_run

    device = "cuda" if torch.cuda.is_available() else "cpu"
    meta = environment()
    meta["git_commit"] = os.environ.get("FOURBIT_GIT_COMMIT") or _git_commit()
    meta["command"] = " ".join(["python", "benchmarks/calibration.py"] + (argv if argv is not None else sys.argv[1:]))
    out = args.out if args.out.endswith(".jsonl") else os.path.join(args.out, "calibration.jsonl")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    for name in args.models.split(","):
        row = run_one(name.strip(), args, device)
        print(json.dumps({**row, "meta": meta}), flush=True)  # on stdout first: nothing measured is lost
        row = {"benchmark": "calibration", "run": next_run(out, meta["date"]), **row, "meta": meta}
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
