"""The PTQD ablation for one quantized model: what each component adds, measured against the 16-bit model.

For each eta: one 16-bit reference run (reused by every row), one statistics pass (all candidate activation
formats at once, seeds apart from the evaluation seeds), then one sampling run per row, all with the same
classes and seeds:

    W4A4                    the quantized model, no correction
    + correlated            eps / (1 + k_t)
    + bias                  (eps - mu_t) / (1 + k_t)
    + variance calibration  ... and VSC: a no-op where the sampler injects no noise (DDIM eta = 0): the row then
                            repeats the previous one's images and says so
    mixed A4/A8 + PTQD      full PTQD with the step-aware precision schedule
    W4A8, W4A8 + PTQD       the other candidate width(s), without and with full PTQD: the bounds for the mixed row

Metrics (``fourbit.eval.compare_images``): LPIPS and PSNR against the paired 16-bit samples, FD over AlexNet
features against the 16-bit samples and against Fashion-MNIST test images when present, each with a 95%
bootstrap interval; plus BOPs of each run. Writes ``ablation.json`` and ``ablation.md`` (and a grid per eta).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from .ptqd_variants import candidate_formats, stats_info
from ..ptqd.hooks import PTQDHook
from ..ptqd.mixed import BOPCounter, format_schedule
from ..ptqd.setting import attach_stats
from ..ptqd.stats import DEFAULT_STATS_SEED, collect_stats, format_label, model_act_format
from ..ptqd.validate import format_validation, validate_components, validation_mode


@dataclass
class AblationSettings:
    model: str = "fashion-dit"
    variant: str = "svdquant:w4a4:r32"
    samples: int = 256
    steps: int = 50
    sampler: str = "ddim"
    etas: tuple = (0.0, 1.0)
    guidance_scale: Optional[float] = None  # None: the model's default
    seed: int = 0  # evaluation seeds seed .. seed + samples - 1
    calib_samples: int = 64  # quantizer calibration trajectories (seeds from calib_seed)
    calib_steps: Optional[int] = None  # None: steps
    calib_seed: int = 10_000
    stats_samples: int = 256  # PTQD statistics trajectories per eta (seeds from stats_seed)
    stats_seed: int = DEFAULT_STATS_SEED
    mixed: str = "4-8"  # activation widths for the mixed-precision row ("" = no mixed row); a mixed variant's own win
    bias: str = "residual"  # PTQD bias mode: "residual" (paper) or "total" (authors' code)
    data_samples: int = 1000  # Fashion-MNIST test images for FD vs data (0 = skip)
    batch_size: int = 256
    device: Optional[str] = None
    n_boot: int = 1000
    fd_n_boot: int = 100
    weights: Optional[str] = None  # a weights file instead of the bundled model (any config of the arch)
    save: Optional[str] = None  # write the quantized model with all PTQD statistics to this checkpoint
    validate: bool = True  # add "validated PTQD" rows (components chosen on the statistics seeds)
    validate_samples: Optional[int] = None  # validation trajectories (None: stats_samples)

    def resolved_device(self) -> str:
        return self.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_ablation(settings: AblationSettings, out_dir) -> dict:
    """Run the ablation and write ablation.json, ablation.md and grid_eta*.png under ``out_dir``."""
    from .. import __version__, quantize, save
    from ..data.fashion_mnist import reference_images
    from ..eval import compare_images
    from .compare import class_labels
    from .report import write_grid
    from .variants import parse_variant
    from ..models import get_spec, load_pretrained
    from ..models.io import load_weights
    from ..sampling import calibration_forward_loop, sample, sample_plan

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    st = settings
    variant = parse_variant(st.variant)
    if variant.is_baseline:
        raise ValueError("the ablation needs a quantized variant, e.g. svdquant:w4a4:r32")
    if variant.posts:
        raise ValueError(f"{st.variant}: give the variant without +suffixes; the ablation applies PTQD itself")
    if st.seed < st.stats_seed + st.stats_samples and st.stats_seed < st.seed + st.samples:
        raise ValueError("statistics seeds overlap the evaluation seeds; change --stats-seed or --seed")
    device = st.resolved_device()
    spec = get_spec(st.model)
    guidance = spec.default_guidance_scale if st.guidance_scale is None else st.guidance_scale
    fp_model = (load_weights(st.weights, device=device)[0] if st.weights
                else load_pretrained(st.model, device=device)).eval()
    timings: dict = {"metrics_s": 0.0}
    t_start = time.perf_counter()

    # one quantized model for every row and eta (calibrated on trajectories of the first eta)
    t0 = time.perf_counter()
    q_model = copy.deepcopy(fp_model)
    cfg = variant.config(exclude=spec.quant_exclude, policies=spec.quant_policies)
    loop = calibration_forward_loop(st.calib_samples, st.calib_steps or st.steps, sampler=st.sampler,
                                    guidance_scale=guidance, seed=st.calib_seed, num_classes=spec.num_classes,
                                    eta=st.etas[0], batch_size=st.batch_size)
    quantize(q_model, cfg, forward_loop=loop)
    timings["quantize_s"] = time.perf_counter() - t0
    base_fmt = model_act_format(q_model)
    if "-" in variant.abits:
        candidates = candidate_formats(variant, q_model)
    elif st.mixed:
        candidates = candidate_formats(dataclasses.replace(variant, abits=st.mixed), q_model)
        if format_label(base_fmt) not in {format_label(f) for f in candidates}:
            candidates = [base_fmt] + candidates
    else:
        candidates = None
    w = variant.wbits

    data = reference_images(st.data_samples, st.seed)  # None without the dataset

    classes, seeds = sample_plan(st.samples, st.seed, spec.num_classes)

    def run(model, hooks=()):
        _sync(device)
        t = time.perf_counter()
        imgs = sample(model, classes, seeds, steps=st.steps, sampler=st.sampler, eta=eta, guidance_scale=guidance,
                      hooks=hooks, batch_size=st.batch_size, device=device, progress=True,
                      null_class=spec.num_classes)
        _sync(device)
        return imgs, time.perf_counter() - t

    results = []
    for eta in st.etas:
        eta = float(eta)
        _log(f"== eta {eta}: 16-bit reference")
        stochastic = st.sampler == "ddpm" or eta > 0
        ref_counter = BOPCounter()
        reference, ref_secs = run(fp_model, [ref_counter])
        _log(f"== eta {eta}: PTQD statistics ({st.stats_samples} trajectories)")
        t0 = time.perf_counter()
        stats = collect_stats(fp_model, q_model, steps=st.steps, sampler=st.sampler, eta=eta,
                              guidance_scale=guidance, num_samples=st.stats_samples, seed=st.stats_seed,
                              num_classes=spec.num_classes, act_formats=candidates, bias=st.bias,
                              model_name=st.model, batch_size=st.batch_size, device=device)
        stats_secs = time.perf_counter() - t0
        attach_stats(q_model, stats)
        base = stats.base
        bits = {lb: fs.bits for lb, fs in stats.formats.items()}
        compare_bits = sorted(set(bits.values()) | {4, 8})
        if stats.schedule:
            _log(f"PTQD precision schedule: {format_schedule(stats)}")

        # validated PTQD (fourbit's default): components chosen on the statistics seeds, per mode
        validations = {}
        if st.validate:
            modes = [None] + [[lb] * st.steps for lb in bits if lb != base] + (["auto"] if stats.schedule else [])
            for mode in modes:
                key = validation_mode(mode, stats)
                _log(f"== eta {eta}: validating PTQD components for {key}")
                validations[key] = validate_components(fp_model, q_model, stats, schedule=mode,
                                                       num_samples=st.validate_samples, num_classes=spec.num_classes,
                                                       batch_size=st.batch_size, device=device)
                _log(f"   {format_validation(validations[key])}")

        def validated(lb):
            d = validations.get(lb)
            return None if d is None else (dict(d["components"]), f"kept: {d['chosen']}")

        a = f"W{w}A{bits[base]}"
        rows = [(a, base, dict(correlated=False, bias=False, variance=False), None),
                (f"{a} +correlated", base, dict(bias=False, variance=False), None),
                (f"{a} +correlated +bias", base, dict(variance=False), None),
                (f"{a} +correlated +bias +VSC", base, {}, None if stochastic else
                 "no-op: this sampler injects no noise (DDIM eta = 0), same images as the row above")]
        if validated(base):
            rows.append((f"{a} + validated PTQD", base, *validated(base)))
        if stats.schedule:
            widths = "/".join(f"A{bits[lb]}" for lb in sorted(bits, key=bits.get))
            rows.append((f"mixed {widths} + full PTQD", "auto", {}, None))
            if validated("auto"):
                rows.append((f"mixed {widths} + validated PTQD", "auto", *validated("auto")))
        for lb in sorted(bits, key=bits.get):
            if lb != base:
                rows += [(f"W{w}A{bits[lb]}", lb, dict(correlated=False, bias=False, variance=False), None),
                         (f"W{w}A{bits[lb]} + full PTQD", lb, {}, None)]
                if validated(lb):
                    rows.append((f"W{w}A{bits[lb]} + validated PTQD", lb, *validated(lb)))

        eta_rows, images = [], {"16-bit": reference}
        prev = None
        done: dict = {}  # (format or "auto", effective components) -> (imgs, secs, counter): identical runs
        for name, which, kw, note in rows:
            _log(f"== eta {eta}: {name}")
            flags = {**dict(correlated=True, bias=True, variance=True), **kw}
            if not stochastic:
                flags["variance"] = False  # VSC is a no-op without injected noise
            run_key = (which, tuple(sorted(flags.items())))
            if note is not None and note.startswith("no-op") and prev is not None:  # reuse the row above
                imgs, _, counter = prev
                secs = 0.0  # not sampled again
            elif run_key in done:  # the same sampling run as an earlier row (e.g. validation kept "none")
                imgs, _, counter = done[run_key]
                secs = 0.0
            else:
                schedule = None if which == base else ("auto" if which == "auto" else [which] * st.steps)
                counter = BOPCounter(compare_bits=compare_bits)
                hook = PTQDHook(stats, schedule=schedule, q_model=q_model, **kw)
                imgs, secs = run(q_model, [hook, counter])
            prev = (imgs, secs, counter)
            done.setdefault(run_key, prev)
            images[name] = imgs
            t0 = time.perf_counter()
            m = compare_images(imgs, reference, data, n_boot=st.n_boot, fd_n_boot=st.fd_n_boot, seed=st.seed,
                               device=device)
            timings["metrics_s"] += time.perf_counter() - t0
            eta_rows.append({"row": name, "note": note, "lpips": m["lpips"], "psnr": m["psnr"], "ssim": m["ssim"],
                             "fd_vs_fp16": m["fd_vs_reference"], "fd_vs_data": m["fd_vs_data"],
                             "bops": counter.result(), "sampling_seconds": secs,
                             "schedule": stats.schedule if which == "auto" else None})
        ref_m = compare_images(reference, reference, data, n_boot=st.n_boot, fd_n_boot=st.fd_n_boot, seed=st.seed,
                               device=device) if data is not None else None
        ncol = min(10, st.samples)
        write_grid(out_dir / f"grid_eta{eta:g}.png", {n: im[:ncol] for n, im in images.items()},
                   column_labels=class_labels(spec, classes[:ncol]), corner="class")
        results.append({"eta": eta, "stochastic": stochastic, "stats": stats_info(stats),
                        "stats_summary": stats.summary(), "stats_seconds": stats_secs,
                        "reference": {"bops": ref_counter.result(), "sampling_seconds": ref_secs,
                                      "fd_vs_data": None if ref_m is None else ref_m["fd_vs_data"]},
                        "rows": eta_rows})

    if st.save:
        save(q_model, st.save)
        _log(f"checkpoint with PTQD statistics: {st.save}")
    timings["total_s"] = time.perf_counter() - t_start
    report = {
        "fourbit_version": __version__, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "settings": {**asdict(st), "guidance_scale": guidance, "etas": [float(e) for e in st.etas]},
        "config": cfg.to_dict(), "timings": timings, "results": results,
        "notes": [
            "Every row uses the same classes (i % 10) and seeds as the 16-bit reference; LPIPS, PSNR and "
            "FD-vs-16-bit compare with those paired 16-bit samples; intervals are 95% bootstrap percentile intervals.",
            "FD is a Frechet distance over LPIPS-AlexNet features, not FID.",
            "BOPs count Linear/Conv2d MACs x weight bits x activation bits (16 x 16 for 16-bit layers and "
            "low-rank branches); attention's activation-activation products are not counted.",
            "Activation widths share the 4-bit weights; the quantizer's smoothing (SVDQuant/SmoothQuant) was "
            "calibrated for the base width only.",
        ],
    }
    (out_dir / "ablation.json").write_text(json.dumps(report, indent=2, default=_json_default))
    (out_dir / "ablation.md").write_text(to_markdown(report))
    return report


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    return str(o)


def _ci(m: Optional[dict], key: str = "mean", digits: int = 3) -> str:
    if not m or m.get(key) is None:
        return "n/a"
    v = m[key]
    if v == float("inf"):
        return "inf"
    return f"{v:.{digits}f} [{m['lo']:.{digits}f}, {m['hi']:.{digits}f}]"


def to_markdown(report: dict) -> str:
    """The ablation as markdown: one table per eta, the precision schedule, and the per-step statistics."""
    s = report["settings"]
    lines = [f"# PTQD ablation: {s['model']}, {s['variant']}", "",
             f"{s['samples']} samples (seeds {s['seed']}..{s['seed'] + s['samples'] - 1}, class = i mod 10), "
             f"{s['sampler']} {s['steps']} steps, guidance {s['guidance_scale']}; PTQD statistics from "
             f"{s['stats_samples']} trajectories (seeds from {s['stats_seed']}, bias mode {s['bias']}); quantizer "
             f"calibration {s['calib_samples']} trajectories. Device: {report['device']}, torch {report['torch']}, "
             f"fourbit {report['fourbit_version']}, {report['date']}.", ""]
    lines += [f"- {n}" for n in report["notes"]]
    t = report.get("timings", {})
    if "total_s" in t:
        lines += ["", f"Wall time {t['total_s']:.0f} s: quantization {t['quantize_s']:.0f} s, statistics "
                  f"{sum(r['stats_seconds'] for r in report['results']):.0f} s, sampling "
                  f"{sum(r['reference']['sampling_seconds'] + sum(x['sampling_seconds'] for x in r['rows']) for r in report['results']):.0f} s, "
                  f"metrics {t['metrics_s']:.0f} s."]
    for res in report["results"]:
        lines += ["", f"## eta = {res['eta']:g}" + ("" if res["stochastic"] else " (deterministic sampler)"), "",
                  "| row | LPIPS vs 16-bit (lower better) | FD vs 16-bit | PSNR dB | FD vs data | GBOPs/image | "
                  "BOPs vs all-A8 | note |",
                  "|---|---|---|---|---|---|---|---|"]
        ref = res["reference"]
        lines.append(f"| 16-bit | 0 | 0 | inf | {_ci(ref['fd_vs_data'], 'value', 2)} | "
                     f"{ref['bops']['bops_per_image'] / 1e9:.1f} | | reference |")
        for r in res["rows"]:
            b = r["bops"]
            rel = b.get("bops_vs_all_a8")
            lines.append(f"| {r['row']} | {_ci(r['lpips'])} | {_ci(r['fd_vs_fp16'], 'value', 2)} | "
                         f"{_ci(r['psnr'], 'mean', 2)} | {_ci(r['fd_vs_data'], 'value', 2)} | "
                         f"{b['bops_per_image'] / 1e9:.1f} | {'' if rel is None else f'{rel:.3f}'} | {r['note'] or ''} |")
        st = res["stats"]
        if st.get("schedule_text"):
            lines += ["", f"Precision schedule: {st['schedule_text']}"]
        for mode, d in (st.get("validation") or {}).items():
            lines += ["", f"Validated PTQD for {mode}: {format_validation(d)}"]
        lines += ["", "Per-step statistics (k_t, sigma_q,t and SNR_Q per activation format; SNR_F of the schedule):",
                  "", "```", res["stats_summary"], "```"]
    return "\n".join(lines) + "\n"
