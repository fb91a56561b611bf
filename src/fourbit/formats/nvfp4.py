"""NVFP4: e2m1 codes, groups of 16 (fixed) with e4m3 scales under one fp32 per-tensor scale (NVIDIA).

t = max|x_tensor| / (6 * 448)  (fp32, row_scale of shape (1, 1); floored at 2^-126);
s = e4m3(max|x_group| / 6 / t)  (nearest, saturating; next e4m3 up only where rounding a subnormal scale
down would clip the group maximum past 7, i.e. groups ~28672x smaller than the tensor maximum);
code = e2m1(x / (s * t))  (uint8 e2m1 bit pattern, nearest, ties to even, saturating);
x^ = (e2m1_value * s) * t  (the first product exact in fp32, then one fp32 rounding).
Bits per element: 4 + 8 / 16 = 4.5, plus 32 bits per tensor (``bits_per_element(k, rows=R)`` counts it).
Runs fast on: Blackwell (native block-scaled MMA, torch._scaled_mm / tl.dot_scaled). Same numerics as
``fp4`` with group 16 and outer_scale="tensor".
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import Format, QuantizedTensor
from .fp4 import dequantize_e2m1_e4m3, quantize_e2m1_e4m3


class NvFp4(Format):
    name = "nvfp4"
    code_bits = 4
    default_group_size = 16
    fixed_group_size = True
    code_dtype = torch.uint8
    scale_dtype = torch.float8_e4m3fn
    has_row_scale = True
    row_scale_kind = "tensor"

    def __init__(self, group_size=None):
        super().__init__(group_size)

    def quantize(self, x: Tensor) -> QuantizedTensor:
        xf = self.check_input(x)
        return quantize_e2m1_e4m3(xf, self.group_size, "tensor")

    def dequantize(self, q: QuantizedTensor, dtype=torch.float32) -> Tensor:
        return dequantize_e2m1_e4m3(q, self.group_size).to(dtype)

    def scale_bits(self) -> float:
        return 8.0
