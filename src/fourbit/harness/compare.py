"""``fourbit compare``: quantize a bundled model several ways, sample the same seeds, measure the cost.

For every variant: calibrate on the model's own sampling trajectories (classes spread evenly, several
timesteps, cond + uncond), generate the same seeded samples as the 16-bit model, and compare them with
the 16-bit samples (LPIPS, PSNR, SSIM, FD) and with Fashion-MNIST test images when present.

Under torchrun (``ranks`` of several processes) the calibration and evaluation batches are spread across the
ranks and gathered in seed order, so the report's numbers equal those of one process with the same
``batch_size``; rank 0 computes the metrics and writes the files.
"""
from __future__ import annotations

import copy
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .. import __version__
from ..api import quantize
from ..calibration import select_targets
from ..distributed import Ranks
from .footprint import model_bytes, weight_bits_per_element
from .sharded import sample_sharded, sharded_calibration_loop
from .variants import Variant, get_post, parse_variant


@dataclass
class CompareSettings:
    model: str = "fashion-dit"
    variants: tuple = ("fp16", "rtn:w4a4", "svdquant:w4a4:r32")
    samples: int = 64
    steps: int = 20
    sampler: str = "ddim"
    eta: float = 0.0
    guidance_scale: Optional[float] = None  # None: the model's default
    seed: int = 0  # evaluation seeds: seed .. seed + samples - 1
    calib_samples: int = 20
    calib_steps: Optional[int] = None  # None: same as steps
    calib_seed: int = 10_000  # calibration uses other seeds than evaluation
    data_samples: int = 1000  # Fashion-MNIST test images for FD vs data (0 = skip)
    batch_size: int = 64
    device: Optional[str] = None
    grid_columns: int = 10
    n_boot: int = 1000
    fd_n_boot: int = 100
    weights: Optional[str] = None  # a weights file to use instead of the bundled one (any config of the arch)

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Refuse settings that cannot work, before any model is loaded (one sentence, the setting named)."""
        for name, low in (("samples", 2), ("steps", 1), ("calib_samples", 1), ("batch_size", 1),
                          ("grid_columns", 1), ("n_boot", 1), ("fd_n_boot", 1)):
            value = getattr(self, name)
            if type(value) is not int or value < low:
                why = " (the Frechet distance needs two or more)" if name == "samples" else ""
                raise ValueError(f"{name} must be an integer >= {low}{why}, got {value!r}")
        if self.calib_steps is not None and (type(self.calib_steps) is not int or self.calib_steps < 1):
            raise ValueError(f"calib_steps must be an integer >= 1 or None, got {self.calib_steps!r}")
        if type(self.data_samples) is not int or self.data_samples < 0 or self.data_samples == 1:
            raise ValueError(f"data_samples must be 0 (skip) or an integer >= 2, got {self.data_samples!r}")
        if self.sampler not in ("ddim", "ddpm"):
            raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {self.sampler!r}")
        if not self.eta >= 0:
            raise ValueError(f"eta must be >= 0, got {self.eta!r}")

    def resolved_device(self) -> str:
        return self.device or ("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class PostContext:
    """What a ``+post`` processor (e.g. PTQD) gets to build its sampler hooks."""

    fp_model: torch.nn.Module
    q_model: torch.nn.Module
    variant: Variant
    settings: CompareSettings
    guidance_scale: float
    device: str
    info: dict = field(default_factory=dict)  # the post writes its facts here; they go into the report
    ranks: Optional[Ranks] = None  # torchrun processes: a post may shard its own sampling passes over them


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_compare(settings: CompareSettings, out_dir: str | Path, ranks: Optional[Ranks] = None) -> Optional[dict]:
    """Run the comparison and write report.json, grid.png and report.html under ``out_dir``.

    ``ranks``: this process's place in a torchrun group (``fourbit.distributed.launch``); the report is returned
    on rank 0 only (None on the others).
    """
    from ..data.fashion_mnist import reference_images
    from ..models import get_spec, load_pretrained
    from ..models.io import load_weights
    from ..sampling import sample, sample_plan
    from .report import report_notes, write_grid, write_html

    settings.check()
    ranks = ranks or Ranks(device=settings.resolved_device())
    root = ranks.is_root
    variants = [parse_variant(v) for v in settings.variants]  # fail on a bad name before any work
    if not any(v.is_baseline for v in variants):
        variants.insert(0, parse_variant("fp16"))
    device = ranks.device if ranks.world_size > 1 else settings.resolved_device()
    spec = get_spec(settings.model)
    configs = {v.name: v.config(exclude=spec.quant_exclude, policies=spec.quant_policies)
               for v in variants if not v.is_baseline}  # every config's checks, before any work
    out_dir = Path(out_dir)
    if root:
        out_dir.mkdir(parents=True, exist_ok=True)
    guidance = spec.default_guidance_scale if settings.guidance_scale is None else settings.guidance_scale
    calib_steps = settings.calib_steps or settings.steps
    classes, seeds = sample_plan(settings.samples, settings.seed, spec.num_classes)
    if settings.weights:
        fp_model = load_weights(settings.weights, device=device)[0]
    else:
        fp_model = load_pretrained(settings.model, device=device).eval()
    for cfg in configs.values():  # per-layer geometry (group sizes against this model's layers), no work yet
        select_targets(fp_model, cfg)

    data = reference_images(settings.data_samples, settings.seed) if root else None  # None without the dataset
    log = _log if root else (lambda msg: None)

    def generate(model, hooks=(), sharded=True):
        _sync(device)
        t0 = time.perf_counter()
        kwargs = dict(steps=settings.steps, sampler=settings.sampler, eta=settings.eta, guidance_scale=guidance,
                      hooks=hooks)
        if sharded:
            imgs = sample_sharded(ranks, model, classes, seeds, settings.batch_size, progress=True, **kwargs)
        else:  # every rank samples everything (hooks that keep counts across batches); rank 0's images count
            imgs = sample(model, classes, seeds, batch_size=settings.batch_size, progress=root, **kwargs)
        _sync(device)
        return imgs, time.perf_counter() - t0

    results, images = {}, {}
    reference = None
    for v in variants:
        log(f"== {v.name}")
        row: dict = {"variant": v.name}
        if v.is_baseline:
            model, hooks = fp_model, ()
            row.update(calibration_seconds=0.0, weight_bits_per_element=16.0, model_bytes=model_bytes(fp_model))
        else:
            model = copy.deepcopy(fp_model)
            cfg = configs[v.name]
            loop = sharded_calibration_loop(ranks, settings.calib_samples, calib_steps, sampler=settings.sampler,
                                            guidance_scale=guidance, seed=settings.calib_seed,
                                            num_classes=spec.num_classes, eta=settings.eta,
                                            batch_size=settings.batch_size)
            _sync(device)
            t0 = time.perf_counter()
            quantize(model, cfg, forward_loop=loop, collective=ranks, progress=root, verbose=root)
            _sync(device)
            row["calibration_seconds"] = time.perf_counter() - t0
            row["config"] = cfg.to_dict()
            row["kernel"] = cfg.kernel  # "reference": a plain-torch emulation, its sampling time is not a speed
            hooks = []
            for p in v.posts:
                ctx = PostContext(fp_model, model, v, settings, guidance, device, ranks=ranks)
                t0 = time.perf_counter()
                hooks += list(get_post(p).hooks(ctx))
                row["calibration_seconds"] += time.perf_counter() - t0
                row[p] = ctx.info
            row.update(weight_bits_per_element=weight_bits_per_element(model), model_bytes=model_bytes(model))
        # +post hooks (PTQD) keep counts over every batch they see: those variants are not sharded
        imgs, secs = generate(model, hooks, sharded=not v.posts)
        row["sampling_seconds"] = secs
        images[v.name] = imgs
        if v.is_baseline:
            reference = imgs
        results[v.name] = row
        del model
    ranks.barrier("the end of sampling")  # a rank that stalled after its last gather is caught here
    if not root:
        return None

    add_metrics(results, images, reference, data, settings, device)

    report = {
        "fourbit_version": __version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "settings": {**asdict(settings), "variants": [v.name for v in variants], "guidance_scale": guidance,
                     "calib_steps": calib_steps},
        "processes": ranks.world_size,
        "notes": [
            "fp16 = the bundled model's 16-bit weights (computed in fp32 on CPU); every other variant is compared "
            "with its samples: same classes (i % 10), same seeds.",
            "FD-Alex is a Frechet distance over LPIPS-AlexNet features, not FID.",
            f"{settings.samples} samples per variant; intervals are 95% bootstrap percentile intervals.",
            f"{ranks.world_size} process(es); calibration and sampling in batches of {settings.batch_size}, "
            f"the same batches in any number of processes; seconds are rank 0's wall time.",
        ],
        "variants": results,
    }
    ncol = min(settings.grid_columns, settings.samples)
    report["notes"] += report_notes(report)
    write_grid(out_dir / "grid.png", {n: im[:ncol] for n, im in images.items()},
               column_labels=class_labels(spec, classes[:ncol]), corner="class")
    _atomic_write(out_dir / "report.json", json.dumps(report, indent=2, default=_json_default))
    write_html(out_dir / "report.html", report, out_dir / "grid.png")
    return report


def class_labels(spec, classes) -> list[str]:
    """Column labels for the grid: the dataset's class names (short form) or class indices."""
    from ..data import CLASS_NAMES

    names = CLASS_NAMES if spec.dataset == "fashion-mnist" else ()
    short = [n.split("/")[0] if len(n.split("/")[0]) <= 9 else n.split()[-1] for n in names]  # fits a 56 px column
    return [short[int(c)] if int(c) < len(short) else str(int(c)) for c in classes]


