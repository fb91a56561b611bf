"""Is cuBLAS's block-scaled FP8 GEMM a route past the separate-pass bound at every family's shapes?

    python benchmarks/probes/blockwise_probe.py --family pixart-sigma,sd3-medium   # CUDA (sm_90, CUDA >= 12.9)
    python benchmarks/probes/blockwise_probe.py --tiny                            # CPU: the math, no timing

Today's W4A4 layer has one scale per row of X, so X must be reduced over all of K before any of it is quantized (a
pass of its own) and its GEMM is fourbit's Triton kernel, which at K <= 1536 runs at about bf16 speed where
cuBLAS's FP8 GEMM runs 1.35-1.55x (docs/kernels.md). With one fp32 scale per (row, 128 columns) of X and per
128 x 128 block of W (``torch._scaled_mm`` with ``BlockWise1x128`` x ``BlockWise128x128``, DeepSeek-V3's recipe,
CUDA >= 12.9), quantization is local to 128 columns (a producer kernel could do it) and the GEMM is cuBLAS's. The
low-rank branch L U^T fits in the same GEMM as one more K block: [Xq | L_hi L_hi L_lo] [Wq | U_hi U_lo U_hi]^T, the
branch's factors split into FP8 hi + lo parts (~7 significant bits per factor, 3 products of the 4).

Variants timed side by side per shape (CUDA graphs, interleaved rounds, median ms per call):
  bf16                  ``F.linear``
  rowwise GEMM          cuBLAS FP8 GEMM, one scale per row / column (X already FP8)
  blockwise GEMM        cuBLAS FP8 GEMM, 1x128 / 128x128 scales (X already FP8)
  blockwise GEMM +128   the same with K + 128: the branch folded in as one more K block
  rowwise bound         X cast to FP8 (no arithmetic) + the rowwise GEMM: issue 4's separate-pass bound
  blockwise layer       X quantized per 1x128 block (compiled torch: max, scale, cast) + the down-projection
                        X @ L (cuBLAS) and its FP8 split + the blockwise GEMM with K + 128: a whole W4A4-style
                        layer with its branch, written in torch
  fourbit W4A4 r32      today's layer (int4p2, Triton GEMM, fused branch); "no branch" without it
Writes blockwise_probe.jsonl (one row per family) under --out.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch._dynamo
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/_util.py
from _util import RESULTS_DIR, geomean, md_table  # noqa: E402
from linear import rel_err as rel  # noqa: E402

BLOCK = 128
E4M3_MAX = 448.0
RANK = 32
VARIANTS = ("bf16", "rowwise GEMM", "blockwise GEMM", "blockwise GEMM +128", "blockwise GEMM W1x128 +128",
            "rowwise bound", "blockwise layer", "blockwise layer W1x128", "fourbit W4A4 r32", "fourbit W4A4 no branch")


def ceil_to(x: int, m: int) -> int:
    return -(-x // m) * m


def quant_1x128(x: torch.Tensor):
    """x (M, K) 16-bit, K a multiple of 128 -> (FP8 (M, K), fp32 scales (M, K / 128)): one scale per row and block
    of 128 columns, max|block| / 448, values x / scale rounded to e4m3."""
    m, k = x.shape
    xb = x.float().reshape(m, k // BLOCK, BLOCK)  # (M, K/128, 128)
    s = (xb.abs().amax(-1) / E4M3_MAX).clamp(min=1e-12)  # (M, K/128)
    q = (xb / s.unsqueeze(-1)).to(torch.float8_e4m3fn).reshape(m, k)
    return q, s


def quant_128x128(w: torch.Tensor):
    """w (N, K), N and K multiples of 128 -> (FP8 (N, K), fp32 scales (N / 128, K / 128))."""
    n, k = w.shape
    wb = w.float().reshape(n // BLOCK, BLOCK, k // BLOCK, BLOCK)  # (N/128, 128, K/128, 128)
    s = (wb.abs().amax(dim=(1, 3)) / E4M3_MAX).clamp(min=1e-12)  # (N/128, K/128)
    q = (wb / s[:, None, :, None]).to(torch.float8_e4m3fn).reshape(n, k)
    return q, s


def quant_w_1x128(w: torch.Tensor):
    """w (N, K), K a multiple of 128 -> (FP8 (N, K), fp32 scales (N, K / 128)): per output row and 128 columns."""
    return quant_1x128(w)


def split_fp8(t: torch.Tensor):
    """t (R, c) fp32 -> FP8 hi + lo parts sharing one scale per row: hi = e4m3(t / s), lo = e4m3(t / s - hi),
    s = max|row| / 448. Returns (hi, lo, s (R, 1))."""
    s = (t.abs().amax(-1, keepdim=True) / E4M3_MAX).clamp(min=1e-12)
    y = t / s
    hi = y.to(torch.float8_e4m3fn)
    lo = (y - hi.float()).to(torch.float8_e4m3fn)
    return hi, lo, s


def fold_branch_a(q, s, lr):
    """[Xq | L_hi L_hi L_lo 0...] (M, K + 128) and its scales (M, K/128 + 1): the branch's A side as one K block."""
    m, r = lr.shape
    hi, lo, ls = split_fp8(lr.float())
    ext = torch.zeros(m, BLOCK, dtype=torch.float8_e4m3fn, device=q.device)
    ext[:, :r], ext[:, r:2 * r], ext[:, 2 * r:3 * r] = hi, hi, lo
    return torch.cat([q, ext], 1), torch.cat([s, ls], 1)


