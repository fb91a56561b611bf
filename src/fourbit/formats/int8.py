"""INT8: symmetric 8-bit integers, by default one scale per row (per output channel / per token).

Per group (default: the whole row, ``group_size=None``):  s = max|x| / 127 (fp32 by default;
option scale_dtype "float16" / "bfloat16" rounds it to nearest, saturating, and takes the next value up
where a subnormal scale would clip the maximum by more than half a step);
codes = clamp(round(x / s), -127, 127) as int8 (round half to even; -128 is never produced); x^ = code * s.
An all-zero group has s = 0 and codes 0.
Bits per element: 8 + scale_bits / g, so 8 + 32 / K per row with fp32 scales (the row scale *is* the
group scale here: ``row_scale`` is None).
Runs fast on: any GPU with INT8 tensor cores (W8A8: per-token activations x per-channel weights, both
factor out of the K loop). For FP8 hardware see ``int4p2``/``fp4p2``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import Format, QuantizedTensor, cast_scale, grouped, safe_divisor

QMAX = 127


class Int8(Format):
    name = "int8"
    code_bits = 8
    default_group_size = None
    code_dtype = torch.int8
    scale_dtype = torch.float32

    def __init__(self, group_size=None, scale_dtype: str = "float32"):
        super().__init__(group_size, scale_dtype=scale_dtype)
        self._set_scale_dtype(scale_dtype, ("float32", "float16", "bfloat16"))

    def quantize(self, x: Tensor) -> QuantizedTensor:
        xf = self.check_input(x)
        r, k = xf.shape
        xg = grouped(xf, self.group_for(k))  # (R, G, g)
        amax = xg.abs().amax(dim=-1, keepdim=True)  # (R, G, 1)
        scale = cast_scale(amax, QMAX, QMAX + 0.5, self.scale_dtype)
        codes = torch.clamp(torch.round(xg / safe_divisor(scale.float())), -QMAX, QMAX).to(torch.int8)
        return QuantizedTensor(codes.reshape(r, k), scale.squeeze(-1))

    def dequantize(self, q: QuantizedTensor, dtype=torch.float32) -> Tensor:
        r, k = q.codes.shape
        xg = grouped(q.codes.float(), self.group_for(k)) * q.scales.float().unsqueeze(-1)  # (R, G, g)
        return xg.reshape(r, k).to(dtype)

    def scale_bits(self) -> float:
        return float(torch.finfo(self.scale_dtype).bits)
