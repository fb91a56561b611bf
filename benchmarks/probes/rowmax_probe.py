"""What reading X once would buy at large K, if the row maxima were known before act_quant (issue 19, open problem 4a).

    python benchmarks/probes/rowmax_probe.py            # GPU; prints a table, appends a row to results/rowmax_probe.jsonl
    TRITON_INTERPRET=1 python benchmarks/probes/rowmax_probe.py --check   # CPU: the kernel against act_quant, tiny

The branch's down-projection must read the bf16 X; act_quant's single pass needs each row's maximum before its codes,
so today X is read twice at K >= 12288 (single pass, then the cuBLAS down-projection), ~1.8 ms of a FLUX.1 step by
bytes. Every one-read design tried so far was slower (docs/kernels.md). The route left: the producer of X (fourbit's
own GELU-fused GEMM) emits the row maxima of the next layer's smoothed input in its epilogue; the consumer then
quantizes and projects in one streaming pass over (rows, columns) tiles. This probe times that pass alone, the row
maxima given (computed by torch, outside the timing), against today's path, before anyone builds the producer side:
its time is the best that route can reach. Checked against the library's act_quant: codes and row scales bit for
bit, the down-projection to its summation-order difference.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/_util.py

from fourbit.kernels._common import ceil_div, interpreting, operand_buffer, to_e4m3  # noqa: E402
from fourbit.kernels.act_tiles import _down_dot, _row_scale, _scale_consts, p2_values  # noqa: E402

RANK = 32
SHAPES = [(4096, 12288), (4608, 15360), (4608, 3072)]  # (M, K): FLUX.1's ff.net.2, single-block proj_out, QKV
#: (rows per program, columns per step, columns per program, warps). H200 runs 2026-12-05 / b (rowmax_probe.jsonl):
#: 64 x 64 steps best (0.066-0.097 ms at the large K), 128-column steps 2-4x slower, 2 warps 4-5x slower.
CONFIGS = [(64, 64, 1024, 4), (64, 64, 512, 4), (64, 64, 2048, 4), (32, 64, 1024, 4), (128, 64, 1024, 8),
           (64, 128, 1024, 4), (128, 128, 1024, 8)]


@triton.jit
def _quant_dot_kernel(x_ptr, rsmooth_ptr, down_ptr, amax_ptr, q_ptr, rs_ptr, plr_ptr, M, K, Kp, stride_xm, stride_qm,
                      cols_per_slice, G: tl.constexpr, NG: tl.constexpr, EMIN: tl.constexpr, MANT_T: tl.constexpr,
                      HW_ROUND: tl.constexpr, RANK: tl.constexpr, UPCAST: tl.constexpr, BM: tl.constexpr,
                      BK: tl.constexpr):
    """int4p2 codes and the partial down-projection of one (BM rows, slice of columns) block, the rows' max |X^|
    given: (SLICES, M, RANK) partials, summed in a fixed order afterwards."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < M
    amax = tl.load(amax_ptr + rows, mask=rmask, other=0.0)
    rsc, div = _row_scale(amax, 0, 7.0, 0)
    if pid_s == 0:
        tl.store(rs_ptr + rows, rsc, mask=rmask)
    offs_r = tl.arange(0, RANK)
    acc = tl.zeros((BM, RANK), tl.float32)
    grp = tl.arange(0, NG)
    el = tl.arange(0, G)
    xrow = rows.to(tl.int64) * stride_xm
    qrow = rows.to(tl.int64) * stride_qm
    k_lo = pid_s * cols_per_slice
    for k0 in range(k_lo, tl.minimum(k_lo + cols_per_slice, Kp), BK):
        cols = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + xrow[:, None] + cols[None, :], mask=rmask[:, None] & (cols[None, :] < K), other=0.0)
        acc = _down_dot(x, down_ptr, cols, Kp, acc, RANK, False, UPCAST)
        cols3 = k0 + grp[None, :, None] * G + el[None, None, :]  # (1, NG, G): the same columns, in groups
        m3 = rmask[:, None, None] & (cols3 < K)
        xs = tl.load(x_ptr + xrow[:, None, None] + cols3, mask=m3, other=0.0).to(tl.float32)  # L1: loaded above
        xs = xs * tl.load(rsmooth_ptr + cols3, mask=cols3 < Kp, other=0.0)
        out = to_e4m3(p2_values(xs, div, 0, EMIN, MANT_T), HW_ROUND)
        tl.store(q_ptr + qrow[:, None, None] + cols3, out, mask=rmask[:, None, None] & (cols3 < Kp))
    tl.store(plr_ptr + (pid_s * M + rows[:, None]).to(tl.int64) * RANK + offs_r[None, :], acc, mask=rmask[:, None])