def fold_branch_b(wq, ws, up):
    """[Wq | U_hi U_lo U_hi 0...] (N, K + 128) and its scales: 128x128 scales (N/128, K/128 + 1), U's scale per 128
    output rows; or 1x128 scales (N, K/128 + 1), U's scale per output row."""
    n, r = up.shape
    rows_per_scale = BLOCK if ws.shape[0] * BLOCK == n else 1
    hi, lo, s = split_fp8(up.float().reshape(n // rows_per_scale, rows_per_scale * r))  # s (N / rows_per_scale, 1)
    ext = torch.zeros(n, BLOCK, dtype=torch.float8_e4m3fn, device=wq.device)
    ext[:, :r], ext[:, r:2 * r], ext[:, 2 * r:3 * r] = hi.reshape(n, r), lo.reshape(n, r), hi.reshape(n, r)
    return torch.cat([wq, ext], 1), torch.cat([ws, s], 1)


def blockwise_mm_torch(a, sa, b, sb, out_dtype=torch.float32):
    """Plain-torch twin of the block-scaled GEMM: a (M, K) with sa (M, K/128); b (N, K) with sb (N/128, K/128)
    (128x128 blocks) or (N, K/128) (1x128 blocks)."""
    m, k = a.shape
    n = b.shape[0]
    af = (a.float().reshape(m, k // BLOCK, BLOCK) * sa.unsqueeze(-1)).reshape(m, k)
    if sb.shape[0] == n:  # 1x128
        bf = (b.float().reshape(n, k // BLOCK, BLOCK) * sb.unsqueeze(-1)).reshape(n, k)
    else:
        bf = (b.float().reshape(n // BLOCK, BLOCK, k // BLOCK, BLOCK) * sb[:, None, :, None]).reshape(n, k)
    return (af @ bf.t()).to(out_dtype)


#: how ``torch._scaled_mm`` wants each weight scale mode's tensor (found by ``find_layouts`` against the twin)
_B_LAYOUT: dict = {}
_B_CANDIDATES = {
    "128x128": (lambda sb: sb.t(), lambda sb: sb.t().contiguous()),
    "1x128": (lambda sb: sb.t(), lambda sb: sb.t().contiguous(), lambda sb: sb.contiguous().t().contiguous().t()),
}


def b_mode(sb, n) -> str:
    return "1x128" if sb.shape[0] == n else "128x128"


def blockwise_mm(a, sa, b, sb, out_dtype=torch.bfloat16):
    """cuBLAS's block-scaled FP8 GEMM: a (M, K) row-major, b (N, K) row-major (passed as b.t()); sa (M, K/128) is
    handed over outer-dim-major; sb as ``find_layouts`` found this torch wants it."""
    layout = _B_LAYOUT[b_mode(sb, b.shape[0])]
    return torch._scaled_mm(a, b.t(), scale_a=sa.t().contiguous().t(), scale_b=layout(sb), out_dtype=out_dtype)


def find_layouts(log=print) -> dict:
    """For each weight scale mode, the first scale layout whose cuBLAS result matches the twin (rel. < 1e-2)."""
    g = torch.Generator(device="cpu").manual_seed(1)
    m, k, n = 256, 512, 384
    a, sa = quant_1x128(torch.randn(m, k, generator=g).cuda())
    w = torch.randn(n, k, generator=g).cuda()
    found = {}
    for mode, quant in (("128x128", quant_128x128), ("1x128", quant_w_1x128)):
        b, sb = quant(w)
        ref = blockwise_mm_torch(a, sa, b, sb)
        errs = []
        for i, layout in enumerate(_B_CANDIDATES[mode]):
            try:
                got = torch._scaled_mm(a, b.t(), scale_a=sa.t().contiguous().t(), scale_b=layout(sb),
                                       out_dtype=torch.float32)
                errs.append(rel(got, ref))
                if errs[-1] < 1e-2:
                    _B_LAYOUT[mode] = layout
                    found[mode] = {"layout": i, "rel_err_vs_twin": errs[-1]}
                    break
            except Exception as e:  # noqa: BLE001 - recorded
                errs.append(f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
        if mode not in found:
            found[mode] = {"unsupported": errs}
        log(f"W {mode} scales: {found[mode]}")
    return found


def check_math(m, k, n, device, gemm=None, w_mode="128x128"):
    """Relative errors of the folded branch and of the GEMM vs plain torch: the fold is exact up to FP8 rounding."""
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(m, k, generator=g).to(device, torch.bfloat16)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(device, torch.bfloat16)
    lr = torch.randn(m, RANK, generator=g).to(device)
    up = (torch.randn(n, RANK, generator=g) * 0.05).to(device, torch.bfloat16)
    q, s = quant_1x128(x)
    wq, ws = (quant_128x128 if w_mode == "128x128" else quant_w_1x128)(w)
    a, sa = fold_branch_a(q, s, lr)
    b, sb = fold_branch_b(wq, ws, up)
    want = blockwise_mm_torch(q, s, wq, ws) + lr @ up.float().t()
    got = blockwise_mm_torch(a, sa, b, sb)
    out = {"fold_vs_separate_branch": rel(got, want), "quantized_vs_bf16": rel(got, x.float() @ w.float().t()
                                                                              + lr @ up.float().t())}
    if gemm is not None:
        out["cublas_vs_twin"] = rel(gemm(a, sa, b, sb, torch.float32), got)
    return out


def bench_shape(m, k, n, rounds, log):
    from _util import InterleavedGraphs
    from linear import inputs, make_layer

    from fourbit.kernels.linear import linear_forward

    kp, np_, mp = ceil_to(k, BLOCK), ceil_to(n, BLOCK), ceil_to(m, 4)  # block multiples; cuBLAS: M % 4 == 0
    torch._dynamo.reset()  # a fresh compile of the quantizer per shape (dynamo's recompile limit is 8)
    xs = inputs(mp, kp)
    w = torch.randn(np_, kp, device="cuda", dtype=torch.bfloat16) / kp ** 0.5
    w16 = w[:n, :k].contiguous()  # bf16 and today's layer at the model's own shape; the block paths padded
    wq, ws = quant_128x128(w)
    wt_row = wq.t()  # (K, N) view for the rowwise GEMM
    ws_row = torch.rand(1, np_, device="cuda") + 0.5
    ones = torch.ones(mp, 1, device="cuda")
    l1t = torch.randn(kp, RANK, device="cuda", dtype=torch.bfloat16) / kp ** 0.5  # the down-projection (K, R)
    up = torch.randn(np_, RANK, device="cuda", dtype=torch.bfloat16) * 0.05
    b_ext, sb_ext = fold_branch_b(wq, ws, up)
    wq1, ws1 = quant_w_1x128(w)
    b1_ext, sb1_ext = fold_branch_b(wq1, ws1, up)
    pre = [quant_1x128(x) for x in xs]
    pre_ext = [fold_branch_a(q, s, (x @ l1t).float()) for x, (q, s) in zip(xs, pre)]
    quant = torch.compile(quant_1x128, dynamic=False)

    def layer(x, b, sb):
        q, s = quant(x)
        lr = torch.mm(x, l1t, out_dtype=torch.float32) if _MM_FP32[0] else (x @ l1t).float()
        a, sa = fold_branch_a(q, s, lr)
        return blockwise_mm(a, sa, b, sb)

    fourbit_layer = make_layer(k, n, "int4p2", "int4p2")
    xs_f = [x[:m, :k].contiguous() for x in xs]
    fns = {
        "bf16": [lambda x=x: F.linear(x, w16) for x in xs_f],
        "rowwise GEMM": [lambda q=q: torch._scaled_mm(q, wt_row, scale_a=ones, scale_b=ws_row,
                                                       out_dtype=torch.bfloat16) for q, _ in pre],
        "blockwise GEMM": [lambda q=q, s=s: blockwise_mm(q, s, wq, ws) for q, s in pre],
        "blockwise GEMM +128": [lambda a=a, sa=sa: blockwise_mm(a, sa, b_ext, sb_ext) for a, sa in pre_ext],
        "blockwise GEMM W1x128 +128": [lambda a=a, sa=sa: blockwise_mm(a, sa, b1_ext, sb1_ext) for a, sa in pre_ext],
        "rowwise bound": [lambda x=x: torch._scaled_mm(x.to(torch.float8_e4m3fn), wt_row, scale_a=ones,
                                                        scale_b=ws_row, out_dtype=torch.bfloat16) for x in xs],
        "blockwise layer": [lambda x=x: layer(x, b_ext, sb_ext) for x in xs],
        "blockwise layer W1x128": [lambda x=x: layer(x, b1_ext, sb1_ext) for x in xs],
        "fourbit W4A4 r32": [lambda x=x: linear_forward(fourbit_layer, x) for x in xs_f],
        "fourbit W4A4 no branch": [lambda x=x: linear_forward(fourbit_layer, x, lowrank="none") for x in xs_f],
    }
    times, errors = {}, {}
    with torch.no_grad():
        timer, names = InterleavedGraphs(), []
        for name, f in fns.items():
            try:
                for fn in f[:2]:
                    fn()  # compile / first call outside the graph
                timer.add(f)
                names.append(name)
            except Exception as e:  # noqa: BLE001 - recorded: a variant this torch / GPU lacks
                errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                log(f"  {name}: {errors[name]}")
        times = dict(zip(names, timer.run(rounds)))
    return times, errors


_MM_FP32 = [True]


def main(argv=None) -> int:
    from linear import FAMILY_SHAPES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default=",".join(FAMILY_SHAPES), help="comma list of " + ", ".join(FAMILY_SHAPES))
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--out", default=RESULTS_DIR)
    p.add_argument("--tiny", action="store_true", help="CPU: check the fold and the twin only (no timing)")
    args = p.parse_args(argv)
    if args.tiny or not torch.cuda.is_available():
        for mode in ("128x128", "1x128"):
            print(f"check W {mode} (CPU, plain torch):", check_math(64, 256, 256, "cpu", w_mode=mode))
        return 0
    from _util import append_row, environment, run_meta

    try:
        torch.mm(torch.ones(8, 8, device="cuda", dtype=torch.bfloat16), torch.ones(8, 8, device="cuda",
                 dtype=torch.bfloat16), out_dtype=torch.float32)
    except (TypeError, RuntimeError):
        _MM_FP32[0] = False
    env = environment()
    checks = {"layouts": find_layouts()}
    for mode in ("128x128", "1x128"):
        try:
            checks[mode] = check_math(256, 1152, 1152, "cuda", gemm=blockwise_mm, w_mode=mode)
        except Exception as e:  # noqa: BLE001
            checks[mode] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    print("check:", checks, flush=True)
    for fam in args.family.split(","):  # one row per family: a run cut by its time limit keeps what it finished
        results, rows, ratios = [], [], {v: [] for v in VARIANTS}
        for m, k, n in FAMILY_SHAPES[fam]:
            times, errors = bench_shape(m, k, n, args.rounds, print)
            base = times.get("bf16")
            results.append(dict(family=fam, M=m, K=k, N=n, ms=times, errors=errors))
            rows.append([f"{m}x{k}x{n}"] + [("-" if v not in times or not base else f"{base / times[v]:.2f}x")
                                            for v in VARIANTS])
            for v, t in times.items():
                if base:
                    ratios[v].append(base / t)
            print(fam, m, k, n, {v: round(t * 1000, 1) for v, t in times.items()}, "us", flush=True)
            torch.cuda.empty_cache()
        md = (f"{fam}, vs bf16 at the model's shape (median of {args.rounds} interleaved CUDA-graph rounds; the block "
              "paths with K, N padded to 128, M to 4)\n\n" + md_table(["M x K x N"] + list(VARIANTS), rows)
              + "\n\ngeomean vs bf16: " + ", ".join(f"{v} {geomean(r):.3f}" for v, r in ratios.items() if r))
        print(md)
        path, run = append_row(args.out, "blockwise_probe", {"variant": fam, "result": {
            "check": checks, "shapes": results, "rounds": args.rounds}, "markdown": md}, run_meta(env))
        print(f"appended {run} to {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
