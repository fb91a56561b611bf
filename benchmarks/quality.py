"""Quality of every variant on the bundled models: runs ``fourbit compare`` per model, writes one table.

    python benchmarks/quality.py --models fashion-dit,fashion-unet --samples 1000 --steps 20 \
        --variants fp16,rtn:w4a4,svdquant:w4a4:r32 --out out/quality

Writes OUT/<model>/{report.json,report.html,grid.png} and OUT/quality.md (all models, one table each), and appends
one row per model (the report, its table) to benchmarks/results/quality.jsonl (``--results``; "" for none).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from fourbit.harness.compare import CompareSettings, run_compare
from fourbit.harness.report import report_notes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import RESULTS_DIR, next_run, append_row, run_meta  # noqa: E402


def _env(report: dict) -> dict:
    """environment() without importing Triton (a CPU run may not have it): what the report recorded."""
    import datetime

    return {"device": report["device"], "date": datetime.date.today().isoformat(), "torch": report["torch"],
            "triton": None, "cuda": torch.version.cuda, "fourbit": report["fourbit_version"]}


def _fmt(m: dict | None, key: str = "mean", nd: int = 3) -> str:
    if not m or m.get(key) is None:
        return "n/a"
    v = m[key]
    if v == float("inf") or (m.get("name") == "PSNR" and m.get("n_inf") == m.get("n")):
        return "inf (identical)"
    return f"{v:.{nd}f} [{m['lo']:.{nd}f}, {m['hi']:.{nd}f}]"


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"### {s['model']}: {s['samples']} samples, {s['sampler']} {s['steps']} steps, eta {s['eta']}, "
             f"guidance {s['guidance_scale']} ({report['device']}, torch {report['torch']}, {report['date']})", "",
             "| variant | LPIPS vs fp16 | PSNR vs fp16 (dB) | SSIM | FD-Alex vs fp16 | FD-Alex vs data | bits/w | MiB | calib s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in report["variants"].items():
        lines.append(f"| {name} | {_fmt(r['lpips'])} | {_fmt(r['psnr'], nd=2)} | {_fmt(r['ssim'])} | "
                     f"{_fmt(r['fd_vs_fp16'], 'value', 1)} | {_fmt(r.get('fd_vs_data'), 'value', 1)} | "
                     f"{r['weight_bits_per_element']:.2f} | {r['model_bytes'] / 2**20:.2f} | {r['calibration_seconds']:.1f} |")
    notes = [n for n in report_notes(report) if not n.startswith("Times")]  # this table shows no sampling times
    return "\n".join(lines + [""] + [f"- {n}" for n in notes] if notes else lines)


def markdown_from_files(report_paths) -> str:
    """Rebuild the tables from saved report.json files."""
    return "\n\n".join(markdown(json.loads(Path(p).read_text())) for p in report_paths)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="fashion-dit,fashion-unet")
    p.add_argument("--variants", required=True)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--calib-samples", type=int, default=40)
    p.add_argument("--data-samples", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--fd-boot", type=int, default=100, help="bootstrap resamples of the FD intervals")
    p.add_argument("--device", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--results", default=RESULTS_DIR, help="folder of quality.jsonl ('' to append nothing)")
    args = p.parse_args(argv)
    out = Path(args.out)
    sections = []
    import datetime  # one run id for all models of this invocation
    run = next_run(str(Path(args.results) / "quality.jsonl"), datetime.date.today().isoformat()) if args.results else None
    for model in args.models.split(","):
        t0 = time.perf_counter()
        settings = CompareSettings(model=model, variants=tuple(args.variants.split(",")), samples=args.samples,
                                   steps=args.steps, eta=args.eta, calib_samples=args.calib_samples,
                                   data_samples=args.data_samples, batch_size=args.batch_size, device=args.device,
                                   fd_n_boot=args.fd_boot)
        report = run_compare(settings, out / model)
        sections.append(markdown(report))
        if args.results:
            meta = {**run_meta(_env(report)), "command": "python benchmarks/quality.py " + " ".join(argv or sys.argv[1:])}
            path, run = append_row(args.results, "quality", {"run": run, "model": model, "result": report,
                                                              "markdown": sections[-1]}, meta)
            print(f"[{model}: appended run {run} to {path}]", file=sys.stderr, flush=True)
        print(sections[-1], flush=True)
        print(f"[{model}: {time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)
    (out / "quality.md").write_text("\n\n".join(sections) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
