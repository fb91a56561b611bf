"""Shared by the benchmark scripts: timing with device events, environment facts, result rows.

Results are rows appended to ``benchmarks/results/<benchmark>.jsonl`` (``append_row`` / ``write_results``), each with
``meta`` = device, date, versions, git commit (``FOURBIT_GIT_COMMIT`` where git is absent) and the command line.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
from typing import Callable, Sequence

import torch

from fourbit.utils.timing import InterleavedGraphs, capture_graph  # noqa: F401  (used by the scripts)


def environment() -> dict:
    import triton

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {
        "device": dev,
        "date": _dt.date.today().isoformat(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "sm_count": torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 0,
    }


def device_slug(name: str) -> str:
    m = re.search(r"(H100|H200|H20|A100|L40S|L4|B200|GB200|RTX ?\d+)", name, re.I)
    return (m.group(1) if m else re.sub(r"\W+", "-", name)).replace(" ", "").lower()


RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def git_commit() -> str:
    """Short commit of this checkout: $FOURBIT_GIT_COMMIT if set (machines without git), else git, else "unknown"."""
    if os.environ.get("FOURBIT_GIT_COMMIT"):
        return os.environ["FOURBIT_GIT_COMMIT"]
    import subprocess

    try:
        res = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return res.stdout.strip() if res.returncode == 0 and res.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_meta(env: dict | None = None, command: str | None = None) -> dict:
    """A row's ``meta``: device, date, versions (``environment()``), git commit and the command line."""
    import sys

    cmd = command or "python " + " ".join([os.path.relpath(os.path.abspath(sys.argv[0]))] + sys.argv[1:])
    return {**(env or environment()), "git_commit": git_commit(), "command": cmd}


def next_run(path: str, date: str) -> str:
    """Run id for a new row: the date, then date + b, c, ... z, then za, zb, ... zz, zza, ... for later runs of that
    day (as the docs cite them; each later id sorts after the earlier ones)."""
    taken = set()
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    taken.add(json.loads(line).get("run"))
    if date not in taken:
        return date
    prefix = ""
    while True:
        for c in "bcdefghijklmnopqrstuvwxyz" if not prefix else "abcdefghijklmnopqrstuvwxyz":
            if f"{date}{prefix}{c}" not in taken:
                return f"{date}{prefix}{c}"
        prefix += "z"


def append_row(out_dir: str, benchmark: str, row: dict, meta: dict | None = None) -> tuple[str, str]:
    """Append one JSON row to ``<out_dir>/<benchmark>.jsonl`` with ``benchmark``, ``run`` and ``meta`` filled in.

    Returns (the file, the run id). One write of one line: an interrupted run leaves the earlier rows intact."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{benchmark}.jsonl")
    meta = meta or run_meta()
    row = {"benchmark": benchmark, "run": row.get("run") or next_run(path, meta["date"]), **row, "meta": meta}
    line = json.dumps(row) + "\n"
    with open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
    return path, row["run"]


def benchmark_of(stem: str) -> tuple[str, str | None]:
    """(benchmark, variant) of a result stem: the script whose name the stem starts with ("act_quant-lrmm" ->
    ("act_quant", "lrmm")); the stem itself when no script matches."""
    import glob

    here = os.path.dirname(os.path.abspath(__file__))
    scripts = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(here, "*.py"))
               + glob.glob(os.path.join(here, "probes", "*.py"))}
    norm = stem.replace("-", "_").replace(".", "_")
    for name in sorted(scripts, key=len, reverse=True):
        if norm == name or norm.startswith(name + "_"):
            return name, (stem[len(name) + 1:] or None)
    return norm, None


def write_results(out_dir: str, stem: str, env: dict, payload: dict, markdown: str) -> tuple[str, str]:
    """Append the run as one row (payload under ``result``, the printed table under ``markdown``) to the benchmark's
    JSONL file; returns (the file, "run <id>")."""
    benchmark, variant = benchmark_of(stem)
    path, run = append_row(out_dir, benchmark, {"variant": variant, "result": payload, "markdown": markdown},
                           run_meta(env))
    return path, f"run {run}"


def gpu_probe_args(doc: str, script: str, argv=None, rounds: int = 30):
    """The probe scripts' command line (--out, --rounds), or None (after saying why) without a CUDA GPU."""
    import argparse
    import sys

    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--out", default=RESULTS_DIR, help="folder of the <benchmark>.jsonl files")
    p.add_argument("--rounds", type=int, default=rounds, help="interleaved timing rounds")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"{script} needs a CUDA GPU", file=sys.stderr)
        return None
    return args


