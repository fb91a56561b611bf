"""What the GEMM epilogue's low-rank up-projection costs, by the branch operands' dtype.

    python benchmarks/probes/branch_epilogue_probe.py                      # on a CUDA GPU; ~1 min on an H100

FLUX.1's six large GEMMs at 1024 x 1024 (FP8 operands, row / column scales, bf16 output, the tanh-GELU where the
model has it, the default tiles), each timed four ways in interleaved CUDA-graph rounds:
- no branch (the floor),
- rank-32 branch, fp32 lr and up: one TF32 dot per tile (``scaled_gemm``'s path before 2026-12-05),
- bf16 up, fp32 lr: lr rounded to bf16 in the epilogue, one bf16 dot (the library's path for a bf16 model since
  2026-12-05; the branch in 16 bits, ~2^-9 on it; run 2026-12-05a timed lr as hi + lo here instead, to ~2^-16,
  now ``GemmConfig(precise=True)``'s, which also promotes the main accumulator, so not timed beside these),
- bf16 up and bf16 lr: the same dot with lr read in 16 bits (half its bytes: a bound for a 16-bit lr).
Ratios within the run; writes branch-epilogue-probe.<device>.<date>.{json,md}.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/_util.py
from _util import (InterleavedGraphs, environment, finish, gpu_probe_args, md_table,  # noqa: E402
                   scaled_fp8_operands)

SHAPES = [  # (label, M, K, N, tanh-GELU columns [lo, hi) or None)
    ("double-block fused QKV", 4096, 3072, 9216, None),
    ("double-block attention out", 4096, 3072, 3072, None),
    ("double-block MLP in", 4096, 3072, 12288, (0, 12288)),
    ("double-block MLP out", 4096, 12288, 3072, None),
    ("single-block QKV+MLP in", 4608, 3072, 21504, (9216, 21504)),
    ("single-block out", 4608, 15360, 3072, None),
]
RANK = 32


def main(argv=None) -> int:
    from fourbit.kernels.activation import OutputActivation
    from fourbit.kernels.gemm import default_config, scaled_gemm

    args = gpu_probe_args(__doc__, "branch_epilogue_probe.py", argv)
    if args is None:
        return 2
    env = environment()
    g = torch.Generator(device="cuda").manual_seed(0)
    res, rows, totals = {}, [], {}
    for label, m, k, n, cols in SHAPES:
        a, b, sa, sb = scaled_fp8_operands(m, k, n, g)
        lr = torch.randn(m, RANK, device="cuda", generator=g)
        up = torch.randn(n, RANK, device="cuda", generator=g).bfloat16()
        act = None if cols is None else OutputActivation("gelu_tanh", *cols)
        cfg = default_config(m, n, k, a.dtype)
        variants = {
            "no branch": (None, None),
            "fp32 lr, fp32 up (tf32)": (lr, up.float()),
            "fp32 lr (rounded), bf16 up": (lr, up),
            "bf16 lr, bf16 up": (lr.bfloat16(), up),
        }
        ref = {}
        for name, (l, u) in variants.items():  # each path once, untimed: its output against the TF32 path
            ref[name] = scaled_gemm(a, b, sa, sb, l, u, None, torch.bfloat16, cfg, act).float()
        timer = InterleavedGraphs()
        for l, u in variants.values():
            timer.add([lambda l=l, u=u: scaled_gemm(a, b, sa, sb, l, u, None, torch.bfloat16, cfg, act)])
        times = dict(zip(variants, timer.run(args.rounds)))
        exact = ref["fp32 lr, fp32 up (tf32)"]
        err = {name: float((y - exact).norm() / exact.norm()) for name, y in ref.items() if name != "no branch"}
        res[label] = dict(m=m, k=k, n=n, act_columns=cols, config=cfg.key(), ms=times, rel_diff_vs_tf32=err)
        floor = times["no branch"]
        for name, ms in times.items():
            totals[name] = totals.get(name, 0.0) + ms
            rows.append([label, name, f"{ms:.4f}", f"{ms / floor:.3f}",
                         "" if name not in err else f"{err[name]:.1e}"])
        print(label, {k_: round(v, 4) for k_, v in times.items()}, err, flush=True)
    res["sum over the six shapes"] = totals
    md = ("FP8 GEMM, bf16 output, rank-32 branch by operand dtype; median ms per call over interleaved CUDA-graph "
          "rounds; ratio to the same GEMM without the branch; rel. diff of y (bf16) against the TF32 path's.\n\n"
          + md_table(["GEMM", "branch", "ms", "vs no branch", "rel. diff vs TF32"], rows)
          + "\n\nSum over the six shapes (ms): " + ", ".join(f"{k_}: {v:.4f}" for k_, v in totals.items()))
    return finish(args.out, "branch-epilogue-probe", env, res, md)


if __name__ == "__main__":
    sys.exit(main())