def quant_dot(x, amax, rsmooth, down_folded, spec, cfg):
    """(q, row scale, lr): the pass above plus the fixed-order sum of its partials (torch)."""
    bm, bk, per_slice, warps = cfg
    if bk % spec.group or per_slice % bk:
        raise ValueError(f"rowmax_probe: columns per step ({bk}) must be a multiple of the group ({spec.group}) and "
                         f"divide the columns per program ({per_slice})")
    m, k = x.shape
    kp = rsmooth.shape[0]
    slices = ceil_div(kp, per_slice)
    q, _ = operand_buffer(m, kp, 0, torch.float8_e4m3fn, x.device)
    rs = torch.empty(m, device=x.device, dtype=torch.float32)
    plr = torch.empty((slices, m, RANK), device=x.device, dtype=torch.float32)
    consts = _scale_consts(spec)
    _quant_dot_kernel[(ceil_div(m, bm), slices)](
        x, rsmooth, down_folded, amax, q, rs, plr, m, k, kp, x.stride(0), q.stride(0), per_slice,
        G=spec.group, NG=bk // spec.group, EMIN=spec.emin, MANT_T=consts["MANT_T"], HW_ROUND=not interpreting(),
        RANK=RANK, UPCAST=interpreting(), BM=bm, BK=bk, num_warps=warps)
    return q, rs, plr.sum(0)


def operands(m, k, device, seed=0):
    """x (M, K) bf16, smoothing reciprocal, folded down-projection, and the rows' max |X^| (what the producer would
    give)."""
    from fourbit.kernels.act_quant import fold_down
    from fourbit.kernels.reference import smooth_reciprocal

    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(device=device, dtype=torch.bfloat16)
    smooth = (torch.rand(k, generator=g) + 0.5).to(device)
    down = (torch.randn(RANK, k, generator=g) / k ** 0.5).to(device=device, dtype=torch.bfloat16)
    rsm = smooth_reciprocal(smooth)
    amax = (x.float() * rsm).abs().amax(1).contiguous()
    return x, rsm, fold_down(down, smooth), amax


def check(m, k, cfg, device):
    """The pass against the library's act_quant: (codes and row scales equal, lr relative difference)."""
    from fourbit.formats import make_format
    from fourbit.kernels.act_quant import act_quant, act_spec

    fmt = make_format("int4p2")
    x, rsm, folded, amax = operands(m, k, device)
    want = act_quant(x, fmt, None, None, k, down_folded=folded, smooth_recip=rsm)
    q, rs, lr = quant_dot(x, amax, rsm, folded, act_spec(fmt), cfg)
    same = bool(torch.equal(q.view(torch.uint8), want.q.view(torch.uint8)) and torch.equal(rs, want.row_scale))
    return same, float((lr - want.lr).norm() / want.lr.norm())


#: the producers of FLUX.1's large-K inputs: (M, K, N, GELU and row maxima from column): the double blocks' MLP input
#: projection and the single blocks' Q/K/V/MLP group (GELU and row maxima on its MLP columns)
PRODUCERS = [(4096, 3072, 12288, 0), (4608, 3072, 21504, 9216)]