def finish(out_dir: str, stem: str, env: dict, payload: dict, markdown: str, log=print) -> int:
    """Write the result files, print the table and where it went; the script's exit status."""
    path, run = write_results(out_dir, stem, env, payload, markdown)
    log(markdown)
    log(f"appended {run} to {path}")
    return 0


def time_eager(fns: Sequence[Callable[[], object]], warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median ms per call with device events (triton's do_bench: L2 flushed before each call), rotating
    over ``fns`` (one closure per input set)."""
    from triton.testing import do_bench

    state = {"i": 0}

    def step():
        fn = fns[state["i"] % len(fns)]
        state["i"] += 1
        return fn()

    return float(do_bench(step, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def replay_median(g, calls: int, replays: int = 20) -> float:
    """Median ms per call over ``replays`` back-to-back replays of a captured graph of ``calls`` calls."""
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / calls)
    return float(statistics.median(times))


def time_graph(fns: Sequence[Callable[[], object]], replays: int = 20, min_calls: int = 12) -> float:
    """Median ms per call from CUDA-graph replays of several calls rotating over ``fns`` (no launch overhead;
    inputs rotate, so data larger than L2 comes from memory as in a real model)."""
    g, calls = capture_graph(fns, min_calls)
    ms = replay_median(g, calls, replays)
    del g
    return ms


class ClockSampler:
    """GPU SM clock (MHz), power (W) and temperature (C) read by ``nvidia-smi`` every ``period_ms`` from a background
    thread while the block runs (one query per sample: its looping mode buffers its output and loses it when
    stopped); ``summary`` gives mean / min / max of each, or {"error": why} without samples."""

    FIELDS = ("clocks.sm", "power.draw", "temperature.gpu")

    def __init__(self, period_ms: int = 50):
        self.period_ms = period_ms
        self.summary: dict = {}

    def _run(self, exe):
        import subprocess

        cmd = [exe, f"--id={self._index}", f"--query-gpu={','.join(self.FIELDS)}", "--format=csv,noheader,nounits"]
        while not self._stop.wait(self.period_ms / 1e3):
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=5)
                self._rows.append([float(p.strip()) for p in r.stdout.strip().split(",")])
            except (OSError, ValueError, subprocess.SubprocessError) as e:
                self._errors.append(f"{type(e).__name__}: {e}"[:200])

    def __enter__(self):
        import shutil
        import threading

        self._thread, self._rows, self._errors = None, [], []
        exe = shutil.which("nvidia-smi")
        if exe is None:
            self.summary = {"error": "nvidia-smi not found"}
            return self
        self._index = torch.cuda.current_device()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(exe,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread is None:
            return False
        self._stop.set()
        self._thread.join()
        rows = [r for r in self._rows if len(r) == len(self.FIELDS)]
        self.summary = {f: dict(mean=statistics.fmean(c), min=min(c), max=max(c), samples=len(c))
                        for f, c in zip(self.FIELDS, zip(*rows))} if rows else {}
        if not self.summary:
            self.summary = {"error": self._errors[0] if self._errors else "no samples"}
        return False


def scaled_fp8_operands(m: int, k: int, n: int, generator: torch.Generator) -> tuple:
    """A scaled FP8 GEMM's operands on the GPU, drawn from ``generator``: a (M, K) and b (N, K) small integers in
    e4m3 (exact), row scales a_scale (M,) in [0, 1e-3) and b_scale (N,) in [0, 1)."""
    a = torch.randint(-8, 8, (m, k), device="cuda", generator=generator).to(torch.float8_e4m3fn)
    b = torch.randint(-8, 8, (n, k), device="cuda", generator=generator).to(torch.float8_e4m3fn)
    sa = torch.rand(m, device="cuda", generator=generator) * 1e-3
    sb = torch.rand(n, device="cuda", generator=generator)
    return a, b, sa, sb


def geomean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x and x > 0 and math.isfinite(x)]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def md_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.3f}".rstrip("0").rstrip(".")
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def add_synthetic_branch(model, rank, seed=0, only=None):
    """Give every quantized layer (``only(layer)`` true, if given) random rank-r factors and smoothing factors (what
    SVDQuant would store), so the timed step runs the branch; the numerics are not those of a calibrated model."""
    from fourbit.nn import quantized_layers

    g = torch.Generator(device="cpu").manual_seed(seed)
    for _, layer in quantized_layers(model):
        if only is not None and not only(layer):
            continue
        kp, n = layer.padded_in, layer.out_features
        dev, dt = layer.weight_packed.device, layer.compute_dtype
        layer.smooth = (torch.rand(kp, generator=g) + 0.5).to(dev)
        layer.lr_down = (torch.randn(rank, kp, generator=g) / kp ** 0.5).to(dev, dt)
        layer.lr_up = (torch.randn(n, rank, generator=g) * 0.01).to(dev, dt)
        layer._cache = {}


KERNEL_CATEGORIES = [  # (category, regex over CUDA kernel names), first match wins
    ("fourbit act_quant", r"_act_(stats|quant|fused|given)_kernel|_few_rows_act_kernel"),
    ("fourbit GEMM", r"_(scaled|grouped)_gemm_kernel|_gemv_kernel"),
    ("fourbit fold_lr", r"_fold_lr_kernel"),
    ("fourbit weight expansion", r"_expand_kernel"),
    # inductor's generated kernels are named after the ops they fuse, e.g. the RoPE + layout work feeding SDPA is
    # "triton_red_fused__fused_rms_norm__scaled_dot_product_cudnn_attention_...": elementwise, not attention
    ("elementwise/norm/other", r"^triton_(poi|red|per)_"),
    ("attention", r"flash|fmha|attention|sdpa"),
    ("cuBLAS/other GEMM", r"gemm|sm90_xmma|nvjet|cutlass|cublas"),  # also the FP8 peer's and cuBLAS backend's
    ("elementwise/norm/other", r"."),
]
KERNEL_CATEGORY_NAMES = ("fourbit act_quant", "fourbit GEMM", "fourbit fold_lr", "fourbit weight expansion",
                         "attention", "cuBLAS/other GEMM", "elementwise/norm/other")  # the tables' column order
assert set(KERNEL_CATEGORY_NAMES) == {c for c, _ in KERNEL_CATEGORIES}, "a kernel category without a column"


def profile_step(model, inputs: dict, top=None) -> dict:
    """CUDA time of one step ``model(**inputs)`` by kernel category (ms; one warm call first), from
    torch.profiler. ``top``: a list that receives the 20 kernels with the most CUDA time, as (name, ms, calls)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        model(**inputs)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(**inputs)
            torch.cuda.synchronize()
    out = dict.fromkeys(KERNEL_CATEGORY_NAMES, 0.0)
    kernels = []
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0.0)
        if not us or ev.key.startswith(("ProfilerStep", "cudaDeviceSynchronize")):
            continue
        kernels.append((ev.key[:90], round(us / 1e3, 3), ev.count))
        for cat, rx in KERNEL_CATEGORIES:
            if re.search(rx, ev.key, re.I):
                out[cat] += us / 1e3
                break
    if top is not None:
        top.extend(sorted(kernels, key=lambda t: -t[1])[:20])
    return out