def _json_default(o):
    if isinstance(o, float) and o != o:
        return None
    if isinstance(o, torch.Tensor):
        return o.tolist()
    return str(o)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def format_table(report: dict) -> str:
    """A plain-text table of the report (what the CLI prints), with the report's caveats below it."""
    from .report import FD_MIN_SAMPLES, fd_reliable, is_emulated, report_notes

    dev = str(report.get("device", "?"))[:12]
    head = (f"{'variant':<28} {'LPIPS':>14} {'PSNR dB':>9} {'SSIM':>6} {'FD-fp16':>9} {'FD-data':>9} {'bits/w':>6} "
            f"{'MB':>6} {'calib s':>7} {'sample s':>10}  (times on {dev})")
    lines = [head, "-" * len(head)]
    for name, r in report["variants"].items():
        lp = r["lpips"]
        fd, fdd = r.get("fd_vs_fp16"), r.get("fd_vs_data")
        lines.append(
            f"{name:<28} {lp['mean']:>6.3f}±{(lp['hi'] - lp['lo']) / 2:<7.3f} {_psnr(r.get('psnr')):>9} "
            f"{r['ssim']['mean']:>6.3f} {_fd(fd):>9} {_fd(fdd):>9} {r['weight_bits_per_element']:>6.2f} "
            f"{r['model_bytes'] / 2**20:>6.2f} {r['calibration_seconds']:>7.1f} "
            f"{r['sampling_seconds']:>8.1f}{' e' if is_emulated(r) else '  '}")
    notes = report_notes(report)
    if any(r.get("fd_vs_fp16") and not fd_reliable(r["fd_vs_fp16"]) for r in report["variants"].values()):
        notes.append(f"FD values marked '?' come from fewer than {FD_MIN_SAMPLES} samples per set.")
    if any(is_emulated(r) for r in report["variants"].values()):
        notes.append("'e': emulated on the reference kernel, not a speed.")
    return "\n".join(lines + [f"note: {n}" for n in notes])


