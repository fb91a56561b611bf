"""Minifloat helpers: the FP4 e2m1 grid and FP8 e4m3 rounding (plain torch, any device).

e2m1 (OCP MX / NVIDIA FP4): 1 sign, 2 exponent, 1 mantissa bit, bias 1, no Inf/NaN. Magnitudes
{0, 0.5, 1, 1.5, 2, 3, 4, 6}; 0.5 is the one subnormal. A 4-bit *code* is the e2m1 bit pattern itself:
bit 3 = sign, bits 0-2 = magnitude index (exponent bits then mantissa bit), so code i in 0..7 is
+E2M1_VALUES[i] and code 8 + i is its negative (code 8 is -0; quantizers here never emit it). These codes
are what FP4 hardware (torch.float4_e2m1fn_x2, Blackwell block-scaled MMA) reads, two per byte, low nibble first.

Rounding to e2m1 is round-to-nearest, ties to even (to the magnitude with mantissa bit 0, i.e. the even
index: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4), saturating at +-6.

e4m3 (float8_e4m3fn): 4 exponent bits (bias 7), 3 mantissa bits, no Inf, max 448, smallest normal 2^-6,
smallest subnormal 2^-9.
"""
from __future__ import annotations

import torch
from torch import Tensor

#: e2m1 value of each 4-bit code 0..15 (code = sign << 3 | magnitude index), fp32
E2M1_VALUES = torch.tensor(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
)
#: largest e2m1 magnitude
E2M1_MAX = 6.0
#: largest finite float8_e4m3fn value
E4M3_MAX = 448.0

# Midpoints between consecutive e2m1 magnitudes, with whether a tie rounds up (odd lower index -> up).
_E2M1_MIDPOINTS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))


def e2m1_encode(x: Tensor) -> Tensor:
    """Round x (any float dtype) to the nearest e2m1 value (ties to even, saturating) -> uint8 codes 0..15.

    Values that round to zero get code 0 (+0); NaN gives code 0 (check inputs first).
    """
    a = x.float().abs()
    idx = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for mid, tie_up in _E2M1_MIDPOINTS:
        idx += (a >= mid) if tie_up else (a > mid)
    neg = (x < 0) & (idx > 0)
    return idx | (neg.to(torch.uint8) << 3)


def e2m1_decode(codes: Tensor) -> Tensor:
    """uint8 codes 0..15 -> fp32 e2m1 values."""
    return E2M1_VALUES.to(codes.device)[codes.long()]


def e2m1_round(x: Tensor) -> Tensor:
    """x rounded to the e2m1 grid (nearest, ties to even, saturating at +-6), in x's dtype; NaN stays NaN."""
    y = e2m1_decode(e2m1_encode(x)).to(x.dtype)
    return torch.where(torch.isnan(x), x, y)


def e4m3_round(x: Tensor) -> Tensor:
    """x (fp32, finite) rounded to the e4m3 grid: nearest, ties to even, saturating at +-448, as fp32; whatever rounds
    to zero is +0.0 (as the e2m1 codes here: the GPU's fp8 conversion does not keep the sign of a zero, the
    interpreter's does). Integer arithmetic on the fp32 bits (identical on every device; the kernels do the same),
    so the cast of the result to float8_e4m3fn is exact."""
    a = x.float().abs().clamp(max=E4M3_MAX)
    bits = a.view(torch.int32)
    lsb = (bits >> 20) & 1  # keep 3 of the 23 mantissa bits
    normal = ((bits + 0x7FFFF + lsb) & ~0xFFFFF).view(torch.float32)
    sub = torch.round(a * 512.0) / 512.0  # below 2^-6: multiples of 2^-9 (both scalings exact; round: half to even)
    mag = torch.where(a < 2.0 ** -6, sub, normal)
    return torch.where((x < 0) & (mag > 0), -mag, mag)


def to_e4m3(x: Tensor) -> Tensor:
    """x -> torch.float8_e4m3fn: round to nearest even (via fp32), saturating at +-448; NaN stays NaN."""
    return x.float().clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
