"""act_quant alone at FLUX.1 activation shapes: the single-pass kernel's tile sweep vs the two-launch path and
the memory floor.

    python benchmarks/act_quant.py              # sweep, prints a table, appends a row to results/act_quant.jsonl
    python benchmarks/act_quant.py --quick      # fewer configs

Floor: reading X once (bf16) and writing the FP8/int8 operand once, at the copy bandwidth measured in the
same run (``x.to(float8_e4m3fn)``: 2 B read + 1 B written per element, torch's elementwise kernel).
Timing: CUDA-graph replays rotating over inputs larger than L2 (``_util.time_graph``), medians.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import environment, geomean, md_table, time_graph, write_results  # noqa: E402

SHAPES = [(4608, 3072), (4608, 12288), (4608, 15360), (1024, 3072), (1024, 15360)]  # (M, K)
RANK = 32
L2_BYTES = 50 << 20


def inputs(m, k, min_bytes=2 * L2_BYTES):
    count = max(2, -(-min_bytes // (m * k * 2)))
    return [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(count)]


def configs(quick):
    """(label, ActConfig) candidates with and without the rank-32 branch; the first is the library default."""
    from fourbit.kernels.act_quant import DEFAULT_CONFIG as base

    def tiles(bm, bk, w=4):  # the two-launch path's quantize tiles (taken with the branch below lr_mm_rows)
        return (f"two-launch, quantize tile {bm}x{bk} w{w}", dataclasses.replace(base, BM=bm, BK=bk, num_warps=w,
                                                                                 lr_mm_rows=0))

    common = [("default", base)]
    lr = common + [("two launches, never cuBLAS", dataclasses.replace(base, lr_mm_rows=0)),
                   ("cuBLAS down-projection, one stream", dataclasses.replace(base, lr_mm_stream_max_k=0)),
                   tiles(2, 1024), tiles(1, 1024), tiles(8, 256)]
    nolr = common + [("single pass, rows=2", dataclasses.replace(base, rows=2)),
                     ("single pass, chunk=512", dataclasses.replace(base, chunk=512)),
                     ("single pass, chunk=2048", dataclasses.replace(base, chunk=2048))]
    if quick:
        lr, nolr = lr[:3], nolr[:3]
    return lr, nolr


def _name(label, cfg, rank):
    if label:
        return label
    keys = ("rows", "chunk", "warps", "stages", "lr_mm_rows", "stats_BM", "stats_BK", "stats_warps")
    from fourbit.kernels.act_quant import DEFAULT_CONFIG as base

    diff = [f"{k}={getattr(cfg, k)}" for k in keys if getattr(cfg, k) != getattr(base, k)]
    return "default + " + " ".join(diff)


def main(argv=None):
    from fourbit.formats import make_format
    from fourbit.kernels.act_quant import act_quant, cat_down, fold_down
    from fourbit.kernels.reference import smooth_reciprocal

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--tag", default="", help="the row's variant, after a dash (e.g. -lrmm)")
    p.add_argument("--formats", default="int4p2,fp4p2,int8")
    args = p.parse_args(argv)
    env = environment()
    print(json.dumps(env), flush=True)
    lr_cfgs, nolr_cfgs = configs(args.quick)
    rows = []
    for m, k in SHAPES:
        xs = inputs(m, k)
        floor_ms = time_graph([lambda x=x: x.to(torch.float8_e4m3fn) for x in xs])
        gbs = 3 * m * k / floor_ms / 1e6
        print(f"M={m} K={k}: copy floor {floor_ms:.4f} ms ({gbs:.0f} GB/s)", flush=True)
        smooth = torch.rand(k, device="cuda") + 0.5
        down = torch.randn(RANK, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
        folded, rsm = fold_down(down, smooth), smooth_reciprocal(smooth)
        dcat_full = cat_down(folded)
        for fi, fname in enumerate(args.formats.split(",")):
            fmt = make_format(fname)
            for rank in (RANK, 0):
                d, f, dcat = (down, folded, dcat_full) if rank else (None, None, None)
                cands = lr_cfgs if rank else nolr_cfgs
                if fi > 0:  # other formats: the default and the old path only
                    cands = cands[:2]
                for label, cfg in cands:
                    fns = [lambda x=x, cfg=cfg: act_quant(x, fmt, smooth, d, k, config=cfg, down_folded=f,
                                                          smooth_recip=rsm, down_cat=dcat) for x in xs]
                    try:
                        ms = time_graph(fns)
                    except Exception as e:  # a config that does not compile is reported, not fatal
                        print(f"  {fname} r{rank} {cfg}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:160]}")
                        continue
                    name = _name(label, cfg, rank)
                    rows.append(dict(M=m, K=k, format=fname, rank=rank, config=name, ms=ms, floor_ms=floor_ms,
                                     x_floor=ms / floor_ms))
                    print(f"  {fname:7s} r{rank:<2d} {name:50s} {ms:.4f} ms  {ms / floor_ms:.2f}x floor", flush=True)
        del xs
        torch.cuda.empty_cache()
    # best single-pass config per (rank) for int4p2 by geometric mean over the shapes
    best = {}
    for rank in (RANK, 0):
        names = {r["config"] for r in rows if r["format"] == "int4p2" and r["rank"] == rank}
        score = {n: geomean([r["x_floor"] for r in rows if r["format"] == "int4p2" and r["rank"] == rank
                             and r["config"] == n]) for n in names}
        best[rank] = sorted(score.items(), key=lambda t: t[1])
    lines = [f"best int4p2 configs (geomean of time / floor over {len(SHAPES)} shapes):"]
    for rank, lst in best.items():
        lines += [f"  rank {rank}: " + "; ".join(f"{n} {v:.2f}x" for n, v in lst[:4])]
    table = md_table(["M", "K", "format", "rank", "config", "ms", "floor ms", "x floor"],
                     [[r["M"], r["K"], r["format"], r["rank"], r["config"], f"{r['ms']:.4f}", f"{r['floor_ms']:.4f}",
                       f"{r['x_floor']:.2f}"] for r in rows])
    md = "\n".join(lines) + "\n\n" + table
    jp, mp = write_results(args.out, "act_quant" + args.tag, env, {"rows": rows, "best": best}, md)
    print(md)
    print(f"wrote {jp} {mp}")


if __name__ == "__main__":
    main()
