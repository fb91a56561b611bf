"""INT4P2: int4 codes with per-group power-of-two scales under one fp32 scale per row (Hopper-native INT4).

x^ = code * 2^e[group] * r[row];  r = max|x_row| / 7 (fp32, row_scale (R, 1)),
e = ceil(log2(max|x_group| / max|x_row|)) clamped to [-9, 0] (int8 scales),
code = clamp(round(x / (r * 2^e)), -8, 7) (int8, round half to even).
Exactness: |code| <= 8 has at most 3 significant bits, so code * 2^e is an e4m3 value for every
e in [-9, 0] (2^-9 is e4m3's smallest subnormal and subnormals are multiples of it; 8 * 2^0 <= 448).
``to_fp8_operand(q)`` returns that e4m3 tensor and r; an FP8 GEMM with row/column scales then computes the
int4 product exactly (up to fp32 accumulation). See ``pow2`` for how the scales are chosen.
Bits per element: 4 + 8 / g + 32 / K (4.125 + 32 / K at the default g = 64).
Versus int4 with fp16 scales: a group scale is rounded up to a power of two, costing up to ~1 bit of
resolution in groups whose maximum is just above a power of two below the row maximum.
Runs fast on: Hopper (and Ada/Blackwell) FP8 tensor cores through a plain row/column-scaled FP8 GEMM.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .pow2 import Pow2Format


class Int4P2(Pow2Format):
    name = "int4p2"
    default_group_size = 64
    code_dtype = torch.int8
    QMAX = 7.0
    EMIN = -9

    def _to_codes(self, y: Tensor) -> Tensor:
        return torch.clamp(torch.round(y), -8, 7).to(torch.int8)

    def _values(self, codes: Tensor) -> Tensor:
        return codes.float()
