"""act_quant's single pass at every family's (M, K): which chunk width and warps, against a plain cast.

    python benchmarks/probes/act_chunk_probe.py            # on a CUDA GPU; ~1-2 min on an H200

The single pass walks each row twice in chunks of ``ActConfig.chunk`` columns (1024 by default, tuned at FLUX's
K = 3072): at K = 1152 its second chunk is 7/8 masked. Per (M, K), int4p2 with smoothing, no branch, bf16 X from
memory (3 rotating inputs), CUDA graphs replayed in alternation: chunk 256 / 512 / 1024 / 2048 / 4096 x 4 / 8 warps,
the default config (a row of one chunk loaded once: ``one_load``), the same loaded twice, 2 rows per program,
2 rows loaded once,
one_load with 8 warps and with 4 rows x 8 warps;
beside ``x.to(float8_e4m3fn)`` (a cast with no arithmetic: the separate pass's floor here) and the DRAM floor
(bytes read + written at the H200's 4.8 TB/s). Prints the best config per shape; appends one row to
``results/act_chunk_probe.jsonl`` (``--out``: another folder).
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
    args = p.parse_args(argv)
    from fourbit.formats import make_format
    from fourbit.kernels import act_quant as aq

    fmt = make_format("int4p2")
    base = aq.DEFAULT_CONFIG
    rows, table = [], []
    for m, k in family_mk():
        xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
        kp = -(-k // fmt.group_size) * fmt.group_size  # K zero-padded to the group (SANA: 5600 -> 5632)
        smooth = torch.rand(kp, device="cuda") + 0.5
        recip = aq.smooth_reciprocal(smooth)
        g = InterleavedGraphs()
        labels = ["cast to fp8"]
        g.add([lambda x=x: x.to(torch.float8_e4m3fn) for x in xs])
        for chunk in CHUNKS:
            for warps in WARPS:
                cfg = replace(base, chunk=chunk, warps=warps, large_k=0)
                labels.append(f"chunk {chunk} w{warps}")
                g.add([lambda x=x, c=cfg: aq.act_quant(x, fmt, padded_in=kp, smooth_recip=recip, config=c)
                       for x in xs])
        labels.append("default")
        g.add([lambda x=x: aq.act_quant(x, fmt, padded_in=kp, smooth_recip=recip) for x in xs])
        for label, change in (("two loads", dict(one_load=False)), ("2 rows", dict(rows=2)),
                              ("2 rows, one load", dict(rows=2, one_load=True)),
                              ("one load, 8 warps", dict(one_load=True, warps=8)),
                              ("4 rows, one load, 8 warps", dict(rows=4, one_load=True, warps=8))):
            labels.append(label)  # the default's chunks, other program shapes / the one-chunk row loaded once
            g.add([lambda x=x, c=replace(base, **change): aq.act_quant(x, fmt, padded_in=kp, smooth_recip=recip,
                                                                       config=c) for x in xs])
        ms = g.run(args.rounds)
        floor_ms = (m * k * 3 + m * 4) / (DRAM_TBPS * 1e12) * 1e3
        res = dict(M=m, K=k, floor_ms=floor_ms, ms=dict(zip(labels, ms)))
        best = min((lab for lab in labels if lab.startswith("chunk")), key=lambda lab: res["ms"][lab])
        res["best"] = best
        rows.append(res)
        table.append([f"{m}x{k}", f"{floor_ms * 1e3:.1f}", f"{res['ms']['cast to fp8'] * 1e3:.1f}",
                      f"{res['ms']['default'] * 1e3:.1f}", best, f"{res['ms'][best] * 1e3:.1f}",
                      f"{res['ms']['two loads'] * 1e3:.1f}", f"{res['ms']['2 rows'] * 1e3:.1f}",
                      f"{res['ms']['2 rows, one load'] * 1e3:.1f}", f"{res['ms']['one load, 8 warps'] * 1e3:.1f}",
                      f"{res['ms']['4 rows, one load, 8 warps'] * 1e3:.1f}"])
        print(f"{m}x{k}: floor {floor_ms * 1e3:.1f} us, cast {res['ms']['cast to fp8'] * 1e3:.1f}, default "
              f"{res['ms']['default'] * 1e3:.1f}, best {best} {res['ms'][best] * 1e3:.1f} us", flush=True)
    md = "## act_quant int4p2 single pass (no branch), us\n\n" + md_table(
        ["M x K", "DRAM floor", "cast to fp8", "default config", "best chunk / warps", "best", "two loads", "2 rows",
         "2 rows, one load", "one load w8", "4 rows, one load, w8"], table)
    return finish(args.out, "act_chunk_probe", environment(), dict(rows=rows, chunks=CHUNKS, warps=WARPS), md)


if __name__ == "__main__":
    sys.exit(main())
