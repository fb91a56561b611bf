"""Memory mode's weight expansion (4-bit codes + group scales -> FP8 operand) against its memory floor.

    python benchmarks/probes/expand_probe.py                             # on a CUDA GPU; ~1 min on an H100

For FLUX.1's weight shapes (int4p2, group 64): ``expand_weight`` (reads 0.5 + 1/64 bytes and writes 1 byte per
parameter) and, as the bandwidth reference in the same run, a device copy of as many bytes as the expansion moves
(``torch.Tensor.copy_`` of a uint8 buffer: half read, half written). Interleaved CUDA-graph timing.
Writes expand-probe.<device>.<date>.{json,md}.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/_util.py
from _util import InterleavedGraphs, environment, finish, gpu_probe_args, md_table  # noqa: E402

SHAPES = [(3072, 3072), (9216, 3072), (12288, 3072), (3072, 12288), (21504, 3072), (3072, 15360)]  # (N, K)


def main(argv=None) -> int:
    from fourbit.formats import make_format
    from fourbit.kernels.weights import expand_weight

    args = gpu_probe_args(__doc__, "expand_probe.py", argv)
    if args is None:
        return 2
    env = environment()
    fmt = make_format("int4p2")
    res, rows = {}, []
    for n, k in SHAPES:
        q = fmt.quantize(torch.randn(n, k, device="cuda"))
        packed, scales, row_scale = fmt.pack(q.codes), q.scales, q.row_scale
        moved = packed.numel() + scales.numel() * scales.element_size() + n * k  # bytes read + written
        src = torch.empty(moved // 2, device="cuda", dtype=torch.uint8)
        dst = torch.empty_like(src)
        out = torch.empty(n, k, device="cuda", dtype=torch.float8_e4m3fn)
        timer = InterleavedGraphs()
        timer.add([lambda: expand_weight(packed, scales, row_scale, fmt, k, out=out)])
        timer.add([lambda: dst.copy_(src)])
        t_expand, t_copy = timer.run(args.rounds)
        res[f"{n}x{k}"] = dict(bytes=moved, expand_ms=t_expand, copy_ms=t_copy)
        rows.append([f"{n} x {k}", f"{moved / 2**20:.1f}", f"{t_expand:.4f}", f"{t_copy:.4f}",
                     f"{t_expand / t_copy:.2f}", f"{moved / (t_expand * 1e-3) / 1e9:.0f}"])
        print(rows[-1], flush=True)
    md = ("int4p2 (group 64) weight -> FP8 operand; median ms per call over interleaved CUDA-graph rounds; 'copy' "
          "moves the same bytes (half read, half written).\n\n"
          + md_table(["N x K", "MiB moved", "expand ms", "copy ms", "expand / copy", "expand GB/s"], rows))
    return finish(args.out, "expand-probe", env, res, md)


if __name__ == "__main__":
    sys.exit(main())
