"""Image-level check of block scales: SVDQuant W4A4 r32 with int4p2 codes under one fp32 scale per 128 columns
(X per (row, 128 columns), W per (output row, 128 columns)) against today's int4p2 and int4, on the bundled models.

    python benchmarks/probes/blockwise_lpips.py --samples 128        # CPU, ~25 min for both models

The block format is defined here, for this measurement only (``int4p2-b128``: ``int4p2``'s reference applied to
each 128-column block as if it were a row; no kernel, no checkpoint support), and registered before the variants are
parsed; the runs go through ``benchmarks/quality.py`` (same seeds, samples, metrics, one row per model in
quality.jsonl).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/quality.py

BLOCK = 128


def register_block_format():
    from fourbit.formats import FORMATS, register_format
    from fourbit.formats.base import Format, QuantizedTensor
    from fourbit.formats.int4p2 import Int4P2

    if "int4p2-b128" in FORMATS:
        return

    class Int4P2Block128(Format):
        """int4p2 per 128-column block: code * 2^e[64-group] * r[row, block]. scales: the int8 exponents (R, K/64);
        row_scale: the fp32 block scales (R, K/128)."""

        name = "int4p2-b128"
        default_group_size = BLOCK
        fixed_group_size = True
        code_dtype = torch.int8
        scale_dtype = torch.int8

        def __init__(self, group_size=None):
            super().__init__(BLOCK)
            self._inner = Int4P2(64)

        def quantize(self, x):
            xf = self.check_input(x)
            r, k = xf.shape
            q = self._inner.quantize(xf.reshape(r * k // BLOCK, BLOCK))  # one "row" per block
            return QuantizedTensor(q.codes.reshape(r, k), q.scales.reshape(r, k // 64),
                                   q.row_scale.reshape(r, k // BLOCK))

        def dequantize(self, q, dtype=torch.float32):
            r, k = q.codes.shape
            inner = QuantizedTensor(q.codes.reshape(-1, BLOCK), q.scales.reshape(-1, BLOCK // 64),
                                    q.row_scale.reshape(-1, 1))
            return self._inner.dequantize(inner).reshape(r, k).to(dtype)

        def scale_bits(self) -> float:
            return 2 * 8.0 + 32.0  # two int8 exponents and one fp32 scale per 128 columns

    register_format(Int4P2Block128)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="fashion-dit,fashion-unet")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--out", default="out/blockwise-lpips")
    p.add_argument("--results", default=None, help="folder of quality.jsonl (default benchmarks/results; '' none)")
    args = p.parse_args(argv)
    register_block_format()
    import quality

    variants = "fp16,svdquant:w4a4:r32,svdquant:w4a4:r32:fmt=int4p2,svdquant:w4a4:r32:fmt=int4p2-b128"
    cmd = ["--models", args.models, "--samples", str(args.samples), "--steps", "20", "--calib-samples", "32",
           "--variants", variants, "--data-samples", "0", "--out", args.out]
    if args.results is not None:
        cmd += ["--results", args.results]
    return quality.main(cmd)


if __name__ == "__main__":
    sys.exit(main())
