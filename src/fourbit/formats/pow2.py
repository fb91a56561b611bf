"""Shared machinery of the Hopper-native formats ``int4p2`` and ``fp4p2``.

x^ = value(code) * 2^e[group] * r[row]: a 4-bit value times a power of two is exact in FP8 e4m3 when e stays
in a small range, so a quantized tensor *is* an e4m3 tensor times one fp32 scale per row, and
y = X W^T becomes a plain FP8 GEMM with a row scale r_x[m] and a column scale r_w[n] in its epilogue,
with the 4-bit numerics preserved bit for bit (see docs/formats.md, research/hopper.md).

Choice of scales, for a format with largest value ``qmax`` (7 for int4, 6 for e2m1):
  r = max|x_row| / qmax  (fp32; an all-zero row stores r = 0);
  e = the smallest integer with max|x_group / r| <= qmax * 2^e, i.e. ceil(log2(max|x_group| / max|x_row|))
      (computed exactly from the fp32 value by frexp), clamped to [emin, 0]; e <= 0 always holds;
  code = round(x * (1 / r) * 2^-e) to the format's grid (1 / r: one correctly rounded reciprocal per row, then
      a multiply per element, as a fast kernel does it; the scaling by 2^-e is exact).
Every element is therefore within half a grid step of r * 2^e; groups smaller than 2^emin times the row
maximum are quantized with e = emin (coarser, still no overflow). Exponents are stored as int8.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import Format, QuantizedTensor, div_scalar, grouped, pow2, reciprocal, safe_divisor


class Pow2Format(Format):
    """Base of int4p2 / fp4p2: subclasses set QMAX, EMIN and the grid (``_to_codes`` / ``_values``)."""

    QMAX: float = 7.0
    EMIN: int = -9
    code_bits = 4
    scale_dtype = torch.int8
    has_row_scale = True
    row_scale_kind = "row"
    fp8_exact = True

    def __init__(self, group_size=None):
        super().__init__(group_size)

    def _to_codes(self, y: Tensor) -> Tensor:
        """y (already divided by r * 2^e) -> codes on the grid."""
        raise NotImplementedError

    def _values(self, codes: Tensor) -> Tensor:
        """codes -> fp32 grid values."""
        raise NotImplementedError

    def quantize(self, x: Tensor) -> QuantizedTensor:
        xf = self.check_input(x)
        r_, k = xf.shape
        r = div_scalar(xf.abs().amax(dim=1, keepdim=True), self.QMAX)  # (R, 1) fp32
        yg = grouped(xf * reciprocal(safe_divisor(r)), self.group_for(k))  # (R, G, g), |y| <= qmax (+2 ulp)
        gmax = yg.abs().amax(dim=-1)  # (R, G)
        m, f = torch.frexp(gmax)  # gmax = m * 2^f, m in [0.5, 1)
        # smallest e with gmax * 2^-e <= qmax: f - 3 if 8m <= qmax else f - 2
        e = f - 3 + (m > self.QMAX / 8).to(f.dtype)
        e = torch.where(gmax > 0, e, torch.full_like(e, self.EMIN)).clamp(self.EMIN, 0)  # (R, G)
        codes = self._to_codes(yg * pow2(-e).unsqueeze(-1))  # (R, G, g)
        return QuantizedTensor(codes.reshape(r_, k), e.to(torch.int8), r)

    def fp8_values(self, q: QuantizedTensor) -> Tensor:
        """value(code) * 2^e as fp32 (R, K): every entry is exactly representable in float8_e4m3fn."""
        r, k = q.codes.shape
        g = self.group_for(k)
        return (grouped(self._values(q.codes), g) * pow2(q.scales).unsqueeze(-1)).reshape(r, k)

    def to_fp8_operand(self, q: QuantizedTensor) -> tuple[Tensor, Tensor]:
        """(fp8 (R, K) float8_e4m3fn, row_scale fp32 (R, 1)) with dequantize(q) == fp8.float() * row_scale, exactly."""
        return self.fp8_values(q).to(torch.float8_e4m3fn), q.row_scale.float()

    def dequantize(self, q: QuantizedTensor, dtype=torch.float32) -> Tensor:
        return (self.fp8_values(q) * q.row_scale.float()).to(dtype)

    def scale_bits(self) -> float:
        return 8.0  # int8 exponent (4 bits would do; stored as a byte)
