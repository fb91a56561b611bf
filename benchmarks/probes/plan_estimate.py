"""What a precision plan would give, estimated from committed per-layer measurements (no GPU needed).

    python benchmarks/probes/plan_estimate.py                   # linear.jsonl run 2026-12-04b (H200)
    python benchmarks/probes/plan_estimate.py --run 2026-12-04  # the run with SANA's shapes (Triton GEMM only)

For each family, one repeated block's linears (``BLOCK_LAYERS``: how many of each measured (M, K, N) one block calls)
are summed in bf16, all in W4A4 (int4p2 + rank-32 branch; Triton GEMM, and the cuBLAS backend from 2048 rows as
``set_gemm_backend("cublas")`` runs it) and planned as ``fourbit.plan_precision`` would plan them (a shape keeps
W4A4 where it measured at least as fast as bf16, else bf16), on one backend or, as ``kernels=("triton",
"triton-cublas")`` plans, on the faster of the two per shape ("planned, per layer"). Per-layer sums of isolated CUDA-graph timings: an
estimate of the linears' share of a step, not a step measurement (``benchmarks/models.py`` measures steps). Shapes a
block calls that the run did not measure are listed, not guessed.

Then, from ``models.jsonl``: a whole step estimated as the measured bf16 step with every block's linears replaced by
a sum (bf16 step + blocks x (sum - bf16 sum)), beside the measured step of the all-W4A4 variants as a check of the
estimate (run 2026-12-04b against steps d-f: within 0.1-2.3%).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from _util import md_table  # noqa: E402

#: per family, (M, K, N) -> how many such linears one repeated block runs (siblings fused as fourbit fuses them)
BLOCK_LAYERS = {
    "pixart-sigma": {  # BasicTransformerBlock, batch 2 x 4096 image tokens, 2 x 300 text tokens
        (8192, 1152, 3456): 1,  # self-attention Q/K/V (fused)
        (8192, 1152, 1152): 3,  # self-attention out, cross-attention Q, cross-attention out
        (600, 1152, 2304): 1,  # cross-attention K/V of the text (fused)
        (8192, 1152, 4608): 1,  # MLP in (GELU)
        (8192, 4608, 1152): 1,  # MLP out
    },
    "sd3-medium": {  # JointTransformerBlock, batch 2 x 4096 image tokens, 2 x 333 text tokens
        (8192, 1536, 4608): 1,  # image Q/K/V (fused)
        (8192, 1536, 1536): 1,  # image attention out
        (8192, 1536, 6144): 1,  # image MLP in
        (8192, 6144, 1536): 1,  # image MLP out
        (666, 1536, 4608): 1,  # text Q/K/V (fused)
        (666, 1536, 1536): 1,  # text attention out (not in the measured set)
        (666, 1536, 6144): 1,  # text MLP in
        (666, 6144, 1536): 1,  # text MLP out
    },
    "sana-1.6b": {  # SanaTransformerBlock, batch 2 x 1024 tokens, 2 x 300 text tokens
        (2048, 2240, 6720): 1,  # linear attention Q/K/V (fused)
        (2048, 2240, 2240): 3,  # attention out, cross-attention Q, cross-attention out
        (600, 2240, 4480): 1,  # cross-attention K/V (fused)
        (2048, 2240, 11200): 1,  # GLUMBConv inverted 1x1 conv
        (2048, 5600, 2240): 1,  # GLUMBConv point 1x1 conv
    },
}
CUBLAS_MIN_ROWS = 2048  # gemm_cublas.CUBLAS_MIN_ROWS: fewer rows keep the Triton GEMM


def load_rows(path: str, run: str) -> dict:
    """{(M, K, N): {(format, variant): graph ms}} of one linear.jsonl run."""
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    hits = [r for r in rows if r.get("run") == run]
    if not hits:
        raise SystemExit(f"{path}: no run {run!r} (runs: {', '.join(sorted({r.get('run', '?') for r in rows}))})")
    out: dict = {}
    for r in hits:
        for x in r["result"]["rows"]:
            out.setdefault((x["M"], x["K"], x["N"]), {})[(x["format"], x["variant"])] = x["graph_ms"]
    return out


def estimate(block: dict, times: dict) -> dict:
    """Per-block microseconds of the measured shapes: bf16, W4A4 (Triton / cuBLAS backend) and planned."""
    sums = {k: 0.0 for k in ("bf16", "W4A4 Triton", "W4A4 cuBLAS", "planned Triton", "planned cuBLAS",
                             "planned per layer")}
    chosen: dict = {"planned Triton": 0, "planned cuBLAS": 0, "planned per layer": 0}
    layers, missing = 0, []
    for shape, count in block.items():
        t = times.get(shape, {})
        bf16, tri = t.get(("bf16 nn.Linear", "-")), t.get(("int4p2 W4A4", "fused"))
        if bf16 is None or tri is None:
            missing.append(shape)
            continue
        cub = t.get(("int4p2 W4A4", "gemm-cublas")) if shape[0] >= CUBLAS_MIN_ROWS else tri
        layers += count
        sums["bf16"] += count * bf16 * 1e3
        sums["W4A4 Triton"] += count * tri * 1e3
        best = min(tri, cub) if cub is not None else tri
        for name, w4 in (("Triton", tri), ("cuBLAS", cub), ("per layer", best)):
            if w4 is None:
                sums[f"planned {name}"] = float("nan")
                if name == "cuBLAS":
                    sums["W4A4 cuBLAS"] = float("nan")
                continue
            if name == "cuBLAS":
                sums["W4A4 cuBLAS"] += count * w4 * 1e3
            keep4 = bf16 / w4 >= 1.0
            sums[f"planned {name}"] += count * (w4 if keep4 else bf16) * 1e3
            chosen[f"planned {name}"] += count if keep4 else 0
    return dict(us=sums, four_bit=chosen, layers=layers, missing=missing)


#: the per-block sums that correspond to a measured models.py variant (all layers W4A4 on one backend)
STEP_VARIANTS = {"W4A4 Triton": "fourbit-w4a4", "W4A4 cuBLAS": "fourbit-w4a4-cublas"}


def load_steps(path: str, runs=None) -> dict:
    """{family: the newest models.jsonl row of it (variants' step_ms, blocks, run)} for rows with a bf16 step, of
    ``runs`` only if given."""
    out: dict = {}
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            if runs is not None and r.get("run") not in runs:
                continue
            res = r.get("result", r)
            for row in res.get("rows", [res]):
                if row.get("variants", {}).get("bf16", {}).get("step_ms"):
                    out[row["model"]] = dict(row, run=r.get("run"))
    return out


def step_estimate(e: dict, row: dict) -> dict:
    """A step's ms with one block's linears replaced, per sum of ``estimate``: bf16 step + blocks x (sum - bf16 sum),
    and beside it the measured step of the variant that sum describes (``STEP_VARIANTS``), where there is one."""
    us, blocks, variants = e["us"], row["blocks"], row["variants"]
    bf16 = variants["bf16"]["step_ms"]
    out = {}
    for k, v in us.items():
        if k == "bf16" or v != v:
            continue
        measured = variants.get(STEP_VARIANTS.get(k, ""), {}).get("step_ms")
        out[k] = dict(predicted=bf16 + blocks * (v - us["bf16"]) / 1e3, measured=measured)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=os.path.join(os.path.dirname(HERE), "results", "linear.jsonl"))
    p.add_argument("--steps", default=os.path.join(os.path.dirname(HERE), "results", "models.jsonl"),
                   help="models.jsonl: whole steps, to turn per-block sums into step estimates ('' to skip)")
    p.add_argument("--run", default="2026-12-04b")
    p.add_argument("--step-runs", default="2026-12-04d,2026-12-04e,2026-12-04f",
                   help="models.jsonl runs whose steps the estimates start from (the steps of the per-layer run's time)")
    args = p.parse_args(argv)
    times = load_rows(args.results, args.run)
    steps = load_steps(args.steps, set(args.step_runs.split(","))) if args.steps else {}
    table, step_table = [], []
    for family, block in BLOCK_LAYERS.items():
        e = estimate(block, times)
        if not e["layers"]:
            print(f"{family}: no shape of its block in run {args.run}")
            continue
        if family in steps:
            row = steps[family]
            bf16, peer = row["variants"]["bf16"]["step_ms"], row["variants"].get("fp8-peer", {}).get("step_ms")
            for k, v in step_estimate(e, row).items():
                measured = "-" if v["measured"] is None else f"{v['measured']:.2f} ({bf16 / v['measured']:.2f}x)"
                step_table.append([family, k, f"{bf16:.2f}", f"{v['predicted']:.2f} ({bf16 / v['predicted']:.2f}x)",
                                   measured, "-" if peer is None else f"{bf16 / peer:.2f}x",
                                   f"{row['run']}, {row['blocks']} blocks"])
        us = e["us"]
        cells = [family, f"{e['layers']}", f"{us['bf16']:.0f}"]
        for k in ("W4A4 Triton", "W4A4 cuBLAS", "planned Triton", "planned cuBLAS", "planned per layer"):
            v = us[k]
            extra = f", {e['four_bit'][k]} in 4 bits" if k in e["four_bit"] and v == v else ""
            cells.append("-" if v != v else f"{v:.0f} ({us['bf16'] / v:.2f}x{extra})")
        cells.append(", ".join(f"{m}x{k}x{n}" for m, k, n in e["missing"]) or "-")
        table.append(cells)
    print(f"linear.jsonl run {args.run}: one block's linears, us (speed vs bf16); per-layer sums, not a step\n")
    print(md_table(["family", "layers summed", "bf16", "all W4A4, Triton", "all W4A4, cuBLAS >= 2048 rows",
                    "planned, Triton", "planned, cuBLAS", "planned, faster GEMM per layer",
                    "not measured (left out)"], table))
    if step_table:
        print(f"\nwhole step, estimated: the measured bf16 step with each block's linears replaced by the sums above "
              f"(models.jsonl; other runs than the per-layer one, same GPU kind); where a measured step of that "
              f"variant exists it is beside, as a check of the estimate\n")
        print(md_table(["family", "linears", "bf16 step ms (measured)", "estimated step ms", "measured step ms",
                        "FP8 peer (measured)", "step run"], step_table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
