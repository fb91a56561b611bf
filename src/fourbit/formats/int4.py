"""INT4: symmetric 4-bit integers per group along K with 16-bit scales (SVDQuant's paper format).

Per group of g elements (default 64):  s = max|x| / 7 stored in fp16 (default) or bf16;
codes = clamp(round(x / s), -8, 7) as int8 (round half to even); x^ = code * s.
Bits per element: 4 + 16 / g (4.25 at g = 64).

Scale rounding: s is the nearest fp16/bf16 value, saturating at the dtype's maximum (fp16: groups with
max|x| above 7 * 65504 clip). If the stored s fell so far below max|x| / 7 that the group maximum would clip
by more than half a step (possible only for subnormal fp16 scales, max|x| < ~4e-4), the next value up is
used. An all-zero group has s = 0 and codes 0.
Runs fast on: GPUs with INT4 tensor cores (Ampere/Ada, Nunchaku); on Hopper only through a kernel that
applies group scales on CUDA cores (see docs/formats.md).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import Format, QuantizedTensor, cast_scale, grouped, safe_divisor

QMAX = 7


class Int4(Format):
    name = "int4"
    code_bits = 4
    default_group_size = 64
    code_dtype = torch.int8
    scale_dtype = torch.float16

    def __init__(self, group_size=None, scale_dtype: str = "float16"):
        super().__init__(group_size, scale_dtype=scale_dtype)
        self._set_scale_dtype(scale_dtype, ("float16", "bfloat16"))

    def quantize(self, x: Tensor) -> QuantizedTensor:
        xf = self.check_input(x)
        g = self.group_for(x.shape[1])
        xg = grouped(xf, g)  # (R, G, g)
        amax = xg.abs().amax(dim=-1, keepdim=True)  # (R, G, 1)
        scale = cast_scale(amax, QMAX, QMAX + 0.5, self.scale_dtype)
        codes = torch.clamp(torch.round(xg / safe_divisor(scale.float())), -QMAX - 1, QMAX).to(torch.int8)
        return QuantizedTensor(codes.reshape(x.shape), scale.squeeze(-1))

    def dequantize(self, q: QuantizedTensor, dtype=torch.float32) -> Tensor:
        r, k = q.codes.shape
        g = self.group_for(k)
        xg = grouped(q.codes.float(), g) * q.scales.float().unsqueeze(-1)  # (R, G, g)
        return xg.reshape(r, k).to(dtype)

    def scale_bits(self) -> float:
        return 16.0
