"""FP8: float8 e4m3 values with one fp32 scale per row (per output channel / per token): W8A8 on FP8 hardware.

Per row (default; ``group_size=g``: per group of g, a reference-only option, the kernels take rows):
s = max|x_row| / 448 (fp32, the largest e4m3 value is 448);
y = x * RN(1 / s) (one correctly rounded reciprocal per row, then one multiply per element, as a fast kernel does it);
code = the bit pattern of e4m3(y) (``floats.e4m3_round``: nearest, ties to even, saturating at +-448; zeros are +0),
stored as uint8; x^ = e4m3 value * s. An all-zero row has s = 0 and codes 0.
Scales live in ``QuantizedTensor.scales`` (R, 1) as with int8 (``row_scale`` is None).
Bits per element: 8 + 32 / K.
Exactness: the codes *are* the GEMM operand (``to_fp8_operand``): a row/column-scaled FP8 GEMM (cuBLAS
``torch._scaled_mm`` or fourbit's ``scaled_gemm``) computes x^ @ w^T up to fp32 accumulation.
Versus int8 per row: 3 mantissa bits but a floating exponent, so the error scales with each value rather than
with the row maximum; better where a row has outliers, worse on a flat row (see docs/formats.md).
Runs fast on: Hopper, Ada and Blackwell FP8 tensor cores (the recipe of torchao's
``Float8DynamicActivationFloat8WeightConfig(PerRow())``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import Format, QuantizedTensor, div_scalar, grouped, reciprocal, safe_divisor
from .floats import E4M3_MAX, e4m3_round

#: the two e4m3fn bit patterns that are NaN (0x7F and 0xFF); quantize never produces them
NAN_CODES = (0x7F, 0xFF)


class Fp8(Format):
    name = "fp8"
    code_bits = 8
    default_group_size = None
    code_dtype = torch.uint8
    scale_dtype = torch.float32
    fp8_exact = True
    #: floor of the generic Gaussian SQNR test: 3 mantissa bits give ~31.6 dB on N(0, 1) rows (int8: ~42)
    sqnr_floor_db = 29.0

    def __init__(self, group_size=None):  # no options
        super().__init__(group_size)

    def quantize(self, x: Tensor) -> QuantizedTensor:
        xf = self.check_input(x)
        r, k = xf.shape
        xg = grouped(xf, self.group_for(k))  # (R, G, g)
        s = div_scalar(xg.abs().amax(dim=-1, keepdim=True), E4M3_MAX)  # (R, G, 1) fp32
        y = e4m3_round(xg * reciprocal(safe_divisor(s)))  # on the grid: the cast below is exact on every device
        return QuantizedTensor(y.to(torch.float8_e4m3fn).view(torch.uint8).reshape(r, k), s.squeeze(-1))

    def to_fp8_operand(self, q: QuantizedTensor) -> tuple[Tensor, Tensor]:
        """Per row (group_size None): (fp8 (R, K) float8_e4m3fn, scale fp32 (R, 1)) with
        dequantize(q) == fp8.float() * scale, exactly."""
        if q.scales.shape[1] != 1:
            raise ValueError("fp8: to_fp8_operand needs one scale per row (group_size=None)")
        return q.codes.view(torch.float8_e4m3fn), q.scales.float()

    def dequantize(self, q: QuantizedTensor, dtype=torch.float32) -> Tensor:
        r, k = q.codes.shape
        v = grouped(q.codes.view(torch.float8_e4m3fn).float(), self.group_for(k))  # (R, G, g)
        return (v * q.scales.float().unsqueeze(-1)).reshape(r, k).to(dtype)

    def all_codes(self) -> Tensor:
        return torch.tensor([c for c in range(256) if c not in NAN_CODES], dtype=torch.uint8)

    def scale_bits(self) -> float:
        return 32.0