def _fd(m) -> str:
    from .report import fd_reliable

    if not m or m.get("value") is None:
        return "n/a"
    return f"{m['value']:.2f}" + ("" if fd_reliable(m) else "?")


def _psnr(m) -> str:
    """Mean PSNR; 'identical' when every pair is, a '*' when some identical pairs were averaged at the cap."""
    if not m:
        return "n/a"
    if m.get("n") and m.get("n_inf") == m["n"]:
        return "identical"
    return _num(m["mean"]) + ("*" if m.get("n_inf") else "")


def _num(x) -> str:
    return "inf" if x is None or x == float("inf") else f"{x:.2f}"


def add_metrics(results: dict, images: dict, reference, data, settings, device) -> None:
    """Fill each variant's row with LPIPS / PSNR / SSIM / FD against the 16-bit images (and FD/FID against ``data``
    images when given), with the bootstrap settings of ``settings``."""
    from ..eval import compare_images

    for name, imgs in images.items():
        _log(f"== metrics: {name}")
        m = compare_images(imgs, reference, data, n_boot=settings.n_boot, fd_n_boot=settings.fd_n_boot,
                           seed=settings.seed, device=device)
        row = results[name]
        row["lpips"], row["psnr"], row["ssim"] = m["lpips"], m["psnr"], m["ssim"]
        row["fd_vs_fp16"], row["fd_vs_data"] = m["fd_vs_reference"], m.get("fd_vs_data")
        row["fid_vs_data"] = m.get("fid_vs_data")
        row["metric_settings"] = m["settings"]
