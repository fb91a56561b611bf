"""MXFP4 (OCP Microscaling v1.0): e2m1 codes, groups of 32 (fixed), one power-of-two E8M0 scale per group.

X = 2^e with e = floor(log2(max|x_group|)) - 2 (2 = emax of e2m1), clamped to E8M0's [-127, 127]
(an all-zero group gets e = -127); stored as uint8 e + 127 (255, the E8M0 NaN, is never produced).
code = e2m1(x / X): nearest, ties to even; x / X lies in [-8, 8) and values beyond +-6 saturate to +-6 as
the spec says, so the group maximum can lose up to 2X (more than half a step: the price of a
power-of-two scale). x^ = e2m1_value * X, exact in fp32.
Codes are uint8 0..15, the e2m1 bit pattern (see ``floats``). Bits per element: 4 + 8 / 32 = 4.25.
Runs fast on: Blackwell (native MX block-scaled MMA); the scales are powers of two but span 2^+-127, so
without a row scale the values do not fit an e4m3 operand (see ``fp4p2`` for the Hopper variant).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import Format, QuantizedTensor, grouped, pow2
from .floats import e2m1_decode, e2m1_encode

EMAX_ELEM = 2  # floor(log2(6)) for e2m1
E8M0_BIAS = 127


class MxFp4(Format):
    name = "mxfp4"
    code_bits = 4
    default_group_size = 32
    fixed_group_size = True
    code_dtype = torch.uint8
    scale_dtype = torch.uint8

    def __init__(self, group_size=None):
        super().__init__(group_size)

    def quantize(self, x: Tensor) -> QuantizedTensor:
        xf = self.check_input(x)
        r, k = xf.shape
        xg = grouped(xf, self.group_size)  # (R, G, 32)
        amax = xg.abs().amax(dim=-1)  # (R, G)
        _, ex = torch.frexp(amax)  # amax = m * 2^ex, m in [0.5, 1): floor(log2(amax)) = ex - 1
        e = torch.where(amax > 0, ex - 1 - EMAX_ELEM, torch.full_like(ex, -E8M0_BIAS))
        e = e.clamp(-E8M0_BIAS, E8M0_BIAS)  # (R, G) int32
        codes = e2m1_encode(xg * pow2(-e).unsqueeze(-1))  # exact power-of-two scaling, then RNE/saturate
        return QuantizedTensor(codes.reshape(r, k), (e + E8M0_BIAS).to(torch.uint8))

    def dequantize(self, q: QuantizedTensor, dtype=torch.float32) -> Tensor:
        r, k = q.codes.shape
        x_scale = pow2(q.scales.to(torch.int32) - E8M0_BIAS).unsqueeze(-1)  # (R, G, 1)
        return (grouped(e2m1_decode(q.codes), self.group_size) * x_scale).reshape(r, k).to(dtype)

    def scale_bits(self) -> float:
        return 8.0
