"""The per-layer ratios with few variants per shape: bf16, the separate-pass bound, and the W4A4 layer.

    python benchmarks/probes/bound_probe.py                             # on a CUDA GPU; ~1 min on an H100

``linear.py`` replays ~25 variants of a shape in each interleaved round; here only four: bf16 ``F.linear``, the
separate-pass bound (X cast to FP8 + cuBLAS's FP8 GEMM, no branch: the least any layer that quantizes X in a pass
of its own can cost), int4p2 W4A4 rank 32 (speed mode) and the same without the branch. With fewer variants the
bf16 GEMMs make up more of the GPU's load, and the GPU runs at its power limit, so the mix can move the ratios:
this shows by how much, at FLUX.1's six shapes, M = 4608. Writes bound-probe.<device>.<date>.{json,md}.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/_util.py
from _util import InterleavedGraphs, environment, finish, geomean, gpu_probe_args, md_table  # noqa: E402
from linear import SHAPES, probe_case  # noqa: E402

M = 4608
VARIANTS = ("bf16 F.linear", "separate-pass bound", "int4p2 W4A4 r32", "int4p2 W4A4, no branch")


def main(argv=None) -> int:
    from fourbit.kernels.linear import linear_forward

    args = gpu_probe_args(__doc__, "bound_probe.py", argv, rounds=20)
    if args is None:
        return 2
    env = environment()
    res, rows, ratios = {}, [], {v: [] for v in VARIANTS}
    for k, n in SHAPES:
        with torch.no_grad():
            case = probe_case(M, k, n)
            layer, w, b, xs = case.layer, case.w, case.b, case.xs
            timer = InterleavedGraphs()
            timer.add([lambda x=x: F.linear(x, w, b) for x in xs])
            timer.add([lambda x=x, f=case.bound: f(x) for x in xs])
            timer.add([lambda x=x: linear_forward(layer, x) for x in xs])
            timer.add([lambda x=x: linear_forward(layer, x, lowrank="none") for x in xs])
            times = dict(zip(VARIANTS, timer.run(args.rounds)))
        res[f"{k}x{n}"] = times
        base = times[VARIANTS[0]]
        for v, ms in times.items():
            ratios[v].append(base / ms)
        rows.append([f"{k}x{n}"] + [f"{ms:.4f} ({base / ms:.2f}x)" for ms in times.values()])
        print(f"{k}x{n}", {v: round(ms, 4) for v, ms in times.items()}, flush=True)
        torch.cuda.empty_cache()
    md = (f"M = {M}; median ms per call over {args.rounds} interleaved CUDA-graph rounds of the four variants "
          "(speed-up vs bf16 in parentheses)\n\n" + md_table(["K x N"] + list(VARIANTS), rows)
          + "\n\nGeometric mean vs bf16:\n\n"
          + md_table(["variant", "geomean"], [[v, f"{geomean(r):.3f}"] for v, r in ratios.items()]))
    return finish(args.out, "bound-probe", env, res, md)


if __name__ == "__main__":
    sys.exit(main())
