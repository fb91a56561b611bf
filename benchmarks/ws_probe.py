"""Does Triton's warp specialization make the FP8 GEMM (and so the W4A4 layer) faster on Hopper?

    python benchmarks/ws_probe.py --out benchmarks/results      # on a CUDA GPU; ~3 min on an H100

At FLUX.1's six linear shapes (M = 4608) and its two GEMMs that take a fused GELU, side by side in one run
(interleaved CUDA-graph timing, medians, ratios within the run):
  - GEMM alone (FP8 operands, per-row x per-column scales, rank-32 branch, bias, bf16 out): the default tiles
    vs ``GemmConfig(warp_specialize=True)`` variants, and cuBLAS ``torch._scaled_mm`` rowwise (no branch) as the
    ceiling; whether each variant gives the default's bits;
  - the whole int4p2 W4A4 rank-32 layer from bf16 X (act_quant + GEMM), default vs warp-specialized, against bf16
    ``nn.Linear``; and a *separate-pass bound*: cuBLAS FP8 GEMM + ``x.to(float8)`` (a pure cast that reads X and
    writes one byte per element: no quantization pass can cost less), i.e. the best any design that quantizes X in
    its own pass could reach.
Writes ws-probe.<device>.<date>.{json,md}.
"""
from __future__ import annotations

import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import InterleavedGraphs, environment, finish, geomean, gpu_probe_args, md_table  # noqa: E402
from linear import SHAPES, inputs, make_layer  # noqa: E402

M = 4608
GELU_SHAPES = [("double-block MLP in + GELU", 4096, 3072, 12288, (0, 12288)),
               ("single-block QKV+MLP in + GELU", 4608, 3072, 21504, (9216, 21504))]


def ws_variants(base):
    """(name, config) of the warp-specialized tile configs tried against ``base``."""
    ws = dict(num_warps=4, tma_store=False, stream_k=False, warp_specialize=True)
    # Triton buffers the branch's TMA loads like the K loop's: 128 x 256 with 3 stages needs 328 KB of shared
    # memory (the H100 has 227), so the branch variants take 2 stages or 128 x 128 tiles
    return [("ws 128x256 s2", dataclasses.replace(base, BM=128, BN=256, num_stages=2, **ws)),
            ("ws 128x128 s3", dataclasses.replace(base, BM=128, BN=128, num_stages=3, **ws))]


NO_BRANCH_WS = ("ws 128x256 s3, no branch", dict(BM=128, BN=256, num_stages=3, num_warps=4, tma_store=False,
                                                 stream_k=False, warp_specialize=True))


