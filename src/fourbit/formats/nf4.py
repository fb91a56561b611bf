"""NF4: the QLoRA NormalFloat4 code book with an absmax scale per group (weight-only baseline, W4A16).

Per group of g elements (default 64, bitsandbytes' block size):  s = max|x| (fp32 by default, as
bitsandbytes stores it without double quantization; option scale_dtype "float16"/"bfloat16");
code = index of the nearest NF4_VALUES entry to x / s (uint8 0..15; an exact tie between two entries goes
to the lower one); x^ = NF4_VALUES[code] * s.
NF4_VALUES are the 16 constants of QLoRA (Dettmers et al. 2023; bitsandbytes): quantiles of N(0, 1)
normalised to [-1, 1], 7 negative, an exact 0, 8 positive (asymmetric). The largest gap is 1 - 0.6962 at the
negative end, so |x - x^| <= 0.152 * s; precisely, |x - x^| <= s * (c[i+1] - c[i]) / 2 where
c[i] <= x / s <= c[i+1] are the code values bracketing x / s.
Scale rounding (fp16/bf16): nearest, saturating, next value up where a subnormal scale would clip the group
maximum by more than half the top gap. An all-zero group has s = 0 and codes 7 (the value 0).
Bits per element: 4 + 32 / g (4.5 at g = 64 with fp32 scales; 4.25 with fp16).
Runs: dequantize-then-GEMM (weight-only); no tensor core takes NF4 directly.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import Format, QuantizedTensor, cast_scale, grouped, safe_divisor

#: the 16 NF4 values, code 0..15 (bitsandbytes' constants, fp32)
NF4_VALUES = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])
_MIDPOINTS = (NF4_VALUES[1:] + NF4_VALUES[:-1]) / 2  # (15,)
_TOP_HALF_GAP = float(1.0 - NF4_VALUES[14]) / 2


class Nf4(Format):
    name = "nf4"
    code_bits = 4
    default_group_size = 64
    code_dtype = torch.uint8
    scale_dtype = torch.float32

    def __init__(self, group_size=None, scale_dtype: str = "float32"):
        super().__init__(group_size, scale_dtype=scale_dtype)
        self._set_scale_dtype(scale_dtype, ("float32", "float16", "bfloat16"))

    def quantize(self, x: Tensor) -> QuantizedTensor:
        xf = self.check_input(x)
        r, k = xf.shape
        xg = grouped(xf, self.group_for(k))  # (R, G, g)
        amax = xg.abs().amax(dim=-1, keepdim=True)  # (R, G, 1)
        scale = cast_scale(amax, 1.0, 1.0 + _TOP_HALF_GAP, self.scale_dtype)
        v = (xg / safe_divisor(scale.float())).contiguous()
        codes = torch.bucketize(v, _MIDPOINTS.to(v.device), right=False)  # count of midpoints < v
        return QuantizedTensor(codes.to(torch.uint8).reshape(r, k), scale.squeeze(-1))

    def dequantize(self, q: QuantizedTensor, dtype=torch.float32) -> Tensor:
        r, k = q.codes.shape
        vals = NF4_VALUES.to(q.codes.device)[q.codes.long()]
        xg = grouped(vals, self.group_for(k)) * q.scales.float().unsqueeze(-1)  # (R, G, g)
        return xg.reshape(r, k).to(dtype)

    def scale_bits(self) -> float:
        return float(torch.finfo(self.scale_dtype).bits)
