"""Per-layer benchmark at FLUX.1 linear shapes: bf16 nn.Linear vs FP8 cuBLAS vs every fourbit W4A4/W8A8 path.

    python benchmarks/linear.py                 # full run, writes benchmarks/results/linear.<device>.<date>.*
    python benchmarks/linear.py --tune          # sweep kernel tile configs first (prints and saves the sweep)
    python benchmarks/linear.py --quick         # two shapes, fewer variants (smoke test)

Each fourbit variant runs a whole quantized layer end to end: activation quantization (smoothing, dynamic
per-token quantization, the rank-32 down-projection) + GEMM (+ the up-projection and bias in its epilogue),
from a bf16 input to a bf16 output. Variants: "fused" (speed mode: fp8 weight cached), "memory" (4-bit
weight expanded before each GEMM), "unfused" (branch as two separate torch GEMMs), "none" (no branch:
the cost floor the branch is compared with), "cublas" (act_quant + torch._scaled_mm rowwise, branch unfused).
Beside them: bf16 nn.Linear, the FP8 cuBLAS GEMM alone (the ceiling) and a "separate-pass bound" (X cast to FP8 +
that GEMM: the least a layer that quantizes X in a pass of its own can cost).
Error: relative Frobenius error against ``quant_linear_reference`` (fp32) on the same layer and input.
Timing: CUDA-graph replays of 12+ calls rotating over inputs larger than L2 ("graph", GPU time, the primary
number; all variants of a shape captured, then replayed in turn for 20 rounds, median per variant, so clock
drift touches them alike), and triton's do_bench with an L2 flush before each call ("eager", includes Python
launch overhead where it exceeds GPU time).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import InterleavedGraphs, environment, geomean, md_table, time_eager, time_graph, write_results  # noqa: E402

SHAPES = [(3072, 3072), (3072, 9216), (3072, 12288), (12288, 3072), (3072, 21504), (15360, 3072)]  # (K, N)
TOKENS = (4608, 1024)
RANK = 32
#: (label, weight format, activation format, variants)
FORMATS = [
    ("int4p2 W4A4", "int4p2", "int4p2", ("fused", "memory", "unfused", "none", "cublas", "cublas-none")),
    ("fp4p2 W4A4", "fp4p2", "fp4p2", ("fused", "memory", "none")),
    ("int8 W8A8", "int8", "int8", ("fused", "unfused", "none")),
    ("int4 g64 W4A4 (paper)", "int4", "int4", ("fused", "none")),
    ("fp4 g32 W4A4 (paper)", "fp4", "fp4", ("fused", "none")),
    ("nvfp4 W4A4", "nvfp4", "nvfp4", ("fused", "none")),
    ("mxfp4 W4A4", "mxfp4", "mxfp4", ("fused", "none")),
]
#: the QuaRTZ activation path (per-token stage 1: FP8-exact) beside the int4p2 path it competes with
QUARTZ_FORMATS = [
    ("int4p2 W4A4", "int4p2", "int4p2", ("fused", "none", "cublas", "cublas-none")),
    ("QuaRTZ tok x int4p2 W4A4", "int4p2", "quartz_tok", ("quartz-cublas", "quartz-cublas-none")),
]
#: each model family's own layer shapes (M, K, N) at 1024x1024 and its batch (``benchmarks/models.py``), sibling
#: linears fused (Q/K/V as one layer); M: image tokens x batch, or text tokens x batch for the context layers
FAMILY_SHAPES = {
    "pixart-sigma": [(8192, 1152, 3456), (8192, 1152, 1152), (600, 1152, 2304), (8192, 1152, 4608),
                     (8192, 4608, 1152)],
    "sd3-medium": [(8192, 1536, 4608), (8192, 1536, 1536), (8192, 1536, 6144), (8192, 6144, 1536),
                   (666, 1536, 4608), (666, 1536, 6144), (666, 6144, 1536)],
    "sana-1.6b": [(2048, 2240, 6720), (2048, 2240, 2240), (600, 2240, 4480), (2048, 2240, 11200),
                  (2048, 5600, 2240)],
    "sdxl-unet": [(8192, 640, 1920), (8192, 640, 640), (8192, 640, 5120), (8192, 2560, 640), (154, 2048, 1280),
                  (2048, 1280, 3840), (2048, 1280, 1280), (2048, 1280, 10240), (2048, 5120, 1280),
                  (154, 2048, 2560)],
    "flux": [(4096, 3072, 9216), (4096, 3072, 3072), (4096, 3072, 12288), (4096, 12288, 3072), (512, 3072, 9216),
             (512, 3072, 3072), (512, 3072, 12288), (512, 12288, 3072), (4608, 3072, 21504), (4608, 15360, 3072)],
}
#: each family's conditioning linears at the batch (M = 2 with classifier-free guidance, 1 for FLUX.1-dev): the
#: adaLN modulations (SD3 and FLUX per block; PixArt and SANA once per step), the timestep / pooled-text embedders
#: and the SDXL resnets' time projections
FAMILY_FEW_ROWS = {
    "pixart-sigma": [(2, 1152, 6912), (2, 1152, 1152)],
    "sd3-medium": [(2, 1536, 9216), (2, 1536, 3072), (2, 2048, 1536)],
    "sana-1.6b": [(2, 2240, 13440), (2, 2240, 2240)],
    "sdxl-unet": [(2, 1280, 1280), (2, 1280, 640), (2, 2816, 1280)],
    "flux": [(1, 3072, 18432), (1, 3072, 9216), (1, 3072, 3072)],
}
#: what ``--family`` times at those shapes (beside bf16, the FP8 GEMM alone and the separate-pass bound)
FAMILY_FORMATS = [("int4p2 W4A4", "int4p2", "int4p2", ("fused", "none", "gemm-cublas", "gemm-cublas-none")),
                  ("fp8 W8A8", "fp8", "fp8", ("none", "gemm-cublas-none"))]
L2_BYTES = 50 << 20


def make_layer(k, n, wname, aname, rank=RANK, device="cuda", dtype=torch.bfloat16, seed=0):
    """A QuantLinear with random weight, smoothing factors, rank-r branch and bias (speed only: values are
    random, the numerics are those of a real layer)."""
    from fourbit.calibration.targets import padded_in_features
    from fourbit.formats import make_format
    from fourbit.nn import QuantizedLinearState, QuantLinear

    g = torch.Generator(device=device).manual_seed(seed)
    wf, af = make_format(wname), make_format(aname)
    kp = padded_in_features(k, wf, af)  # K zero-padded as fourbit.quantize pads it (SANA: 5600 -> 5632)
    w = torch.nn.functional.pad(torch.randn(n, k, device=device, generator=g) / k ** 0.5, (0, kp - k))
    smooth = torch.rand(kp, device=device, generator=g) * 1.5 + 0.5
    down = (torch.randn(rank, kp, device=device, generator=g) / k ** 0.5).to(dtype)
    up = (torch.randn(n, rank, device=device, generator=g) * 0.1).to(dtype)
    state = QuantizedLinearState(wf.quantize(w), wf, af, smooth=smooth, lr_down=down, lr_up=up)
    bias = (torch.randn(n, device=device, generator=g) * 0.1).to(dtype)
    return QuantLinear.from_state(state, k, bias, kernel="triton", dtype=dtype).to(device)


def inputs(m, k, dtype=torch.bfloat16, device="cuda", min_bytes=2 * L2_BYTES):
    per = m * k * torch.empty((), dtype=dtype).element_size()
    count = max(2, -(-min_bytes // per))
    return [torch.randn(m, k, device=device, dtype=dtype) for _ in range(count)]


def rel_err(y, ref):
    return float((y.float() - ref.float()).norm() / ref.float().norm())


_BIAS_IN_SCALED_MM = [True]


def _scaled_mm_bias(a, b, sa, sb, bias, out_dtype):
    """cuBLAS FP8 rowwise GEMM with the bias in its epilogue where this torch supports that."""
    if _BIAS_IN_SCALED_MM[0]:
        try:
            return torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, bias=bias, out_dtype=out_dtype)
        except RuntimeError:
            _BIAS_IN_SCALED_MM[0] = False
    return torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=out_dtype).add_(bias)


def separate_pass_bound(x, w_t, w_scale, ones):
    """The least a layer that quantizes X in a pass of its own can cost: a plain cast of X to FP8 (one read of X, one
    byte written per element, no arithmetic) and cuBLAS's FP8 GEMM; no branch. w_t (K, N) FP8, w_scale (1, N), ones
    (M, 1) fp32."""
    return torch._scaled_mm(x.to(torch.float8_e4m3fn), w_t, scale_a=ones, scale_b=w_scale, out_dtype=torch.bfloat16)


def probe_case(m: int, k: int, n: int):
    """What the probe scripts time at one shape: ``layer`` (int4p2 W4A4 rank 32, speed mode), a bf16 weight ``w``
    and bias ``b`` of the same shape, rotating inputs ``xs`` (m, k), the layer's ``state`` and FP8 weight operand
    ``op``, and ``bound``: the separate-pass bound on input x."""
    from types import SimpleNamespace

    from fourbit.kernels.linear import layer_state, weight_operand

    layer = make_layer(k, n, "int4p2", "int4p2")
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16) * 0.1
    st = layer_state(layer)
    op = weight_operand(layer, st, memory=False)
    wt, sb, ones = op.w.t(), op.col_scale.reshape(1, -1), torch.ones(m, 1, device="cuda")
    return SimpleNamespace(layer=layer, w=w, b=b, xs=inputs(m, k), state=st, op=op,
                           bound=lambda x: separate_pass_bound(x, wt, sb, ones))


def variant_fn(layer, x, variant):
    from fourbit.kernels.act_quant import act_quant
    from fourbit.kernels.linear import layer_state, linear_forward, weight_operand

    if variant in ("fused", "unfused", "none", "memory"):
        memory = variant == "memory"
        lowrank = "fused" if variant == "memory" else variant
        return lambda: linear_forward(layer, x, memory=memory, lowrank=lowrank)
    if variant in ("gemm-cublas", "gemm-cublas-none"):  # the library's 'cublas' backend (branch folded into K)
        from fourbit.kernels.gemm_cublas import set_gemm_backend

        lowrank = "fused" if variant == "gemm-cublas" else "none"

        def run():
            set_gemm_backend("cublas", min_rows=0)  # at every M (the library's default starts at 2048 rows)
            try:
                return linear_forward(layer, x, lowrank=lowrank)
            finally:
                set_gemm_backend("triton")
        return run
    if variant in ("cublas", "cublas-none"):  # probe: cuBLAS GEMM, the branch as a separate addmm
        st = layer_state(layer)
        w = weight_operand(layer, st, memory=False)
        wt = w.w.t()
        sb = w.col_scale.reshape(1, -1)
        up16 = st.up.t().to(x.dtype).contiguous()
        down16 = st.down.t().to(x.dtype)
        rsmooth16 = st.smooth_recip.to(x.dtype)
        branch = variant == "cublas"

        def run():
            a = act_quant(x, layer.act_format, padded_in=layer.padded_in, smooth_recip=st.smooth_recip)
            y = _scaled_mm_bias(a.q, wt, a.row_scale.reshape(-1, 1), sb, layer.bias, x.dtype)
            if branch:
                y.addmm_((x * rsmooth16) @ down16, up16)
            return y
        return run
    if variant in ("quartz-cublas", "quartz-cublas-none"):
        from fourbit.kernels.quartz_quant import quartz_quant

        st = layer_state(layer)
        w = weight_operand(layer, st, memory=False)
        wt, sb = w.w.t(), w.col_scale.reshape(1, -1)
        rank = layer.lr_down.shape[0]
        up16 = layer.lr_up.t().to(x.dtype).contiguous()  # (r, N)
        branch = variant == "quartz-cublas"

        def run():  # one read of x: QuaRTZ codes as exact e4m3 + per-token scale, and x^ @ lr_down^T
            a = quartz_quant(x, layer.act_format, st.smooth, st.down if branch else None, layer.padded_in)
            y = _scaled_mm_bias(a.q, wt, a.row_scale.reshape(-1, 1), sb, layer.bias, x.dtype)
            if branch:
                y.addmm_(a.lr[:, :rank].to(x.dtype), up16)
            return y
        return run
    raise ValueError(variant)


def diagnose(layer, x, y, ref, limit=8) -> dict:
    """Where a layer's output departs from the reference: its worst rows and columns; act_quant's codes and row
    scales against the plain-torch twin on the same input (counts and the first ``limit`` differing elements);
    the weight operand against its twin; the GEMM's fp32 twin and the fp8 GEMM with a promoted accumulator on
    the kernel's own operands (which stage the error comes from)."""
    from fourbit.kernels.act_quant import act_quant, act_quant_torch
    from fourbit.kernels.linear import layer_state

    st = layer_state(layer)
    row_err = ((y.float() - ref.float()).norm(dim=1) / ref.float().norm(dim=1).clamp_min(1e-30))
    worst = torch.topk(row_err, min(limit, row_err.numel()))
    got = act_quant(x, layer.act_format, st.smooth, st.down, layer.padded_in, down_folded=st.down_folded,
                    smooth_recip=st.smooth_recip, down_cat=st.down_cat)
    twin = act_quant_torch(x, layer.act_format, st.smooth, st.down, layer.padded_in)
    diff = got.q.view(torch.uint8) != twin.q.view(torch.uint8) if got.q.element_size() == 1 else got.q != twin.q
    out = dict(worst_rows=worst.indices.tolist(), worst_row_rel_err=[float(v) for v in worst.values],
               code_mismatches=int(diff.sum()), rows_with_code_mismatches=int(diff.any(1).sum()))
    if got.row_scale is not None:
        out["row_scale_mismatches"] = int((got.row_scale != twin.row_scale).sum())
    idx = diff.nonzero()[:limit]
    out["first_code_mismatches"] = [
        dict(row=int(r), col=int(c), x=float(x[r, c]) if c < x.shape[1] else 0.0, kernel=float(got.q[r, c].float()),
             reference=float(twin.q[r, c].float()),
             row_scale_kernel=None if got.row_scale is None else float(got.row_scale[r]),
             row_scale_reference=None if twin.row_scale is None else float(twin.row_scale[r]))
        for r, c in idx.tolist()]
    if got.lr is not None:
        out["lr_rel_err"] = float((got.lr - twin.lr).norm() / twin.lr.norm())
    col_err = ((y.float() - ref.float()).norm(dim=0) / ref.float().norm(dim=0).clamp_min(1e-30))
    worst_c = torch.topk(col_err, min(limit, col_err.numel()))
    out["worst_cols"], out["worst_col_rel_err"] = worst_c.indices.tolist(), [float(v) for v in worst_c.values]
    if st.plan == "scaled":  # the GEMM on the kernel's own operands: fp32 twin, and fp8 with a promoted accumulator
        import dataclasses

        from fourbit.kernels.gemm import default_config, scaled_gemm, scaled_gemm_torch
        from fourbit.kernels.linear import weight_operand
        from fourbit.kernels.weights import expand_weight_torch

        w = weight_operand(layer, st, memory=False)
        wt = expand_weight_torch(layer.weight_packed, layer.weight_scales, layer.weight_row_scale,
                                 layer.weight_format, layer.padded_in)
        out["weight_operand_mismatches"] = int((w.w.view(torch.uint8) != wt.w.view(torch.uint8)).sum()) \
            if w.w.element_size() == 1 else int((w.w != wt.w).sum())
        args = (got.q, w.w, got.row_scale, w.col_scale, got.lr, st.up, st.bias)
        out["twin_gemm_rel_err"] = rel_err(scaled_gemm_torch(*args, out_dtype=y.dtype), ref)
        out["default_gemm_on_fresh_operands_rel_err"] = rel_err(scaled_gemm(*args, out_dtype=y.dtype), ref)
        from fourbit.kernels.linear import linear_forward

        y2 = linear_forward(layer, x)
        out["second_call_rel_err"] = rel_err(y2, ref)
        out["first_vs_second_call_rel_diff"] = rel_err(y, y2)
        cfg = dataclasses.replace(default_config(*y.shape, got.q.shape[1], got.q.dtype), precise=True)
        out["precise_accumulation_rel_err"] = rel_err(scaled_gemm(*args, out_dtype=y.dtype, config=cfg), ref)
    return out


