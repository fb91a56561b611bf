"""act_quant's single pass at every family's (M, K): which chunk width, warps and whole-row loads, against a cast.

    python benchmarks/probes/act_chunk_probe.py            # on a CUDA GPU; ~3 min on an H200

The single pass walks each row twice in chunks of ``ActConfig.chunk`` columns (1024 by default, tuned at FLUX's
K = 3072), or loads a row of one chunk once (``one_load``, padded K up to ``whole_row_k``). Per (M, K) and format
(int4p2, fp8; with smoothing, no branch, bf16 X from memory, 3 rotating inputs), CUDA graphs replayed in
alternation: for int4p2 chunk 256 / 512 / 1024 / 2048 / 4096 x 4 / 8 warps; for both the default config and
``VARIANTS`` (the one-chunk row loaded twice; whole rows loaded once up to padded K 4096 / 8192); beside
``x.to(float8_e4m3fn)`` (a cast with no arithmetic: the separate pass's floor here) and the DRAM floor (bytes read +
written at the H200's 4.8 TB/s). Appends one row to ``results/act_chunk_probe.jsonl`` (``--out``: another folder).
Runs 2026-12-04 / 04b (before the pass left the conversion pipe) also timed 2 and 4 rows per program and 8 warps
for a one-chunk row: all slower.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # benchmarks/: _util, linear
from _util import InterleavedGraphs, environment, finish, md_table  # noqa: E402

CHUNKS = (256, 512, 1024, 2048, 4096)
WARPS = (4, 8)
DRAM_TBPS = 4.8


def family_mk() -> list[tuple[int, int]]:
    from linear import FAMILY_SHAPES

    return sorted({(m, k) for shapes in FAMILY_SHAPES.values() for m, k, _ in shapes if m >= 2048}, key=lambda t: t)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "results"))
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--formats", default="int4p2,fp8", help="int4p2 also sweeps chunk widths and warps")
    args = p.parse_args(argv)
    from fourbit.formats import make_format
    from fourbit.kernels import act_quant as aq

    base = aq.DEFAULT_CONFIG
    rows, table = [], []
    for fmt_name in args.formats.split(","):
        fmt = make_format(fmt_name)
        for m, k in family_mk():
            res = _time_shape(aq, fmt, m, k, base, args.rounds, sweep=fmt_name == "int4p2")
            rows.append(dict(res, format=fmt_name))
            us = lambda lab: f"{res['ms'][lab] * 1e3:.1f}" if lab in res["ms"] else "-"  # noqa: E731
            table.append([fmt_name, f"{m}x{k}", f"{res['floor_ms'] * 1e3:.1f}", us("cast to fp8"), us("default"),
                          res.get("best", "-"), us(res["best"]) if "best" in res else "-"]
                         + [us(label) for label, _ in VARIANTS])
            print(f"{fmt_name} {m}x{k}: floor {res['floor_ms'] * 1e3:.1f} us, cast {us('cast to fp8')}, default "
                  f"{us('default')}, " + ", ".join(f"{label} {us(label)}" for label, _ in VARIANTS), flush=True)
    md = "## act_quant single pass (no branch), us\n\n" + md_table(
        ["format", "M x K", "DRAM floor", "cast to fp8", "default config", "best chunk / warps", "best"]
        + [label for label, _ in VARIANTS], table)
    return finish(args.out, "act_chunk_probe", environment(), dict(rows=rows, chunks=CHUNKS, warps=WARPS), md)


#: configurations timed beside the default (``ActConfig`` changes): the one-chunk row loaded twice, and whole rows
#: loaded once up to padded K 4096 / 8192 (one chunk of next_pow2(Kp) instead of walking 1024-column chunks twice)
VARIANTS = (("two loads", dict(one_load=False)), ("whole rows to 4096", dict(whole_row_k=4096)),
            ("whole rows to 8192", dict(whole_row_k=8192)), ("whole rows to 8192, 8 warps", dict(whole_row_k=8192,
                                                                                                 warps=8)))


def _time_shape(aq, fmt, m, k, base, rounds, sweep):
    """Median ms of each configuration at (m, k), CUDA graphs replayed in alternation over 3 rotating inputs."""
    xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    kp = -(-k // fmt.group_size) * fmt.group_size if fmt.group_size else k  # zero-padded to the group
    smooth = torch.rand(kp, device="cuda") + 0.5
    recip = aq.smooth_reciprocal(smooth)
    g = InterleavedGraphs()
    labels = ["cast to fp8"]
    g.add([lambda x=x: x.to(torch.float8_e4m3fn) for x in xs])
    configs = [(f"chunk {c} w{w}", replace(base, chunk=c, warps=w, large_k=0)) for c in CHUNKS for w in WARPS] \
        if sweep else []
    configs += [("default", base)] + [(label, replace(base, **change)) for label, change in VARIANTS]
    for label, cfg in configs:
        labels.append(label)
        g.add([lambda x=x, c=cfg: aq.act_quant(x, fmt, padded_in=kp, smooth_recip=recip, config=c) for x in xs])
    ms = g.run(rounds)
    res = dict(M=m, K=k, floor_ms=(m * k * 3 + m * 4) / (DRAM_TBPS * 1e12) * 1e3, ms=dict(zip(labels, ms)))
    if sweep:
        res["best"] = min((lab for lab in labels if lab.startswith("chunk")), key=lambda lab: res["ms"][lab])
    return res


if __name__ == "__main__":
    sys.exit(main())
