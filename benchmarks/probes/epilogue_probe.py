"""What the GEMM epilogue's activation costs, and whether a flattened persistent loop hides it.

    python benchmarks/probes/epilogue_probe.py                             # on a CUDA GPU; ~1 min on an H100

FLUX.1's GEMMs that take a fused GELU (``fourbit.nn.inductor_options``): the double blocks' MLP input
(M = 4096, K = 3072, N = 12288, GELU on every column) and the single blocks' fused Q/K/V + MLP input
(M = 4608, N = 21504, GELU on columns 9216..21504); FP8 operands, rank-32 branch, bf16 output. Each with no
activation and with tanh-GELU, at the default tiles and with ``GemmConfig(flatten=True)`` (the persistent tile
loop flattened with the K loop, so the next tile's loads can be issued during an epilogue; it needs 2 stages or no
TMA store to fit in shared memory); interleaved
CUDA-graph timing, ratios within the run. Writes epilogue-probe.<device>.<date>.{json,md}.
"""
from __future__ import annotations

import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/_util.py
from _util import (InterleavedGraphs, environment, finish, gpu_probe_args, md_table,  # noqa: E402
                   scaled_fp8_operands)

SHAPES = [  # (label, M, K, N, activation columns [lo, hi))
    ("double-block MLP in", 4096, 3072, 12288, (0, 12288)),
    ("single-block QKV+MLP in", 4608, 3072, 21504, (9216, 21504)),
]


def main(argv=None) -> int:
    from fourbit.kernels.activation import OutputActivation
    from fourbit.kernels.gemm import default_config, scaled_gemm

    args = gpu_probe_args(__doc__, "epilogue_probe.py", argv)
    if args is None:
        return 2
    env = environment()
    g = torch.Generator(device="cuda").manual_seed(0)
    res, rows = {}, []
    for label, m, k, n, (lo, hi) in SHAPES:
        a, b, sa, sb = scaled_fp8_operands(m, k, n, g)
        lr, up = torch.randn(m, 32, device="cuda", generator=g), torch.randn(n, 32, device="cuda", generator=g)
        base = default_config(m, n, k, a.dtype)
        variants = {}
        flat = [("flatten, 2 stages", dataclasses.replace(base, flatten=True, num_stages=2)),
                ("flatten, 3 stages, no TMA store", dataclasses.replace(base, flatten=True, tma_store=False))]
        for cfg_name, cfg in [("default", base)] + flat:  # (flattened with 3 stages + TMA store: over shared memory)
            for act_name, act in (("none", None), ("gelu_tanh", OutputActivation("gelu_tanh", lo, hi))):
                variants[f"{cfg_name}, {act_name}"] = (cfg, act)
        timer = InterleavedGraphs()
        for cfg, act in variants.values():
            timer.add([lambda cfg=cfg, act=act: scaled_gemm(a, b, sa, sb, lr, up, None, torch.bfloat16, cfg, act)])
        times = dict(zip(variants, timer.run(args.rounds)))
        ref = times["default, none"]
        res[label] = dict(m=m, k=k, n=n, act_columns=[lo, hi], ms=times)
        rows += [[label, name, f"{ms:.4f}", f"{ms / ref:.3f}"] for name, ms in times.items()]
        print(label, {k_: round(v, 4) for k_, v in times.items()}, flush=True)
    md = ("FP8 GEMM with the rank-32 branch, bf16 output; median ms per call over interleaved CUDA-graph rounds; "
          "ratio to the default tiles without an activation.\n\n"
          + md_table(["GEMM", "tiles, activation", "ms", "vs default, none"], rows))
    return finish(args.out, "epilogue-probe", env, res, md)


if __name__ == "__main__":
    sys.exit(main())