def gemm_table(args, g):
    from fourbit.kernels.activation import OutputActivation
    from fourbit.kernels.gemm import default_config, scaled_gemm

    shapes = [(f"{k}x{n}", M, k, n, None) for k, n in SHAPES]
    shapes += [(label, m, k, n, OutputActivation("gelu_tanh", lo, hi)) for label, m, k, n, (lo, hi) in GELU_SHAPES]
    res = {}
    for label, m, k, n, act in shapes:
        a = torch.randint(-8, 8, (m, k), device="cuda", generator=g).to(torch.float8_e4m3fn)
        b = torch.randint(-8, 8, (n, k), device="cuda", generator=g).to(torch.float8_e4m3fn)
        sa, sb = torch.rand(m, device="cuda", generator=g) * 1e-3, torch.rand(n, device="cuda", generator=g)
        lr, up = torch.randn(m, 32, device="cuda", generator=g), torch.randn(n, 32, device="cuda", generator=g)
        bias = torch.randn(n, device="cuda", generator=g)
        base = default_config(m, n, k, a.dtype)
        configs = [("default " + base.key(), base)] + ws_variants(base)
        want = scaled_gemm(a, b, sa, sb, lr, up, bias, torch.bfloat16, base, act)
        timer, names, same = InterleavedGraphs(), [], {}
        for name, cfg in configs:
            try:
                got = scaled_gemm(a, b, sa, sb, lr, up, bias, torch.bfloat16, cfg, act)
            except Exception as e:  # a config this Triton cannot build: recorded, not fatal
                print(f"{label} {name}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                res.setdefault(label, {})[name] = f"failed: {type(e).__name__}"
                continue
            same[name] = bool(torch.equal(got, want))
            timer.add([lambda cfg=cfg: scaled_gemm(a, b, sa, sb, lr, up, bias, torch.bfloat16, cfg, act)])
            names.append(name)
        if act is None:  # the main loop alone: no branch, default vs warp-specialized with 3 stages
            for name, cfg in (("default, no branch", base),
                              (NO_BRANCH_WS[0], dataclasses.replace(base, **NO_BRANCH_WS[1]))):
                timer.add([lambda cfg=cfg: scaled_gemm(a, b, sa, sb, None, None, bias, torch.bfloat16, cfg)])
                names.append(name)
            sa2, sb2 = sa.reshape(-1, 1), sb.reshape(1, -1)
            bt = b.t()
            timer.add([lambda: torch._scaled_mm(a, bt, scale_a=sa2, scale_b=sb2, out_dtype=torch.bfloat16)])
            names.append("cuBLAS FP8 rowwise (no branch)")
        times = dict(zip(names, timer.run(args.rounds)))
        res[label] = dict(m=m, k=k, n=n, ms=times, same_bits_as_default=same)
        print(label, {k_: round(v, 4) for k_, v in times.items()}, same, flush=True)
    return res


def layer_table(args):
    """int4p2 W4A4 r32 layer end to end: default vs warp-specialized GEMM; bf16; the separate-pass bound."""
    from fourbit.kernels.gemm import GemmConfig
    from fourbit.kernels.linear import layer_state, linear_forward, weight_operand

    ws = ws_variants(GemmConfig())
    res = {}
    for k, n in SHAPES:
        layer = make_layer(k, n, "int4p2", "int4p2")
        lin = torch.nn.Linear(k, n, device="cuda", dtype=torch.bfloat16)
        xs = inputs(M, k)
        with torch.no_grad():
            want = linear_forward(layer, xs[0])
            w = weight_operand(layer, layer_state(layer), memory=False)
            wt, sb = w.w.t(), w.col_scale.reshape(1, -1)
            sa = torch.ones(M, 1, device="cuda")
            timer, names, same = InterleavedGraphs(), [], {}
            timer.add([lambda x=x: lin(x) for x in xs])
            names.append("bf16 nn.Linear")
            timer.add([lambda x=x: linear_forward(layer, x) for x in xs])
            names.append("W4A4 r32, default GEMM")
            for name, cfg in ws:
                try:
                    same[name] = bool(torch.equal(linear_forward(layer, xs[0], gemm_config=cfg), want))
                    timer.add([lambda x=x, cfg=cfg: linear_forward(layer, x, gemm_config=cfg) for x in xs])
                except Exception as e:
                    print(f"layer {k}x{n} {name}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                names.append(f"W4A4 r32, GEMM {name}")
            timer.add([lambda x=x: torch._scaled_mm(x.to(torch.float8_e4m3fn), wt, scale_a=sa, scale_b=sb,
                                                    out_dtype=torch.bfloat16) for x in xs])
            names.append("bound: cast X to fp8 + cuBLAS FP8 GEMM")
            times = dict(zip(names, timer.run(args.rounds)))
        res[f"{k}x{n}"] = dict(ms=times, same_bits_as_default=same)
        print(f"layer {k}x{n}", {k_: round(v, 4) for k_, v in times.items()}, same, flush=True)
    return res


def main(argv=None) -> int:
    args = gpu_probe_args(__doc__, "ws_probe.py", argv, rounds=20)
    if args is None:
        return 2
    env = environment()
    g = torch.Generator(device="cuda").manual_seed(0)
    gemms = gemm_table(args, g)
    layers = layer_table(args)
    rows = []
    for label, r in gemms.items():
        t = r.get("ms", {})
        base = next((v for k_, v in t.items() if k_.startswith("default")), None)
        for name, ms in t.items():
            rows.append([label, name, f"{ms:.4f}", f"{base / ms:.3f}" if base else "-",
                         str(r["same_bits_as_default"].get(name, "-"))])
    md = ("## GEMM alone (FP8, row/col scales, rank-32 branch, bias, bf16 out; M = 4608 unless named)\n\n"
          "median ms per call over interleaved CUDA-graph rounds; speed-up = default ms / variant ms\n\n"
          + md_table(["GEMM", "variant", "ms", "speed-up vs default", "same bits as default"], rows))
    lrows, ratios = [], {}
    for label, r in layers.items():
        bf = r["ms"]["bf16 nn.Linear"]
        for name, ms in r["ms"].items():
            ratios.setdefault(name, []).append(bf / ms)
            lrows.append([label, name, f"{ms:.4f}", f"{bf / ms:.3f}", str(r["same_bits_as_default"].get(name, "-"))])
    md += ("\n\n## Whole layer from bf16 X (int4p2 W4A4, rank 32), M = 4608\n\n"
           + md_table(["K x N", "variant", "ms", "vs bf16", "same bits as default"], lrows)
           + "\n\nGeometric mean over the six shapes, vs bf16 nn.Linear:\n\n"
           + md_table(["variant", "geomean vs bf16"], [[k_, f"{geomean(v):.3f}"] for k_, v in ratios.items()]))
    return finish(args.out, "ws-probe", env, dict(gemm=gemms, layer=layers), md)


if __name__ == "__main__":
    sys.exit(main())
