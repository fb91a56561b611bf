"""FP4: e2m1 codes per group along K with FP8 e4m3 group scales (SVDQuant's paper FP4).

Per group of g elements (default 32):  s = e4m3(max|x| / 6);  code = e2m1(x / s)  (nearest, ties to even,
saturating at +-6; see ``floats``);  x^ = e2m1_value(code) * s.
Codes are uint8 0..15, the e2m1 bit pattern (bit 3 sign, bits 0-2 magnitude index into
0, 0.5, 1, 1.5, 2, 3, 4, 6). Scales are stored as torch.float8_e4m3fn.
Bits per element: 4 + 8 / g (4.25 at g = 32).

Scale rounding: nearest e4m3 (ties to even), saturating at 448. A scale rounded down lets the group
maximum reach 6 * (1 + 2^-4) = 6.375 before it saturates to 6, within half of the top step (4 -> 6).
Where rounding would push it past 7 (only for subnormal e4m3 scales), the next e4m3 value up is used.
An all-zero group has s = 0 and codes 0.

Range: with no outer scale (the paper's format) the e4m3 scale alone sets the range, so group maxima above
6 * 448 = 2688 clip and those below 6 * 2^-6 = 0.094 get subnormal (coarse: multiples of 2^-9) scales,
which is common for weights. Option ``outer_scale``:
  None      the paper's format (default);
  "tensor"  an fp32 scale t = max|x_tensor| / (6 * 448) per tensor (row_scale (1, 1)): NVFP4's scheme;
  "row"     an fp32 scale t = max|x_row| / (6 * 448) per row (row_scale (R, 1)).
Group scales are then s = e4m3(max|x_group| / 6 / t) and x^ = (e2m1_value * s) * t, the product
e2m1 * e4m3 exact in fp32 and then one fp32 rounding. t is floored at the smallest normal fp32 (so an
all-zero tensor stores t = 2^-126, not 0).
Runs fast on: Blackwell (native block-scaled FP4 MMA) with group 16/32; Hopper only through a kernel that
applies group scales on CUDA cores.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .base import Format, QuantizedTensor, cast_scale, div_scalar, grouped, safe_divisor
from .floats import E2M1_MAX, E4M3_MAX, e2m1_decode, e2m1_encode

_TINY = torch.finfo(torch.float32).tiny


def outer_scale_of(xf: Tensor, kind: str) -> Tensor:
    """fp32 outer scale t = max|x| / (6 * 448) per tensor (1, 1) or per row (R, 1), floored at 2^-126."""
    a = xf.abs()
    amax = a.amax(dim=1, keepdim=True) if kind == "row" else a.amax().reshape(1, 1)
    return torch.clamp(div_scalar(amax, E2M1_MAX * E4M3_MAX), min=_TINY)


def quantize_e2m1_e4m3(xf: Tensor, g: int, outer: Optional[str]) -> QuantizedTensor:
    """Shared by fp4 and nvfp4: xf (R, K) fp32 -> e2m1 codes, e4m3 group scales, optional fp32 outer scale."""
    r, k = xf.shape
    xg = grouped(xf, g)  # (R, G, g)
    amax = xg.abs().amax(dim=-1, keepdim=True)  # (R, G, 1)
    t = outer_scale_of(xf, outer) if outer else None  # (R, 1) or (1, 1)
    rel = amax if t is None else amax / t.unsqueeze(-1)
    scale = cast_scale(rel, E2M1_MAX, E2M1_MAX + 1.0, torch.float8_e4m3fn)  # (R, G, 1) e4m3
    eff = scale.float() if t is None else scale.float() * t.unsqueeze(-1)
    codes = e2m1_encode(xg / safe_divisor(eff))  # (R, G, g) uint8
    return QuantizedTensor(codes.reshape(r, k), scale.squeeze(-1), t)


def dequantize_e2m1_e4m3(q: QuantizedTensor, g: int) -> Tensor:
    """(e2m1 value * e4m3 scale) [* fp32 outer scale] -> fp32 (R, K)."""
    r, k = q.codes.shape
    x = (grouped(e2m1_decode(q.codes), g) * q.scales.float().unsqueeze(-1)).reshape(r, k)
    return x if q.row_scale is None else x * q.row_scale


class Fp4(Format):
    name = "fp4"
    code_bits = 4
    default_group_size = 32
    code_dtype = torch.uint8
    scale_dtype = torch.float8_e4m3fn

    def __init__(self, group_size=None, outer_scale: Optional[str] = None):
        if outer_scale not in (None, "tensor", "row"):
            raise ValueError(f"fp4: outer_scale must be None, 'tensor' or 'row', got {outer_scale!r}")
        super().__init__(group_size, outer_scale=outer_scale)
        self.outer_scale = outer_scale
        self.has_row_scale = outer_scale is not None
        self.row_scale_kind = outer_scale or "row"

    def quantize(self, x: Tensor) -> QuantizedTensor:
        xf = self.check_input(x)
        return quantize_e2m1_e4m3(xf, self.group_for(x.shape[1]), self.outer_scale)

    def dequantize(self, q: QuantizedTensor, dtype=torch.float32) -> Tensor:
        return dequantize_e2m1_e4m3(q, self.group_for(q.codes.shape[1])).to(dtype)

    def scale_bits(self) -> float:
        return 8.0
