"""What FP8 accumulation precision costs: the GEMM of real fp4p2 / int4p2 layers with the accumulator promoted
to fp32 (``GemmConfig.precise``) at several tile shapes, against the fast default.

    python benchmarks/probes/accum_probe.py            # H100/H200; appends a row to benchmarks/results/accum_probe.jsonl

Hopper's FP8 tensor-core MMA accumulates with reduced precision; Triton's ``max_num_imprecise_acc`` adds each
BK-deep partial product into an fp32 accumulator. With 128 x 256 tiles and 8 warps that second accumulator
does not fit the registers; smaller tiles halve it. For each layer (random weights, smoothing and rank-32
branch, as ``linear.py`` builds them): the GEMM on act_quant's operands with each config, timed in interleaved
CUDA-graph replays, and its relative error against ``quant_linear_reference`` (fp32) and against the fp32 twin
GEMM on the same operands (``scaled_gemm_torch``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/_util.py
from _util import RESULTS_DIR, InterleavedGraphs, environment, md_table, write_results  # noqa: E402
from linear import inputs, make_layer, rel_err  # noqa: E402

LAYERS = [("fp4p2", 4608, 3072, 3072), ("int4p2", 4608, 3072, 3072), ("fp4p2", 4608, 15360, 3072),
          ("int4p2", 4608, 15360, 3072), ("fp4p2", 4608, 3072, 12288)]


def configs():
    from fourbit.kernels.gemm import GemmConfig

    return {
        "default 128x256 (imprecise)": None,
        "128x256 w8 s3 precise": GemmConfig(128, 256, 128, 8, 8, 3, True, precise=True, tma_store=True),
        "128x128 w8 s4 imprecise": GemmConfig(128, 128, 128, 8, 8, 4, True, tma_store=True),
        "128x128 w8 s4 precise": GemmConfig(128, 128, 128, 8, 8, 4, True, precise=True, tma_store=True),
        "128x128 w4 s4 precise": GemmConfig(128, 128, 128, 8, 4, 4, True, precise=True, tma_store=True),
        "256x128 w8 s3 precise": GemmConfig(256, 128, 128, 8, 8, 3, True, precise=True, tma_store=True),
        "64x256 w4 s4 precise": GemmConfig(64, 256, 128, 8, 4, 4, True, precise=True, tma_store=True),
    }


def probe(fmt, m, k, n, log):
    from fourbit.kernels.act_quant import act_quant
    from fourbit.kernels.gemm import scaled_gemm, scaled_gemm_torch
    from fourbit.kernels.linear import layer_state, weight_operand
    from fourbit.kernels.reference import quant_linear_reference

    layer = make_layer(k, n, fmt, fmt)
    st = layer_state(layer)
    w = weight_operand(layer, st, memory=False)
    xs = inputs(m, k)
    ops = [act_quant(x, layer.act_format, padded_in=layer.padded_in, down_folded=st.down_folded,
                     smooth_recip=st.smooth_recip, down_cat=st.down_cat) for x in xs]
    ref = quant_linear_reference(layer, xs[0])
    a0 = ops[0]
    twin = scaled_gemm_torch(a0.q, w.w, a0.row_scale, w.col_scale, a0.lr, st.up, st.bias, out_dtype=torch.float32)
    rows, graphs, names = [], InterleavedGraphs(), []
    for name, cfg in configs().items():
        def run(a, cfg=cfg):
            return scaled_gemm(a.q, w.w, a.row_scale, w.col_scale, a.lr, st.up, st.bias, config=cfg)
        try:
            y = run(a0)
            errs = dict(err_vs_reference=rel_err(y, ref), err_vs_fp32_twin=rel_err(y, twin))
            graphs.add([lambda a=a, run=run: run(a) for a in ops])
            names.append((name, errs))
        except Exception as e:  # a config that does not compile or fit is reported, not fatal
            log(f"  {fmt} {m}x{k}x{n} {name}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    for (name, errs), t in zip(names, graphs.run()):
        rows.append(dict(format=fmt, M=m, K=k, N=n, config=name, ms=t, **errs))
        log(f"  {fmt} {m}x{k}x{n} {name:30s} {t:.4f} ms  err vs ref {errs['err_vs_reference']:.2e} "
            f"vs fp32 twin {errs['err_vs_fp32_twin']:.2e}")
    rows.append(dict(format=fmt, M=m, K=k, N=n, config="fp32 twin (scaled_gemm_torch)", ms=float("nan"),
                     err_vs_reference=rel_err(twin.to(torch.bfloat16), ref), err_vs_fp32_twin=0.0))
    del layer, xs, ops
    torch.cuda.empty_cache()
    return rows


def markdown(rows):
    out = ["## FP8 accumulation: GEMM time and error by config (act_quant's operands; interleaved graph timing)\n"]
    table = []
    for r in rows:
        base = next(b for b in rows if (b["format"], b["K"], b["N"]) == (r["format"], r["K"], r["N"])
                    and b["config"].startswith("default"))
        table.append([r["format"], f"{r['M']}x{r['K']}x{r['N']}", r["config"], r["ms"],
                      r["ms"] / base["ms"] if r["ms"] == r["ms"] else "-", f"{r['err_vs_reference']:.2e}",
                      f"{r['err_vs_fp32_twin']:.2e}"])
    out.append(md_table(["format", "M x K x N", "config", "GEMM ms", "time vs default", "rel err vs reference",
                         "rel err vs fp32 twin GEMM"], table))
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=RESULTS_DIR)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("accum_probe.py needs a CUDA GPU")
    env = environment()
    log = lambda s: print(s, flush=True)  # noqa: E731
    log(json.dumps(env))
    rows = []
    for fmt, m, k, n in LAYERS:
        rows += probe(fmt, m, k, n, log)
        md = markdown(rows)
        jp, mp = write_results(args.out, "accum-probe", env, {"rows": rows}, md)
    log(md)


if __name__ == "__main__":
    main()
