"""Where the rank-32 low-rank branch's and the GEMM's time goes, and what candidate fixes buy (issue 4).

    python benchmarks/probes/branch_probe.py            # GPU; prints tables, appends a row to benchmarks/results/branch_probe.jsonl

Two halves, timed separately with CUDA-graph replays (inputs rotating over more than L2, medians):
  * act_quant int4p2 with the down-projection, per K: the library default and variants (the cuBLAS
    down-projection on the current or a side stream; chunk sizes without the branch), each checked against
    the default (codes and row scales bit for bit, the branch's relative difference);
  * the fp8 GEMM with and without the rank-32 epilogue, data-parallel and stream-K, each variant timed twice
    (in two rounds) to show the run-to-run spread, with the relative difference to the default's output.
Variants measured in earlier runs of this script and dropped are listed in docs/kernels.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/_util.py
from _util import RESULTS_DIR, environment, md_table, time_graph, write_results  # noqa: E402

RANK = 32
L2_BYTES = 50 << 20
SHAPES = [(3072, 3072), (3072, 9216), (3072, 12288), (12288, 3072), (3072, 21504), (15360, 3072)]  # (K, N)


def _inputs(m, k, min_bytes=2 * L2_BYTES):
    count = max(2, -(-min_bytes // (m * k * 2)))
    return [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(count)]


def act_candidates():
    """(label, ActConfig or None for the default without the branch[, 0: without the branch])."""
    from fourbit.kernels.act_quant import DEFAULT_CONFIG as base

    mm = dataclasses.replace(base, lr_mm_rows=2048, lr_mm_stream_max_k=0)
    return [("default", base), ("single pass + cuBLAS down-projection, one stream", mm),
            ("... on a side stream at every K", dataclasses.replace(mm, lr_mm_stream_max_k=1 << 20)),
            ("no branch (default)", None),
            ("no branch, chunk 2048 from 8192", dataclasses.replace(base, large_chunk=2048), 0),
            ("no branch, chunk 8192 w8 from 8192", dataclasses.replace(base, large_chunk=8192), 0),
            ("no branch, chunk 8192 w16 from 8192", dataclasses.replace(base, large_chunk=8192, large_warps=16), 0),
            ("no branch, chunk 4096 w4 from 8192", dataclasses.replace(base, large_warps=4), 0)]


def probe_act(m, log):
    from fourbit.formats import make_format
    from fourbit.kernels.act_quant import DEFAULT_CONFIG, act_quant, cat_down, fold_down
    from fourbit.kernels.reference import smooth_reciprocal

    fmt = make_format("int4p2")
    rows = []
    for k in sorted({k for k, _ in SHAPES}):
        xs = _inputs(m, k)
        floor_ms = time_graph([lambda x=x: x.to(torch.float8_e4m3fn) for x in xs])
        smooth = torch.rand(k, device="cuda") + 0.5
        down = torch.randn(RANK, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
        folded, rsm = fold_down(down, smooth), smooth_reciprocal(smooth)
        dcat = cat_down(folded)
        base = act_quant(xs[0], fmt, None, None, k, config=DEFAULT_CONFIG, down_folded=folded, smooth_recip=rsm,
                         down_cat=dcat)
        for label, cfg, *rank in act_candidates():
            f = None if cfg is None or rank == [0] else folded
            c = cfg or DEFAULT_CONFIG
            fns = [lambda x=x: act_quant(x, fmt, None, None, k, config=c, down_folded=f, smooth_recip=rsm,
                                         down_cat=None if f is None else dcat) for x in xs]
            try:
                ms = time_graph(fns)
                got = fns[0]()
            except Exception as e:  # a variant that does not compile is reported, not fatal
                log(f"  K={k} {label}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:160]}")
                continue
            same = bool(torch.equal(got.q.view(torch.uint8), base.q.view(torch.uint8))
                        and torch.equal(got.row_scale, base.row_scale))
            lr_err = None if f is None else float((got.lr - base.lr).norm() / base.lr.norm())
            rows.append(dict(M=m, K=k, variant=label, ms=ms, floor_ms=floor_ms, same_codes=same, lr_err=lr_err))
            log(f"  M={m} K={k} {label:42s} {ms:.4f} ms  {ms / floor_ms:.2f}x floor  codes same: {same}  "
                f"lr err vs default: {lr_err}")
        del xs
        torch.cuda.empty_cache()
    return rows


def probe_gemm(m, log):
    from fourbit.kernels.gemm import default_config, scaled_gemm

    rows = []
    for k, n in SHAPES:
        a = [torch.randint(-8, 8, (m, k), device="cuda").to(torch.float16).to(torch.float8_e4m3fn) for _ in range(2)]
        b = torch.randint(-8, 8, (n, k), device="cuda").to(torch.float16).to(torch.float8_e4m3fn)
        sa, sb = torch.rand(m, device="cuda") + 0.5, torch.rand(n, device="cuda") + 0.5
        lr, up = torch.randn(m, RANK, device="cuda"), torch.randn(n, RANK, device="cuda")
        bias = torch.randn(n, device="cuda")
        cfg = default_config(m, n, k, a[0].dtype)
        ref = scaled_gemm(a[0], b, sa, sb, lr, up, bias, config=cfg)
        sk = dataclasses.replace(cfg, stream_k=not cfg.stream_k)
        variants = [(f"{'stream-K' if c.stream_k else 'data-parallel'}{'' if branch else ', no branch'}", c, branch)
                    for c in (cfg, sk) for branch in (True, False)]
        for label, c, branch in variants + [(label + " (again)", c, br) for label, c, br in variants]:
            fns = [lambda a_=a_, c=c, branch=branch: scaled_gemm(a_, b, sa, sb, lr if branch else None,
                                                                 up if branch else None, bias, config=c) for a_ in a]
            try:
                ms = time_graph(fns)
                y = fns[0]().float()
                same = float((y - ref.float()).norm() / ref.float().norm()) if branch else None
            except Exception as e:
                log(f"  {k}x{n} {label}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:160]}")
                continue
            rows.append(dict(M=m, K=k, N=n, variant=label, ms=ms, same_output=same))
            log(f"  M={m} {k}x{n} {label:34s} {ms:.4f} ms  rel diff to default: {same}")
        del a, b
        torch.cuda.empty_cache()
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=RESULTS_DIR)
    p.add_argument("--act-m", default="4608", help="token counts of the act_quant half ('' to skip)")
    p.add_argument("--gemm-m", default="4608,1024", help="token counts of the GEMM half ('' to skip)")
    args = p.parse_args(argv)
    env = environment()
    print(json.dumps(env), flush=True)
    act, gemm = [], []
    log = lambda s: print(s, flush=True)  # noqa: E731
    for m in (int(v) for v in args.act_m.split(",") if v):
        act += probe_act(m, log)
    for m in (int(v) for v in args.gemm_m.split(",") if v):
        gemm += probe_gemm(m, log)
    md = "## act_quant int4p2, rank 32\n\n" + md_table(
        ["M", "K", "variant", "ms", "x floor", "codes = default", "lr rel err vs default"],
        [[r["M"], r["K"], r["variant"], f"{r['ms']:.4f}", f"{r['ms'] / r['floor_ms']:.2f}", r["same_codes"],
          "-" if r["lr_err"] is None else f"{r['lr_err']:.1e}"] for r in act])
    md += "\n\n## fp8 GEMM, rank-32 epilogue\n\n" + md_table(
        ["M", "K x N", "variant", "ms", "rel diff to default"],
        [[r["M"], f"{r['K']}x{r['N']}", r["variant"], f"{r['ms']:.4f}",
          "-" if r["same_output"] is None else f"{r['same_output']:.1e}"] for r in gemm])
    jp, mp = write_results(args.out, "branch-probe", env, {"act": act, "gemm": gemm}, md)
    print(md)
    print(f"wrote {jp} {mp}")


if __name__ == "__main__":
    main()
