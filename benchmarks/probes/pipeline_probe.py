"""Per layer: act_quant and the GEMM pipelined over row chunks on two streams vs one call of each.

    python benchmarks/probes/pipeline_probe.py                             # on a CUDA GPU; ~1 min on an H100

At FLUX.1's six shapes (M = 4608 and 1024), interleaved CUDA-graph rounds of: bf16 ``F.linear``, the separate-pass
bound (X cast to FP8 + cuBLAS's FP8 GEMM, no branch), the int4p2 W4A4 rank-32 layer in speed mode as one act_quant +
one GEMM ("1 chunk"), and the same pipelined over 2 and 4 row chunks: act_quant of chunk i + 1 beside the GEMM of
chunk i, the GEMMs on a high-priority stream, or on a CUDA green context of the SMs the quantization leaves free
(``GREEN``). Overlapping the memory-bound pass with the compute-bound GEMM is the one way past the separate-pass
bound short of quantizing inside the producer of X. Also the largest difference between a pipelined output and the
one-call output (rows are independent; the down-projection's split over K depends on the row count, so a bf16 step). Writes
pipeline-probe.<device>.<date>.{json,md}.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/_util.py
from _util import InterleavedGraphs, environment, finish, geomean, gpu_probe_args, md_table  # noqa: E402
from linear import SHAPES, probe_case  # noqa: E402

CHUNKS = (2, 4)
#: (quantization SMs, chunks): the GEMMs in a CUDA green context of the other SMs, persistent over that many
GREEN = ((16, 4), (32, 4), (16, 2))


def green_stream(num_sms: int):
    """A stream whose kernels run on ``num_sms`` SMs only (a CUDA green context), or (None, why)."""
    try:
        from torch.cuda.green_contexts import GreenContext

        try:
            gc = GreenContext.create(num_sms=num_sms, device_id=0)
        except TypeError:
            gc = GreenContext.create(num_sms, 0)
        if hasattr(gc, "Stream"):
            return gc, gc.Stream()
        gc.set_context()
        try:
            return gc, torch.cuda.Stream()
        finally:
            gc.pop_context()
    except Exception as e:  # noqa: BLE001 - report any failure as "not available"
        return None, f"{type(e).__name__}: {e}"


def chunk_bounds(m: int, chunks: int, block: int = 128) -> list[tuple[int, int]]:
    """[(start, end), ...]: m rows in at most ``chunks`` runs of whole ``block``-row blocks, as even as possible."""
    blocks = -(-m // block)
    chunks = max(1, min(chunks, blocks))
    bounds, start = [], 0
    for i in range(chunks):
        end = min(m, (blocks * (i + 1) // chunks) * block)
        if end > start:
            bounds.append((start, end))
        start = end
    return bounds


_HIGH_PRIORITY: list = []


def high_priority_stream() -> "torch.cuda.Stream":
    if not _HIGH_PRIORITY:
        lo, hi = torch.cuda.Stream.priority_range()
        _HIGH_PRIORITY.append(torch.cuda.Stream(priority=min(lo, hi)))
    return _HIGH_PRIORITY[0]


def pipelined(x, layer, st, op, chunks, stream=None, gemm_sms=None):
    """The W4A4 layer (speed mode) with act_quant and the GEMM pipelined over row chunks: act_quant on the caller's
    stream, each chunk's GEMM on ``stream`` (default: a high-priority stream; else e.g. a green context's) as soon as
    its operands exist, persistent over ``gemm_sms`` programs (default: all SMs). Every buffer is allocated on the
    caller's stream, which waits for the GEMM stream before returning (no cross-stream allocator bookkeeping)."""
    import fourbit.kernels.gemm as gemm
    from fourbit.kernels.act_quant import act_quant

    stream = stream or high_priority_stream()
    out = torch.empty((x.shape[0], op.w.shape[0]), device=x.device, dtype=x.dtype)
    cur = torch.cuda.current_stream()
    stream.wait_stream(cur)
    saved = gemm.num_sms
    if gemm_sms:
        gemm.num_sms = lambda device: gemm_sms
    try:
        for r0, r1 in chunk_bounds(x.shape[0], chunks):
            a = act_quant(x[r0:r1], layer.act_format, padded_in=layer.padded_in, down_folded=st.down_folded,
                          smooth_recip=st.smooth_recip, down_cat=st.down_cat)
            ready = torch.cuda.Event()
            ready.record(cur)
            with torch.cuda.stream(stream):
                stream.wait_event(ready)
                gemm.scaled_gemm(a.q, op.w, a.row_scale, op.col_scale, a.lr, st.up, st.bias, out_dtype=x.dtype,
                                 out=out[r0:r1])
    finally:
        gemm.num_sms = saved
    cur.wait_stream(stream)
    return out


