"""``fourbit compare --pipeline``: the compare report for any diffusers pipeline, with prompts instead of classes.

The 16-bit pipeline makes one image per evaluation prompt (seed ``seed + i`` for prompt i); each variant's
denoiser is a copy of the 16-bit one quantized by ``quantize_pipeline`` on calibration prompts (the bundled
prompts, or other lines of the prompt file than the evaluation ones), then makes the same images. Metrics and
files are those of ``fourbit compare``: LPIPS/PSNR/SSIM/FD-Alex against the 16-bit images, report.json,
grid.png, report.html.

Under torchrun (``ranks`` of several processes) the calibration prompts and the evaluation prompts are spread
over the processes (prompt i on rank i mod N, still with seed ``seed + i``, one pipeline call per prompt as in one
process); the images are gathered in prompt order on rank 0, which computes the metrics and writes.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from .. import __version__
from ..distributed import Ranks
from .compare import _atomic_write, _json_default, _log, _sync, add_metrics
from .footprint import model_bytes, weight_bits_per_element
from .variants import parse_variant

GRID_PX = 96  # images are resized to this for the grid (metrics use the full images)


@dataclass
class PipelineCompareSettings:
    pipeline: str
    variants: tuple = ("fp16", "svdquant:w4a4:r32")
    prompts: Optional[str] = None  # evaluation prompt file (None: bundled prompts)
    samples: int = 8  # evaluation prompts (one image each)
    steps: int = 20
    guidance_scale: Optional[float] = None  # None: the pipeline's default
    seed: int = 0
    calib_samples: int = 16  # calibration prompts
    calib_steps: int = 4
    calib_seed: int = 10_000
    height: Optional[int] = None
    width: Optional[int] = None
    dtype: Optional[str] = None
    component: Optional[str] = None
    device: Optional[str] = None
    n_boot: int = 1000
    fd_n_boot: int = 100


def _prompt_sets(s: PipelineCompareSettings) -> tuple[list[str], list[str]]:
    """(evaluation prompts, calibration prompts), disjoint."""
    from ..pipelines.calibrate import bundled_prompts, read_prompts

    bundled = bundled_prompts()
    if s.prompts:
        evaluation = read_prompts(s.prompts)[:s.samples]
        calibration = [p for p in bundled if p not in evaluation][:s.calib_samples]
    else:
        evaluation = bundled[-s.samples:]
        calibration = bundled[:s.calib_samples]
    if len(evaluation) < s.samples:
        raise ValueError(f"{s.prompts}: {len(evaluation)} prompt(s), fewer than --samples {s.samples}")
    return evaluation, calibration


def run_pipeline_compare(settings: PipelineCompareSettings, out_dir, ranks: Optional[Ranks] = None) -> Optional[dict]:
    """Run the comparison and write report.json, grid.png and report.html under ``out_dir``.

    ``ranks``: this process's place in a torchrun group (``fourbit.distributed.launch``); the report is returned
    on rank 0 only (None on the others).
    """
    from ..pipelines import quantize_pipeline
    from ..pipelines.calibrate import find_denoiser, prompt_indices
    from ..pipelines.pretrained import load_pipeline
    from .report import write_grid, write_html

    ranks = ranks or Ranks()
    root = ranks.is_root
    log = _log if root else (lambda msg: None)
    out_dir = Path(out_dir)
    if root:
        out_dir.mkdir(parents=True, exist_ok=True)
    variants = [parse_variant(v) for v in settings.variants]
    if not any(v.is_baseline for v in variants):
        variants.insert(0, parse_variant("fp16"))
    device = ranks.device if ranks.world_size > 1 else (
        settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    evaluation, calibration = _prompt_sets(settings)
    pipe = load_pipeline(settings.pipeline, settings.dtype, device)
    pipe.set_progress_bar_config(disable=True)
    name, fp_model = find_denoiser(pipe, settings.component)
    size = {k: v for k, v in (("height", settings.height), ("width", settings.width)) if v is not None}
    guidance = {} if settings.guidance_scale is None else {"guidance_scale": settings.guidance_scale}

    def generate():
        _sync(device)
        t0 = time.perf_counter()
        imgs = [pipe(prompt=evaluation[i], num_inference_steps=settings.steps, output_type="pt", **size, **guidance,
                     generator=torch.Generator().manual_seed(settings.seed + i)).images.float().cpu()
                for i in prompt_indices(len(evaluation), ranks)]  # each (1, 3, H, W)
        imgs = ranks.gather_batches(imgs, len(evaluation), 1)  # (N, 3, H, W) in prompt order on rank 0, else None
        _sync(device)
        return None if imgs is None else imgs * 2 - 1, time.perf_counter() - t0  # in [-1, 1]

    results, images = {}, {}
    for v in variants:
        log(f"== {v.name}")
        row: dict = {"variant": v.name}
        if v.is_baseline:
            model = fp_model
            row.update(calibration_seconds=0.0, weight_bits_per_element=16.0, model_bytes=model_bytes(fp_model))
        else:
            model = copy.deepcopy(fp_model)
            pipe.register_modules(**{name: model})
            cfg = v.config()
            _sync(device)
            t0 = time.perf_counter()
            quantize_pipeline(pipe, cfg, calibration, num_inference_steps=settings.calib_steps, call_kwargs=size,
                              seed=settings.calib_seed, component=name, collective=ranks, progress=root,
                              verbose=root, **guidance)
            _sync(device)
            row.update(calibration_seconds=time.perf_counter() - t0, config=cfg.to_dict(),
                       preset=model.fourbit_report.preset, weight_bits_per_element=weight_bits_per_element(model),
                       model_bytes=model_bytes(model))
        images[v.name], row["sampling_seconds"] = generate()
        results[v.name] = row
        pipe.register_modules(**{name: fp_model})
        del model
    ranks.barrier("the end of sampling")  # a rank that stalled after its last gather is caught here
    if not root:
        return None

    reference = images[next(v.name for v in variants if v.is_baseline)]
    add_metrics(results, images, reference, None, settings, device)

    report = {
        "fourbit_version": __version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "settings": {**asdict(settings), "model": settings.pipeline, "variants": [v.name for v in variants],
                     "sampler": type(pipe.scheduler).__name__, "eta": 0.0,
                     "plan": "prompt i of the evaluation prompts, seed + i", "image_px": GRID_PX,
                     "evaluation_prompts": evaluation, "calibration_prompts": calibration},
        "processes": ranks.world_size,
        "notes": [
            "fp16 = the pipeline's own 16-bit denoiser; every other variant is compared with its images: same "
            "prompts, same seeds.",
            "FD-Alex is a Frechet distance over LPIPS-AlexNet features, not FID.",
            f"{settings.samples} images per variant; intervals are 95% bootstrap percentile intervals.",
            f"{ranks.world_size} process(es); one pipeline call per prompt, the same calls in any number of "
            f"processes; seconds are rank 0's wall time.",
        ],
        "variants": results,
    }
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)  # the grid is grayscale (report.write_grid)
    small = {n: torch.nn.functional.interpolate((im[:10] * luma).sum(1, keepdim=True), size=(GRID_PX, GRID_PX),
                                                mode="bilinear", antialias=True).clamp(-1, 1)
             for n, im in images.items()}
    write_grid(out_dir / "grid.png", small)
    _atomic_write(out_dir / "report.json", json.dumps(report, indent=2, default=_json_default))
    write_html(out_dir / "report.html", report, out_dir / "grid.png")
    return report