def epilogue_rows(time_graph):
    """The GELU-fused GEMM (fp8 operands, rank-32 branch, default tiles) with and without ``next_amax``: what the
    producer pays for handing the row maxima over."""
    from fourbit.kernels.activation import OutputActivation
    from fourbit.kernels.gemm import scaled_gemm
    from fourbit.kernels.row_amax import RowAmax

    out = []
    for m, k, n, lo in PRODUCERS:
        g = torch.Generator().manual_seed(m)
        a = torch.randint(-8, 8, (m, k), generator=g).float().to(torch.float8_e4m3fn).cuda()
        b = torch.randint(-8, 8, (n, k), generator=g).float().to(torch.float8_e4m3fn).cuda()
        sa, sb = (torch.rand(m, generator=g) * 0.01).cuda(), (torch.rand(n, generator=g) + 0.5).cuda()
        lr, up = torch.randn(m, RANK, generator=g).cuda(), torch.randn(n, RANK, generator=g).cuda()
        mult = (torch.rand(n - lo, generator=g) + 0.5).cuda()
        act = OutputActivation("gelu_tanh", lo)
        base = time_graph([lambda: scaled_gemm(a, b, sa, sb, lr, up, act=act)])
        ms = time_graph([lambda: scaled_gemm(a, b, sa, sb, lr, up, act=act,
                                             next_amax=RowAmax.zeros(m, mult, lo, n))])
        for label, t in (("GELU", base), ("GELU + row maxima (zeroed buffer included)", ms)):
            out.append(dict(M=m, gemm_k=k, N=n, variant=label, ms=t, ratio=t / base))
            print(f"GEMM M={m} K={k} N={n} {label}: {t:.4f} ms ({t / base:.3f}x)", flush=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="only the correctness check, at a tiny size (CPU: interpreter)")
    p.add_argument("--out", default=None)
    p.add_argument("--library-only", action="store_true",
                   help="time the library's path 'given' and today's, not the probe's configs; and the producing "
                        "GEMM's epilogue with and without the row maxima (``scaled_gemm(next_amax=)``)")
    args = p.parse_args(argv)
    if args.check or not torch.cuda.is_available():
        for cfg in [(16, 64, 128, 4), (32, 128, 256, 4)]:
            same, err = check(40, 320, cfg, "cuda" if torch.cuda.is_available() else "cpu")
            print(f"check {cfg}: codes and row scales equal: {same}; lr relative difference {err:.1e}")
            if not same or err > 1e-5:
                raise SystemExit(1)
        return
    from _util import RESULTS_DIR, environment, md_table, time_graph
    from fourbit.formats import make_format
    from fourbit.kernels.act_quant import act_quant, act_spec

    fmt, fp8 = make_format("int4p2"), make_format("fp8")
    spec = act_spec(fmt)
    rows = []
    for m, k in SHAPES:
        count = max(2, -(-(100 << 20) // (m * k * 2)))  # inputs rotating over more than L2
        ops = [operands(m, k, "cuda", seed=i) for i in range(count)]
        floor = time_graph([lambda x=o[0]: x.to(torch.float8_e4m3fn) for o in ops])
        timed = [("today: single pass + cuBLAS down-projection", None, [
                     lambda o=o: act_quant(o[0], fmt, None, None, k, down_folded=o[2], smooth_recip=o[1]) for o in ops]),
                 ("today without the branch (single pass)", None, [
                     lambda o=o: act_quant(o[0], fmt, None, None, k, smooth_recip=o[1]) for o in ops]),
                 ("fp8 per token, no smoothing (fourbit fp8's pass)", None, [
                     lambda o=o: act_quant(o[0], fp8, None, None, k) for o in ops])]
        timed.append(("library: act_quant(row_amax=) (path 'given')", None, [
            lambda o=o: act_quant(o[0], fmt, None, None, k, down_folded=o[2], smooth_recip=o[1], row_amax=o[3])
            for o in ops]))
        if not args.library_only:
            timed += [(f"row maxima given: {cfg[0]} rows x {cfg[1]} cols, {cfg[2]} per program, w{cfg[3]}", cfg,
                       [lambda o=o, cfg=cfg: quant_dot(o[0], o[3], o[1], o[2], spec, cfg) for o in ops])
                      for cfg in CONFIGS]
        for label, cfg, fns in timed:
            try:
                ms = time_graph(fns)
            except Exception as e:  # noqa: BLE001 - a config that does not compile is reported
                print(f"M={m} K={k} {label}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:160]}", flush=True)
                continue
            same, err = check(m, k, cfg, "cuda") if cfg else (None, None)
            rows.append(dict(M=m, K=k, variant=label, ms=ms, cast_ms=floor, same_codes=same, lr_err=err))
            print(f"M={m} K={k} {label:70s} {ms:.4f} ms ({ms / floor:.2f}x a cast to fp8)  codes equal: {same}  "
                  f"lr diff: {err}", flush=True)
        del ops
        torch.cuda.empty_cache()
    rows += epilogue_rows(time_graph) if args.library_only else []
    md = md_table(["M", "K", "variant", "ms", "x cast", "codes equal", "lr rel diff"],
                  [[r["M"], r["K"], r["variant"], f"{r['ms']:.4f}", f"{r['ms'] / r['cast_ms']:.2f}",
                    r["same_codes"], "-" if r["lr_err"] is None else f"{r['lr_err']:.1e}"] for r in rows if "K" in r])
    md += "\n\n" + md_table(["M", "K", "N", "epilogue", "ms", "vs without"],
                              [[r["M"], r["gemm_k"], r["N"], r["variant"], f"{r['ms']:.4f}", f"{r['ratio']:.3f}"]
                               for r in rows if "gemm_k" in r])
    print(md)
    meta = {**environment(), "git_commit": os.environ.get("FOURBIT_GIT_COMMIT"),
            "command": "python benchmarks/probes/rowmax_probe.py " + " ".join(sys.argv[1:])}
    out = args.out or RESULTS_DIR
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "rowmax_probe.jsonl"), "a") as f:
        f.write(json.dumps({"benchmark": "rowmax_probe", "meta": meta, "rows": rows, "markdown": md}) + "\n")


if __name__ == "__main__":
    main()