def main(argv=None) -> int:
    from fourbit.kernels.linear import linear_forward

    args = gpu_probe_args(__doc__, "pipeline_probe.py", argv, rounds=20)
    if args is None:
        return 2
    env = environment()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    greens = {}
    for q, c in GREEN:
        if sms - q not in greens:
            greens[sms - q] = green_stream(sms - q)
        print(f"green context of {sms - q} SMs:", greens[sms - q][1], flush=True)
    green_ok = [(q, c) for q, c in GREEN if greens[sms - q][0] is not None]
    variants = (["bf16 F.linear", "separate-pass bound", "1 chunk"] + [f"{c} chunks" for c in CHUNKS]
                + [f"{c} chunks, GEMM on {sms - q} SMs" for q, c in green_ok])
    res, md = {}, ""
    for m in (4608, 1024):
        rows, ratios = [], {v: [] for v in variants}
        for k, n in SHAPES:
            with torch.no_grad():
                case = probe_case(m, k, n)
                layer, w, b, xs, st, op = case.layer, case.w, case.b, case.xs, case.state, case.op

                def piped(x, c):
                    return pipelined(x, layer, st, op, c)

                one = linear_forward(layer, xs[0])
                diff = {c: float((piped(xs[0], c).float() - one.float()).abs().max()) for c in CHUNKS}
                timer = InterleavedGraphs()
                timer.add([lambda x=x: F.linear(x, w, b) for x in xs])
                timer.add([lambda x=x, f=case.bound: f(x) for x in xs])
                timer.add([lambda x=x: linear_forward(layer, x) for x in xs])
                for c in CHUNKS:
                    timer.add([lambda x=x, c=c: piped(x, c) for x in xs])
                names = variants[:3 + len(CHUNKS)]
                for q, c in green_ok:
                    stream = greens[sms - q][1]
                    try:
                        diff[f"green{q}/{c}"] = float((pipelined(xs[0], layer, st, op, c, stream, sms - q).float()
                                                       - one.float()).abs().max())
                        timer.add([lambda x=x, c=c, s=stream, g=sms - q: pipelined(x, layer, st, op, c, s, g)
                                   for x in xs])
                        names.append(f"{c} chunks, GEMM on {sms - q} SMs")
                    except Exception as e:  # noqa: BLE001 - a capture the green context does not allow
                        print(f"green {q}/{c} failed: {type(e).__name__}: {e}", flush=True)
                        torch.cuda.synchronize()
                times = dict(zip(names, timer.run(args.rounds)))
            res[f"{m}:{k}x{n}"] = {"ms": times, "max_abs_diff_vs_1_chunk": diff}
            base = times[variants[0]]
            for v, ms in times.items():
                ratios[v].append(base / ms)
            rows.append([f"{k}x{n}"] + [f"{times[v]:.4f} ({base / times[v]:.2f}x)" if v in times else "-"
                                        for v in variants]
                        + [f"{max(diff.values()):.1e}"])
            print(m, f"{k}x{n}", {v: round(ms, 4) for v, ms in times.items()}, diff, flush=True)
            del case, xs, timer
            torch.cuda.empty_cache()
        md += (f"## M = {m}\n\nmedian ms per call over {args.rounds} interleaved CUDA-graph rounds (speed-up vs bf16 "
               "in parentheses); last column: largest |pipelined - 1 chunk| over the chunk counts\n\n"
               + md_table(["K x N"] + variants + ["max diff"], rows) + "\n\nGeometric mean vs bf16:\n\n"
               + md_table(["variant", "geomean", "shapes"],
                          [[v, f"{geomean(r):.3f}", len(r)] for v, r in ratios.items()]) + "\n\n")
    return finish(args.out, "pipeline-probe", env, res, md)


if __name__ == "__main__":
    sys.exit(main())