def bench_shape(m, k, n, formats, graph=True, log=print):
    rows = []
    xs = inputs(m, k)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16) * 0.1
    flops = 2.0 * m * n * k

    graphs = InterleavedGraphs()  # graph timings: all variants of this shape replayed in turn, medians

    def record(label, variant, fns, err=None):
        t_eager = time_eager(fns)
        if graph:
            graphs.add(fns)  # one graph per row, in row order
        rows.append(dict(M=m, K=k, N=n, format=label, variant=variant, graph_ms=float("nan"), eager_ms=t_eager,
                         rel_err=err))
        log(f"  {label:24s} {variant:12s} eager {t_eager:.4f} ms" + ("" if err is None else f"  err {err:.2e}"))

    record("bf16 nn.Linear", "-", [lambda x=x: F.linear(x, w, b) for x in xs])
    x8 = [(x.float().abs().amax(1, keepdim=True) / 448).clamp_min(1e-12) for x in xs]
    xq = [(x.float() / s).to(torch.float8_e4m3fn) for x, s in zip(xs, x8)]
    w8s = (w.float().abs().amax(1, keepdim=True) / 448).clamp_min(1e-12)
    wq = (w.float() / w8s).to(torch.float8_e4m3fn)
    record("fp8 rowwise _scaled_mm", "GEMM only", [
        lambda a=a, s=s: torch._scaled_mm(a, wq.t(), scale_a=s, scale_b=w8s.t(), out_dtype=torch.bfloat16)
        for a, s in zip(xq, x8)])
    del x8, xq
    ones = torch.ones(m, 1, device="cuda")
    record("separate-pass bound", "cast + GEMM",
           [lambda x=x: separate_pass_bound(x, wq.t(), w8s.t(), ones) for x in xs])
    from fourbit.kernels.reference import quant_linear_reference

    for label, wname, aname, variants in formats:
        layer = make_layer(k, n, wname, aname)
        # memory mode on its own copy: it gives the layer's cached operand back, and the speed-mode graphs captured
        # before it (replayed later, interleaved) still read that operand
        mem_layer = make_layer(k, n, wname, aname) if "memory" in variants else None
        ref = quant_linear_reference(layer, xs[0])
        for variant in variants:
            try:
                fns = [variant_fn(mem_layer if variant == "memory" else layer, x, variant) for x in xs]
                y = fns[0]() if not variant.endswith("none") else None
                err = None if y is None else rel_err(y, ref)
                record(label, variant, fns, err)
                if err is not None and err > 2e-3 and variant in ("fused", "memory"):  # above the bf16 rounding
                    rows[-1]["diagnosis"] = diag = diagnose(mem_layer if variant == "memory" else layer, xs[0], y, ref)
                    log(f"    diagnosis: {json.dumps(diag)[:1500]}")
            except Exception as e:  # report and go on: one broken path must not lose the whole run
                log(f"  {label} {variant}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        del layer, mem_layer, ref
    if graph:
        for r, t in zip(rows, graphs.run()):
            r["graph_ms"] = t
            log(f"  {r['format']:24s} {r['variant']:12s} graph {t:.4f} ms (interleaved rounds)")
    for r in rows:
        r["tflops"] = flops / (r["graph_ms"] if graph else r["eager_ms"]) / 1e9
    torch.cuda.empty_cache()
    return rows


def summarize(rows):
    """Ratios vs bf16 per shape and the acceptance numbers."""
    def t(r):
        return r["graph_ms"] if r["graph_ms"] == r["graph_ms"] else r["eager_ms"]

    by = {}
    for r in rows:
        by.setdefault((r["M"], r["K"], r["N"]), {})[(r["format"], r["variant"])] = r
    summary = {"per_shape": [], "acceptance": {}}
    for (m, k, n), d in by.items():
        base = d[("bf16 nn.Linear", "-")]
        for key, r in d.items():
            summary["per_shape"].append(dict(M=m, K=k, N=n, format=key[0], variant=key[1],
                                             speedup_graph=base["graph_ms"] / r["graph_ms"],
                                             speedup_eager=base["eager_ms"] / r["eager_ms"]))
    ms = sorted({s[0] for s in by}, reverse=True)  # TOKENS, or a family's several M
    for mode in ("graph", "eager"):
        for m in ms + (["all"] if len(ms) > 1 else []):
            shapes = [s for s in by if m == "all" or s[0] == m]
            if not shapes:
                continue

            def ratio(fmt, var, num=("bf16 nn.Linear", "-")):
                vals = [by[s][num][f"{mode}_ms"] / by[s][(fmt, var)][f"{mode}_ms"]
                        for s in shapes if (fmt, var) in by[s] and num in by[s]]
                return geomean(vals)

            acc = {
                "int4p2_fused_vs_bf16": ratio("int4p2 W4A4", "fused"),
                "int4p2_memory_vs_bf16": ratio("int4p2 W4A4", "memory"),
                "fp8_ceiling_vs_bf16": ratio("fp8 rowwise _scaled_mm", "GEMM only"),
                "fp8_w8a8_vs_bf16": ratio("fp8 W8A8", "none"),
                "int4p2_gemm_cublas_vs_bf16": ratio("int4p2 W4A4", "gemm-cublas"),
                "fp8_w8a8_gemm_cublas_vs_bf16": ratio("fp8 W8A8", "gemm-cublas-none"),
                "shapes": len(shapes),
                "separate_pass_bound_vs_bf16": ratio("separate-pass bound", "cast + GEMM"),
                "lowrank_overhead_fused": 1 / ratio("int4p2 W4A4", "fused", ("int4p2 W4A4", "none")) - 1,
                "lowrank_overhead_unfused": 1 / ratio("int4p2 W4A4", "unfused", ("int4p2 W4A4", "none")) - 1,
            }
            summary["acceptance"][f"M={m} {mode}"] = acc
    return summary


def markdown(rows, summary):
    out = ["## Acceptance (geometric means over the shapes of each M)\n"]
    hdr = ["M / timing", "shapes", "int4p2 fused vs bf16", "int4p2 memory vs bf16", "fourbit fp8 W8A8 vs bf16",
           "fp8 cuBLAS GEMM-only vs bf16", "separate-pass bound vs bf16", "low-rank overhead fused",
           "low-rank overhead unfused"]
    out.append(md_table(hdr, [[k, v["shapes"], v["int4p2_fused_vs_bf16"], v["int4p2_memory_vs_bf16"],
                               v["fp8_w8a8_vs_bf16"], v["fp8_ceiling_vs_bf16"],
                               v["separate_pass_bound_vs_bf16"], f"{100 * v['lowrank_overhead_fused']:.1f}%",
                               f"{100 * v['lowrank_overhead_unfused']:.1f}%"]
                              for k, v in summary["acceptance"].items()]))
    out.append("\nseparate-pass bound: X cast to FP8 (one read of X, one byte written per element, no quantization "
               "arithmetic) + the cuBLAS FP8 GEMM, no low-rank branch - what any layer that quantizes X in its own "
               "pass could at best reach.")
    for m in sorted({r["M"] for r in rows}, reverse=True):
        sel = [r for r in rows if r["M"] == m]
        if not sel:
            continue
        shapes = sorted({(r["K"], r["N"]) for r in sel}, key=lambda s: SHAPES.index(s) if s in SHAPES else 99)
        keys = []
        for r in sel:
            if (r["format"], r["variant"]) not in keys:
                keys.append((r["format"], r["variant"]))
        out.append(f"\n## M = {m}: speed-up vs bf16 nn.Linear (CUDA-graph timing; eager in parentheses)\n")
        hdr = ["format", "variant"] + [f"{k}x{n}" for k, n in shapes] + ["geomean", "max rel err"]
        table = []
        base = {(r["K"], r["N"]): r for r in sel if r["format"] == "bf16 nn.Linear"}
        for fmt, var in keys:
            cells, ratios, errs = [], [], []
            for s in shapes:
                r = next((r for r in sel if (r["K"], r["N"]) == s and r["format"] == fmt and r["variant"] == var), None)
                if r is None:
                    cells.append("-")
                    continue
                rg, re_ = base[s]["graph_ms"] / r["graph_ms"], base[s]["eager_ms"] / r["eager_ms"]
                ratios.append(rg)
                cells.append(f"{rg:.2f} ({re_:.2f})")
                if r["rel_err"] is not None:
                    errs.append(r["rel_err"])
            table.append([fmt, var] + cells + [f"{geomean(ratios):.2f}", f"{max(errs):.1e}" if errs else "-"])
        out.append(md_table(hdr, table))
        out.append(f"\nAbsolute times (ms, CUDA graph) at M = {m}:\n")
        hdr = ["format", "variant"] + [f"{k}x{n}" for k, n in shapes]
        table = []
        for fmt, var in keys:
            cells = []
            for s in shapes:
                r = next((r for r in sel if (r["K"], r["N"]) == s and r["format"] == fmt and r["variant"] == var), None)
                cells.append("-" if r is None else f"{r['graph_ms']:.4f}")
            table.append([fmt, var] + cells)
        out.append(md_table(hdr, table))
    return "\n".join(out)


# ---- tile-config sweep ----------------------------------------------------------------------------
def tune(log=print, which=("gemm", "act")):
    """Sweep GEMM and act_quant configs at the FLUX shapes; returns {name: [(config, ms per shape...)]}.
    The best act_quant config (geometric mean) becomes the default for the rest of the run."""
    from fourbit.kernels.gemm import GemmConfig, scaled_gemm

    res = {}
    shapes = [(4608, k, n) for k, n in SHAPES] + [(1024, 3072, 3072), (1024, 3072, 12288), (1024, 12288, 3072)]

    def sweep(name, configs, make_fn):
        table = []
        for cfg in configs:
            times = []
            try:
                for m, k, n in shapes:
                    fns = make_fn(cfg, m, k, n)
                    times.append(time_graph(fns, replays=10))
            except Exception as e:  # a config that does not compile or fit is reported, not fatal
                log(f"  {name} {cfg}: failed: {str(e).splitlines()[0][:160]}")
                continue
            table.append((cfg, times))
            log(f"  {name} {getattr(cfg, 'key', lambda: cfg)()}: " + " ".join(f"{t:.4f}" for t in times))
        res[name] = [(repr(c), t) for c, t in table]
        return table

    def gemm_fn(dtype):
        cache = {}

        def make(cfg, m, k, n):
            key = (m, k, n)
            if key not in cache:
                if dtype == torch.int8:
                    a = [torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8) for _ in range(2)]
                    b = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
                else:
                    a = [torch.randint(-8, 8, (m, k), device="cuda").to(torch.float16).to(dtype) for _ in range(2)]
                    b = torch.randint(-8, 8, (n, k), device="cuda").to(torch.float16).to(dtype)
                sa = torch.rand(m, device="cuda") + 0.5
                sb = torch.rand(n, device="cuda") + 0.5
                lr = torch.randn(m, RANK, device="cuda")
                up = torch.randn(n, RANK, device="cuda")
                bias = torch.randn(n, device="cuda")
                cache.clear()
                cache[key] = (a, b, sa, sb, lr, up, bias)
            a, b, sa, sb, lr, up, bias = cache[key]
            return [lambda a_=a_: scaled_gemm(a_, b, sa, sb, lr, up, bias, config=cfg) for a_ in a]
        return make

    if "gemm" not in which:
        fp8_cfgs = []
    else:
        fp8_cfgs = [GemmConfig(128, 256, 128, 8, 8, 3, True), GemmConfig(128, 256, 128, 8, 8, 4, True),
                    GemmConfig(256, 128, 128, 8, 8, 3, True), GemmConfig(128, 128, 128, 8, 8, 4, True),
                    GemmConfig(128, 128, 128, 8, 4, 4, True), GemmConfig(128, 256, 128, 8, 8, 3, False),
                    GemmConfig(128, 256, 128, 8, 8, 3, True, flatten=True), GemmConfig(128, 256, 64, 8, 8, 4, True),
                    GemmConfig(128, 256, 128, 8, 8, 3, True, precise=True),
                    GemmConfig(128, 256, 128, 8, 8, 3, True, tma_store=True),
                    GemmConfig(128, 256, 128, 8, 8, 3, True, flatten=True, tma_store=True)]
    if "gemm" in which:
        _tune_gemms(log, sweep, gemm_fn, fp8_cfgs, res)
    if "act" in which:
        import fourbit.kernels.act_quant as aq

        best = _tune_act(log, sweep)
        if best is not None:
            aq.DEFAULT_CONFIG = best
            res["act_quant_chosen"] = repr(best)
            log(f"act_quant default for this run: {best}")
    return res


