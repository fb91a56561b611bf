"""One-off migration (2026-12): the per-run result files of benchmarks/results/ become rows of one JSONL file per
benchmark (``benchmarks/results/<benchmark>.jsonl``), same-seed grid PNGs move to ``benchmarks/results/grids/``.

Each row: {"benchmark", "run" (date + run letter, as the docs cite it), "variant" (the old file's sub-name or null),
"model" (for per-model reports), "source" (the old path), "meta" {device, date, torch, triton, cuda, ...,
"git_commit": null, "command": null} (not recorded then), "result" (the old JSON payload), "markdown", "log"}.
Nothing is dropped but the HTML reports, whose table is the row's "result" and whose picture is the grid PNG.

    python scripts/consolidate_results.py benchmarks/results      # rewrites the folder in place; prints the index
"""
from __future__ import annotations

import json
import re
import shutil
import sys
from collections import defaultdict
from pathlib import Path

# old name -> (benchmark file, variant)
NAMES = {
    "accum-probe": ("accum_probe", None), "act_quant": ("act_quant", None), "act_quant-lrmm": ("act_quant", "lrmm"),
    "act_quant-probe": ("act_quant", "probe"), "bound-probe": ("bound_probe", None),
    "branch-probe": ("branch_probe", None), "epilogue-probe": ("epilogue_probe", None),
    "expand-probe": ("expand_probe", None), "expand-probe-before": ("expand_probe", "before"),
    "gpu-tests": ("gpu_tests", None), "host-overhead": ("host_overhead", None),
    "kernel-quality": ("kernel_quality", None), "linear": ("linear", None),
    "linear-diagnosis": ("linear", "diagnosis"), "linear-quartz": ("linear", "quartz"),
    "pipeline-probe": ("pipeline_probe", None), "ptqd-explore": ("ptqd_explore", None), "ptqd": ("ptqd_ablation", None),
    "quality": ("quality", None), "quality-policy-paper": ("quality", "policy-paper"),
    "quality-quartz": ("quality", "quartz"), "quality-quartz-token": ("quality", "quartz-token"),
    "quartz-activations": ("quartz_activations", None), "step-shapes": ("step_shapes", None),
    "step-shapes-gemv": ("step_shapes", "gemv"), "step-shapes-split": ("step_shapes", "split"),
    "transformer": ("transformer", None), "transformer-siblings": ("transformer", "siblings"),
    "tune_act": ("linear_tune", "act"), "tune_gemm": ("linear_tune", "gemm"),
}
_STEM = re.compile(r"^(?P<name>.+?)\.(?P<dev>h100|h200|cpu)\.(?P<run>\d{4}-\d\d-\d\d[a-z]?)$")
_MD_DEVICE = re.compile(r"device: (?P<device>[^|]+) \| date: (?P<date>\S+) \| torch (?P<torch>\S+) \| "
                        r"triton (?P<triton>\S+) \| CUDA (?P<cuda>\S+)")
_DEVICES = {"h100": "NVIDIA H100 80GB HBM3", "h200": "NVIDIA H200", "cpu": "cpu"}


def _meta(env: dict | None, dev: str, run: str, md: str | None) -> dict:
    meta = {"device": _DEVICES[dev], "date": run[:10], "torch": None, "triton": None, "cuda": None}  # None: not recorded
    if md and (m := _MD_DEVICE.search(md)):
        meta.update({k: v.strip() for k, v in m.groupdict().items()})
    if env:
        meta.update(env)
    return {**meta, "git_commit": None, "command": None}


def _text(p: Path) -> str | None:
    return p.read_text() if p.exists() else None


def _report_env(result: dict) -> dict:
    return {k: result[k] for k in ("device", "torch", "fourbit_version") if k in result}


def convert(root: Path) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = defaultdict(list)
    grids = root / "grids"
    flat = defaultdict(dict)  # stem -> {ext: path}
    for p in sorted(root.iterdir()):
        if p.is_file() and p.suffix in (".json", ".md", ".log"):
            flat[p.name[: -len(p.suffix)]][p.suffix] = p
    for stem, files in flat.items():
        m = _STEM.match(stem)
        if not m:
            raise SystemExit(f"unrecognised result file name {stem!r}: add it to NAMES")
        bench, variant = NAMES[m["name"]]
        payload = json.loads(files[".json"].read_text()) if ".json" in files else None
        env = payload.pop("environment", None) if isinstance(payload, dict) else None
        md = _text(files[".md"]) if ".md" in files else None
        row = {"benchmark": bench, "run": m["run"], "variant": variant, "model": None,
               "source": sorted(f"benchmarks/results/{f.name}" for f in files.values()),
               "meta": _meta(env, m["dev"], m["run"], md), "result": payload, "markdown": md,
               "log": _text(files[".log"]) if ".log" in files else None}
        rows[bench].append(row)
    for d in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "grids"):
        m = _STEM.match(d.name)
        bench, variant = NAMES[m["name"]]
        subs = sorted({p.parent for p in d.rglob("*") if p.is_file()})
        for sub in subs:
            model = None if sub == d else sub.relative_to(d).as_posix()
            jsons = sorted(sub.glob("*.json"))
            result = {j.stem: json.loads(j.read_text()) for j in jsons}
            if len(result) == 1:
                result = next(iter(result.values()))
            mds = {p.name: p.read_text() for p in sorted(sub.glob("*.md"))}
            logs = {p.name: p.read_text() for p in sorted(sub.glob("*.log")) + sorted(sub.glob("*.txt"))}
            env = _report_env(result) if isinstance(result, dict) and "device" in result else None
            pngs = []
            for png in sorted(sub.glob("*.png")):
                dest = grids / d.name / (model or "") / png.name
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(png, dest)
                pngs.append(dest.relative_to(root.parent.parent).as_posix())
            row = {"benchmark": bench, "run": m["run"], "variant": variant, "model": model,
                   "source": sorted(f"benchmarks/results/{p.relative_to(root).as_posix()}" for p in sub.iterdir()
                                    if p.is_file()),
                   "meta": _meta(env, m["dev"], m["run"], None), "result": result or None,
                   "markdown": "\n\n".join(f"<!-- {k} -->\n{v}" for k, v in mds.items()) or None,
                   "log": "\n\n".join(f"==> {k} <==\n{v}" for k, v in logs.items()) or None, "grids": pngs}
            rows[bench].append(row)
    return rows


def main(root: str) -> None:
    root = Path(root).resolve()
    rows = convert(root)
    for bench, rs in rows.items():
        rs.sort(key=lambda r: (r["run"], r["variant"] or "", r["model"] or ""))
        with open(root / f"{bench}.jsonl", "a") as f:
            for r in rs:
                f.write(json.dumps(r, sort_keys=False) + "\n")
    for p in list(root.iterdir()):  # the old files, now rows
        if p.name == "grids" or p.suffix == ".jsonl" or p.name == "README.md":
            continue
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    for bench, rs in sorted(rows.items()):
        runs = sorted({r["run"] + (" (" + r["variant"] + ")" if r["variant"] else "") for r in rs})
        print(f"{bench}: {len(rs)} rows: " + ", ".join(runs))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results")
