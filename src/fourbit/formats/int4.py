"""INT4: symmetric 4-bit integers per group along K with 16-bit scales (SVDQuant's paper format).

s = max|x_group| / 7 (stored in fp16 or bf16); codes = clamp(round(x / s), -8, 7).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import Format, QuantizedTensor, grouped

QMAX = 7


class Int4(Format):
    name = "int4"
    code_bits = 4
    default_group_size = 64

    def __init__(self, group_size=None, scale_dtype: str = "float16"):
        if scale_dtype not in ("float16", "bfloat16"):
            raise ValueError(f"int4: scale_dtype must be 'float16' or 'bfloat16', got {scale_dtype!r}")
        super().__init__(group_size, scale_dtype=scale_dtype)
        self.scale_dtype = getattr(torch, scale_dtype)

    def quantize(self, x: Tensor) -> QuantizedTensor:
        self.check_input(x)
        g = self.group_for(x.shape[1])
        xg = grouped(x.float(), g)  # (R, G, g)
        amax = xg.abs().amax(dim=-1, keepdim=True)
        scale = (amax / QMAX).to(self.scale_dtype)
        s = scale.float()
        safe = torch.where(s > 0, s, torch.ones_like(s))
        codes = torch.clamp(torch.round(xg / safe), -QMAX - 1, QMAX).to(torch.int8)
        return QuantizedTensor(codes.reshape(x.shape), scale.squeeze(-1))

    def dequantize(self, q: QuantizedTensor, dtype=torch.float32) -> Tensor:
        r, k = q.codes.shape
        g = self.group_for(k)
        xg = grouped(q.codes.float(), g) * q.scales.float().unsqueeze(-1)
        return xg.reshape(r, k).to(dtype)

    def scale_bits(self) -> float:
        return 16.0