def _tune_gemms(log, sweep, gemm_fn, fp8_cfgs, res):
    from fourbit.kernels.gemm import GemmConfig, scaled_gemm, scaled_gemm_torch
    from fourbit.kernels.gemm_grouped import grouped_gemm

    log("fp8 scaled_gemm (rank-32 epilogue + bias), ms per shape:")
    sweep("fp8", fp8_cfgs, gemm_fn(torch.float8_e4m3fn))
    # accuracy of the fp8 accumulation at the longest K: Hopper's fp8 MMA accumulates with reduced precision
    # unless promoted to fp32 every BK (GemmConfig.precise)
    m, k, n = 4608, 15360, 3072
    a = torch.randint(-8, 8, (m, k), device="cuda").to(torch.float16).to(torch.float8_e4m3fn)
    b = (torch.randint(-8, 8, (n, k), device="cuda").float() * 2.0 ** torch.randint(-6, 1, (n, k), device="cuda")
         ).to(torch.float8_e4m3fn)
    ref = scaled_gemm_torch(a, b, out_dtype=torch.float32)
    for precise in (False, True):
        y = scaled_gemm(a, b, out_dtype=torch.float32, config=GemmConfig(128, 256, 128, 8, 8, 3, True, precise=precise))
        e = float((y - ref).norm() / ref.norm())
        res[f"fp8_accum_rel_err_precise={precise}"] = e
        log(f"  fp8 accumulation at K={k}, precise={precise}: rel err {e:.2e} (fp32 output)")
    del a, b, ref, y
    log("int8 scaled_gemm:")
    sweep("int8", [GemmConfig(128, 256, 128, 8, 8, 3, True), GemmConfig(128, 128, 128, 8, 8, 4, True),
                   GemmConfig(256, 128, 128, 8, 8, 3, True)], gemm_fn(torch.int8))
    log("bf16 scaled_gemm:")
    sweep("bf16", [GemmConfig(128, 256, 64, 8, 8, 3, True), GemmConfig(128, 128, 64, 8, 8, 4, True),
                   GemmConfig(256, 128, 64, 8, 8, 3, True)], gemm_fn(torch.bfloat16))

    def grouped_make(cfg, m, k, n):
        a = [torch.randint(-8, 8, (m, k), device="cuda").to(torch.float16).to(torch.float8_e4m3fn) for _ in range(2)]
        b = torch.randint(-8, 8, (n, k), device="cuda").to(torch.float16).to(torch.float8_e4m3fn)
        sa, sb = torch.rand(k // 64, m, device="cuda"), torch.rand(k // 64, n, device="cuda")
        return [lambda a_=a_: grouped_gemm(a_, b, sa, sb, 64, config=cfg) for a_ in a]
    log("grouped int4 g64 gemm:")
    sweep("grouped", [GemmConfig(128, 128, 64, 8, 8, 4, True), GemmConfig(128, 256, 64, 8, 8, 3, True),
                      GemmConfig(64, 128, 64, 8, 4, 4, True), GemmConfig(128, 128, 64, 8, 8, 3, False)], grouped_make)



def _tune_act(log, sweep):
    """Sweep act_quant candidates (benchmarks/act_quant.py) with and without the rank-32 branch, with the
    per-layer factors cached as QuantLinear caches them; returns the composed best config."""
    import dataclasses

    from act_quant import configs

    from fourbit.formats import make_format
    from fourbit.kernels.act_quant import act_quant, fold_down
    from fourbit.kernels.reference import smooth_reciprocal

    fmt = make_format("int4p2")

    def act_make(rank):
        def make(cfg, m, k, n):
            xs = inputs(m, k)
            smooth = torch.rand(k, device="cuda") + 0.5
            down = torch.randn(RANK, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5 if rank else None
            folded = fold_down(down, smooth) if rank else None
            rs = smooth_reciprocal(smooth)
            return [lambda x=x: act_quant(x, fmt, smooth, down, k, config=cfg, down_folded=folded, smooth_recip=rs)
                    for x in xs]
        return make

    lr, nolr = configs(False)
    best = {}
    for rank, cands in ((RANK, lr), (0, nolr)):
        log(f"act_quant int4p2 (smooth, rank {rank}):")
        table = sweep(f"act_quant_r{rank}", [c for _, c in cands], act_make(rank))
        if table:
            best[rank] = min(table, key=lambda ct: geomean(ct[1]))[0]
    if not best:
        return None
    cfg = best.get(RANK) or best[0]
    if 0 in best:  # the no-branch path's choice; tiles of the two-launch path stay the rank-32 winner's
        n = best[0]
        cfg = dataclasses.replace(cfg, rows=n.rows, chunk=n.chunk, warps=n.warps)
    return cfg


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--tune", action="store_true", help="sweep tile configs first")
    p.add_argument("--tune-only", action="store_true")
    p.add_argument("--tune-what", default="gemm,act", help="comma list of sweeps: gemm, act")
    p.add_argument("--quick", action="store_true", help="two shapes, three formats")
    p.add_argument("--no-graph", action="store_true", help="eager timing only")
    p.add_argument("--formats", default=None, help="comma list: only the formats whose label contains one")
    p.add_argument("--shapes", default=None, help="comma list of KxN: only these shapes")
    p.add_argument("--tokens", default=None, help="comma list of M (default: 4608,1024)")
    p.add_argument("--family", default=None, help="comma list of model families (FAMILY_SHAPES): their own "
                   "(M, K, N) shapes, int4p2 W4A4 and fp8 W8A8 (writes linear-<family>.*)")
    p.add_argument("--quartz", action="store_true", help="only the QuaRTZ activation path beside int4p2 "
                   "(writes linear-quartz.*)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    env = environment()
    print(json.dumps(env), flush=True)
    log = lambda s: print(s, flush=True)  # noqa: E731
    if args.tune or args.tune_only:
        t0 = time.time()
        if "act" in args.tune_what and "gemm" not in args.tune_what:
            log("(GEMM configs: the defaults in fourbit/kernels/gemm.py)")
        sweep = tune(log, which=tuple(args.tune_what.split(",")))
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "tune.json"), "w") as f:
            json.dump({"environment": env, "sweep": sweep}, f, indent=1)
        log(f"tuning took {time.time() - t0:.0f}s")
        if args.tune_only:
            return
    shapes = SHAPES[:2] if args.quick else SHAPES
    formats = FORMATS[:1] + FORMATS[2:4] if args.quick else FORMATS
    stem = "linear"
    if args.quartz:
        formats, stem = QUARTZ_FORMATS, "linear-quartz"
    if args.formats:
        formats = [f for f in formats if any(s in f[0] for s in args.formats.split(","))]
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    tokens = tuple(int(v) for v in args.tokens.split(",")) if args.tokens else TOKENS
    if args.formats or args.shapes or args.tokens:
        stem += "-subset"  # a partial run never overwrites the full table
    cases = [(m, k, n) for m in tokens for k, n in shapes]
    if args.family:
        fams = args.family.split(",")
        cases = [c for f in fams for c in FAMILY_SHAPES[f]]
        formats, stem = FAMILY_FORMATS, "linear-" + "-".join(fams)
    rows = []
    t0 = time.time()
    import fourbit.kernels.act_quant as aq

    if True:
        for m, k, n in cases:
            log(f"M={m} K={k} N={n}")
            rows += bench_shape(m, k, n, formats, graph=not args.no_graph, log=log)
            summary = summarize(rows)  # written after every shape: a run cut short keeps what it measured
            md = markdown(rows, summary)
            payload = {"rows": rows, "summary": summary, "rank": RANK, "act_config": repr(aq.DEFAULT_CONFIG)}
            jp, mp = write_results(args.out, stem, env, payload, md)
    log(md)
    log(f"benchmark took {time.time() - t0:.0f}s; wrote {jp} and {mp}")


if __name__ == "__main__":
    main()
