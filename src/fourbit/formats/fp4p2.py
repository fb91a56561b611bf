"""FP4P2: e2m1 codes with per-group power-of-two scales under one fp32 scale per row (Hopper-native FP4).

x^ = e2m1_value(code) * 2^e[group] * r[row];  r = max|x_row| / 6 (fp32, row_scale (R, 1)),
e = ceil(log2(max|x_group| / max|x_row|)) clamped to [-8, 0] (int8 scales),
code = e2m1(x / (r * 2^e)) (uint8 e2m1 bit pattern, nearest, ties to even, saturating at +-6).
Exactness: e2m1 values are {1, 2, 3, 4, 6, 8, 12} * 2^-1 (at most 2 significant bits), so value * 2^e is an
e4m3 value for e in [-8, 0] (0.5 * 2^-8 = 2^-9 is e4m3's smallest subnormal; 6 <= 448).
``to_fp8_operand(q)`` returns that e4m3 tensor and r (exact). See ``pow2`` for how the scales are chosen.
Bits per element: 4 + 8 / g + 32 / K (4.25 + 32 / K at the default g = 32).
Runs fast on: Hopper (and Ada/Blackwell) FP8 tensor cores through a plain row/column-scaled FP8 GEMM.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .floats import e2m1_decode, e2m1_encode
from .pow2 import Pow2Format


class Fp4P2(Pow2Format):
    name = "fp4p2"
    default_group_size = 32
    code_dtype = torch.uint8
    QMAX = 6.0
    EMIN = -8

    def _to_codes(self, y: Tensor) -> Tensor:
        return e2m1_encode(y)

    def _values(self, codes: Tensor) -> Tensor:
        return e2m1_decode(codes)
