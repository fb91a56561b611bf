"""The linear layers of one FLUX.1 step at 1024x1024, shape by shape: where W4A4 gains or loses against bf16.

    python benchmarks/probes/step_shapes.py            # H100/H200; appends a row to benchmarks/results/step_shapes.jsonl

The FLUX.1 transformer (siblings fused as ``fourbit.fuse_siblings`` fuses them; batch 1, 4096 image + 512 text
tokens) runs its linear layers at a dozen shapes: the image stream of the 19 double blocks at M = 4096, their
text stream at M = 512, the 38 single blocks at M = 4608, and the adaLN modulation linears at M = 1. For each
shape: bf16 ``F.linear``, cuBLAS FP8 rowwise (GEMM only), act_quant alone, the int4p2 W4A4 rank-32 layer end to
end with the default GEMM tiles and with candidate tiles (the small-M shapes), and without its branch; at
M <= ``GemvConfig.max_m`` the default is the GEMV on the packed weight (``fourbit.kernels.gemv``), shown beside
act_quant + GEMM and other GEMV tiles (``--few-rows 2,4,8`` adds the adaLN shapes at those M). Times are
medians of CUDA-graph replays, all variants of a shape replayed in turn (``_util.InterleavedGraphs``); calls
rotate over several layers (different weights) and inputs, so weights and activations come from memory as in
the real step, where every layer's weights are read once. The step totals weigh each shape by its count.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/_util.py
from _util import RESULTS_DIR, InterleavedGraphs, environment, md_table, write_results  # noqa: E402
from linear import L2_BYTES, make_layer  # noqa: E402

#: (name, M, K, N, layers per step) for FLUX.1 at 1024x1024 with sibling linears fused (Q/K/V -> one; the single
#: blocks' Q/K/V + MLP-in -> one). The embedders, norm_out and proj_out (one each, < 1% of the FLOPs) are left out.
STEP_SHAPES = [
    ("double img qkv", 4096, 3072, 9216, 19),
    ("double img attn-out", 4096, 3072, 3072, 19),
    ("double img ff-in", 4096, 3072, 12288, 19),
    ("double img ff-out", 4096, 12288, 3072, 19),
    ("double txt qkv", 512, 3072, 9216, 19),
    ("double txt attn-out", 512, 3072, 3072, 19),
    ("double txt ff-in", 512, 3072, 12288, 19),
    ("double txt ff-out", 512, 12288, 3072, 19),
    ("double adaLN (img, txt)", 1, 3072, 18432, 38),
    ("single qkv+mlp-in", 4608, 3072, 21504, 38),
    ("single out", 4608, 15360, 3072, 38),
    ("single adaLN", 1, 3072, 9216, 38),
]
RANK = 32
#: (the split pass's tile candidates went with the split pass: removed from the library, see docs/kernels.md)


def gemm_candidates(m):
    """GEMM tile configs tried beside the default at small M (fewer output tiles than SMs at 128 x 256)."""
    from fourbit.kernels.gemm import GemmConfig

    if m > 1024:
        return {}
    return {
        "128x128 w8 s4": GemmConfig(128, 128, 128, 8, 8, 4, True, tma_store=True),
        "64x256 w4 s3": GemmConfig(64, 256, 128, 8, 4, 3, True, tma_store=True),
        "64x128 w4 s4": GemmConfig(64, 128, 128, 8, 4, 4, True, tma_store=True),
        "64x128x256 w4 s3": GemmConfig(64, 128, 256, 8, 4, 3, True, tma_store=True),
        "64x64x256 w4 s4": GemmConfig(64, 64, 256, 8, 4, 4, True, tma_store=True),
        "64x128 w4 s4 grid": GemmConfig(64, 128, 128, 8, 4, 4, False, tma_store=True),
    }


#: few-row GEMV configs tried beside the default (GemvConfig fields)
GEMV_CANDIDATES = {
    "16x256 w4": dict(BN=16, BK=256, warps=4),
    "32x256 w4": dict(BN=32, BK=256, warps=4),
    "16x512 w8": dict(BN=16, BK=512, warps=8),
    "8x256 w4": dict(BN=8, BK=256, warps=4),
    "32x128 w4": dict(BN=32, BK=128, warps=4),
    "16x128 w2": dict(BN=16, BK=128, warps=2),
    "64x256 w8": dict(BN=64, BK=256, warps=8),
    "64x512 w8": dict(BN=64, BK=512, warps=8),
    "act 4 programs": dict(act_programs=4),
    "act 16 programs": dict(act_programs=16),
}


def with_defaults(module, attr, fn, *args, **overrides):
    """fn(*args) with ``module.attr`` (a default config dataclass) changed by ``overrides``; the kernels read it
    when called, so a CUDA graph captured through this keeps the change."""
    old = getattr(module, attr)
    setattr(module, attr, dataclasses.replace(old, **overrides))
    try:
        return fn(*args)
    finally:
        setattr(module, attr, old)


def bench(name, m, k, n, count, log):
    from fourbit.kernels.act_quant import act_quant
    from fourbit.kernels.linear import layer_state, linear_forward

    # enough layer copies that their fp8 weights exceed L2 twice; inputs likewise (at least 2 of each)
    n_layers = max(2, min(12, -(-2 * L2_BYTES // (n * k))))
    n_inputs = max(2, min(12, -(-2 * L2_BYTES // (m * k * 2))))
    layers = [make_layer(k, n, "int4p2", "int4p2", rank=RANK, seed=s) for s in range(n_layers)]
    xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(n_inputs)]
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5 for _ in range(n_layers)]
    bs = [torch.randn(n, device="cuda", dtype=torch.bfloat16) * 0.1 for _ in range(n_layers)]
    calls = max(12, n_layers * n_inputs if n_layers * n_inputs <= 48 else max(n_layers, n_inputs))
    pairs = [(i % n_layers, i % n_inputs) for i in range(calls)]

    w8 = [(w.float().abs().amax(1, keepdim=True) / 448).clamp_min(1e-12) for w in ws]
    wq = [(w.float() / s).to(torch.float8_e4m3fn) for w, s in zip(ws, w8)]
    x8 = [(x.float().abs().amax(1, keepdim=True) / 448).clamp_min(1e-12) for x in xs]
    xq = [(x.float() / s).to(torch.float8_e4m3fn) for x, s in zip(xs, x8)]
    for layer in layers:
        layer_state(layer)
    variants = {
        "bf16 F.linear": lambda li, xi: F.linear(xs[xi], ws[li], bs[li]),
        "fp8 cuBLAS GEMM only": lambda li, xi: torch._scaled_mm(xq[xi], wq[li].t(), scale_a=x8[xi],
                                                                 scale_b=w8[li].t(), out_dtype=torch.bfloat16),
        "act_quant only": lambda li, xi: act_quant(
            xs[xi], layers[li].act_format, padded_in=layers[li].padded_in,
            down_folded=layer_state(layers[li]).down_folded, smooth_recip=layer_state(layers[li]).smooth_recip,
            down_cat=layer_state(layers[li]).down_cat),
        "W4A4 r32 (default tiles)": lambda li, xi: linear_forward(layers[li], xs[xi]),
        "W4A4 no branch": lambda li, xi: linear_forward(layers[li], xs[xi], lowrank="none"),
    }
    from fourbit.kernels import gemv as gv

    if m <= 16:  # few rows: the GEMV (the default up to max_m) and act_quant + GEMM, each forced
        variants["W4A4 r32, act_quant + GEMM"] = lambda li, xi: with_defaults(
            gv, "DEFAULT_GEMV", variants["W4A4 r32 (default tiles)"], li, xi, max_m=0)
        for label, kw in {"default": {}, **GEMV_CANDIDATES}.items():
            variants[f"W4A4 r32, GEMV {label}"] = lambda li, xi, kw=kw: with_defaults(
                gv, "DEFAULT_GEMV", variants["W4A4 r32 (default tiles)"], li, xi, **dict(kw, max_m=16))
    for label, cfg in (gemm_candidates(m) if m > gv.DEFAULT_GEMV.max_m else {}).items():
        variants[f"W4A4 r32, GEMM {label}"] = lambda li, xi, cfg=cfg: linear_forward(layers[li], xs[xi],
                                                                                     gemm_config=cfg)
    ref = variants["W4A4 r32 (default tiles)"](0, 0)
    graphs, names, rows = InterleavedGraphs(min_calls=calls), [], []
    for vname, fn in variants.items():
        try:
            if vname.startswith("W4A4 r32,"):
                y = fn(0, 0)
                diff = float((y.float() - ref.float()).norm() / ref.float().norm())
                if diff > 1e-2:  # same operands, other tiles / act path: only summation order may differ
                    raise AssertionError(f"output differs from the default path's by {diff:.2e}")
            graphs.add([lambda li=li, xi=xi, fn=fn: fn(li, xi) for li, xi in pairs])
            names.append(vname)
        except Exception as e:  # a config that does not compile or fit: reported, not fatal
            log(f"  {name} {vname}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    for vname, t in zip(names, graphs.run()):
        rows.append(dict(shape=name, M=m, K=k, N=n, count=count, variant=vname, ms=t))
        log(f"  {name:24s} {vname:32s} {t:.4f} ms")
    del layers, xs, ws, wq, xq
    torch.cuda.empty_cache()
    return rows


def summarize(rows):
    shapes = []
    for r in rows:
        if r["shape"] not in shapes:
            shapes.append(r["shape"])
    table, tot = [], {"bf16": 0.0, "default": 0.0, "best": 0.0, "fp8": 0.0, "act": 0.0, "none": 0.0}
    for s in shapes:
        d = {r["variant"]: r for r in rows if r["shape"] == s}
        base, cnt = d["bf16 F.linear"], d["bf16 F.linear"]["count"]
        dflt = d.get("W4A4 r32 (default tiles)")
        if dflt is None:
            continue
        cands = {v: r for v, r in d.items() if v.startswith("W4A4 r32")}
        best_v, best = min(cands.items(), key=lambda vr: vr[1]["ms"])
        fp8 = d.get("fp8 cuBLAS GEMM only", {}).get("ms", float("nan"))
        act = d.get("act_quant only", {}).get("ms", float("nan"))
        none = d.get("W4A4 no branch", {}).get("ms", float("nan"))
        table.append([s, f"{base['M']}x{base['K']}x{base['N']}", cnt, base["ms"], fp8, act, none, dflt["ms"],
                      base["ms"] / dflt["ms"], best_v.replace("W4A4 r32, GEMM ", "").replace("W4A4 r32 ", ""),
                      base["ms"] / best["ms"]])
        for key, v in (("bf16", base["ms"]), ("default", dflt["ms"]), ("best", best["ms"]), ("fp8", fp8),
                       ("act", act), ("none", none)):
            tot[key] += cnt * v
    return table, tot


def markdown(rows):
    table, tot = summarize(rows)
    hdr = ["layer", "M x K x N", "per step", "bf16 ms", "fp8 cuBLAS GEMM ms", "act_quant ms", "W4A4 no branch ms",
           "W4A4 r32 ms", "speed-up", "best tiles", "speed-up (best)"]
    out = ["## FLUX.1 step at 1024x1024: its linear layers shape by shape (CUDA-graph time, interleaved)\n",
           md_table(hdr, table),
           "\nPer step (time x count, summed over the shapes above), ms:\n",
           md_table(["bf16", "fp8 cuBLAS GEMM only", "act_quant", "W4A4 no branch", "W4A4 r32 default tiles",
                     "W4A4 r32 best tiles", "speed-up default", "speed-up best"],
                    [[tot["bf16"], tot["fp8"], tot["act"], tot["none"], tot["default"], tot["best"],
                      tot["bf16"] / tot["default"], tot["bf16"] / tot["best"]]])]
    return "\n".join(out), tot


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=RESULTS_DIR)
    p.add_argument("--only", default=None, help="comma list of substrings: only the shapes whose name has one")
    p.add_argument("--few-rows", default="", help="comma list of M: also time the adaLN shapes at these row "
                   "counts (batch > 1; not counted in the step totals)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("step_shapes.py needs a CUDA GPU")
    torch.manual_seed(0)
    env = environment()
    log = lambda s: print(s, flush=True)  # noqa: E731
    log(json.dumps(env))
    shapes = STEP_SHAPES
    if args.only:
        keys = args.only.split(",")
        shapes = [s for s in shapes if any(k in s[0] for k in keys)]
    for extra in [int(v) for v in args.few_rows.split(",") if v]:
        shapes = shapes + [(f"{name} M={extra}", extra, k, n, 0) for name, m, k, n, _ in STEP_SHAPES if m == 1]
    rows, t0 = [], time.time()
    for name, m, k, n, count in shapes:
        log(f"{name}: M={m} K={k} N={n} x{count}")
        rows += bench(name, m, k, n, count, log)
        md, tot = markdown(rows)  # written after every shape: a run cut short keeps what it measured
        jp, mp = write_results(args.out, "step-shapes", env, {"rows": rows, "totals_ms": tot}, md)
    log(md)
    log(f"took {time.time() - t0:.0f}s; wrote {jp} and {mp}")


if __name__ == "__main__":
    main()
