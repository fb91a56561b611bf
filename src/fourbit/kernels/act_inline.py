"""Activation quantization written in plain torch ops (``act_quant_inline``), for the inline lowering under
``torch.compile``: inductor generates it inside the kernel that produces X (a norm and modulation, a GELU, a
residual add) instead of a separate ``act_quant`` pass that reads X again (``fusion.py``, ``act_quant="inline"``).

Same outputs as ``act_quant`` (``act_spec.ActOperand``) for the formats whose operand is FP8 with one fp32 scale per
row (``INLINE_MODES``): int4p2 / fp4p2 (``code * 2^e`` per group) and fp8 per token. Codes and scales are bit for bit
``act_quant_torch``'s, with every rounding written so that a compiler cannot change it:

- divisions: inductor turns ``x / constant`` into ``x * (1 / constant)`` on GPUs, and Triton's fp32 ``/`` is an
  approximate division (PTX ``div.full``). So the row scale ``RN(amax / qmax)`` is an fp64 product with the fp64
  reciprocal of qmax, rounded once to fp32, and the per-row reciprocal ``RN(1 / r)`` an fp64 division (Triton: the
  IEEE ``div.rn.f64``) rounded once to fp32. Both equal the correctly rounded fp32 results: fp64 carries more than
  2 * 24 + 2 bits, and for qmax with <= 3 significant bits (7, 6, 448) an fp32 quotient is never within 2^-27 of an
  fp32 rounding midpoint, far more than the fp64 product's 2^-52 error. (Not for scales that are fp32 subnormals,
  i.e. row maxima below qmax * 2^-126: there a tie is possible and the GPU may round it the other way.)
- per-element scaling: multiplications only (by the reciprocals above and by exact powers of two);
- exponents and e4m3 rounding: integer arithmetic on the fp32 bits (``floats.e4m3_round``, ``base.pow2``);
- code rounding: ``torch.round`` (half to even on every backend), e2m1 by comparisons; codes go through int32
  so that a rounded -0 becomes +0 as in the reference (and a compiler's "no signed zeros" cannot matter).

The low-rank down-projection is a torch matmul of the raw X with the cached folded factor ``[hi | lo]``
(``act_lowrank.cat_down``): on CUDA with bf16 X one ``torch.mm(..., out_dtype=float32)`` (cuBLAS, the products
exact), else X upcast to fp32 times hi + lo in fp32 (exact sum of the two halves; fp32 GEMM, or TF32 where the user
enabled it for matmuls).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..formats.base import pow2
from ..formats.floats import e4m3_round
from .act_spec import FP8_ROW, P2_E2M1, P2_INT, ActOperand, act_spec

#: act_spec modes this module quantizes (FP8 operand, one fp32 scale per row)
INLINE_MODES = (P2_INT, P2_E2M1, FP8_ROW)


def inline_supported(fmt) -> bool:
    """Whether ``act_quant_inline`` quantizes activations of format ``fmt``."""
    spec = act_spec(fmt)
    return spec is not None and spec.mode in INLINE_MODES


def div_rn(a: Tensor, q: float) -> Tensor:
    """fp32 ``a / q`` correctly rounded (a >= 0 fp32; q a constant with <= 3 significant bits), by an fp64 product
    with the fp64 reciprocal of q: what inductor makes of a division by a constant, written out (module docstring)."""
    return (a.double() * (1.0 / q)).float()


def reciprocal_rn(r: Tensor) -> Tensor:
    """fp32 ``1 / r`` correctly rounded: an fp64 division (IEEE in Triton and C++) rounded once to fp32."""
    return (torch.ones_like(r, dtype=torch.float64) / r.double()).float()


def _exponent(a: Tensor, qmax: float) -> Tensor:
    """int32 e = the smallest integer with a <= qmax * 2^e for fp32 a > 0 (``pow2``'s rule from frexp, on the bits)."""
    bits = a.view(torch.int32)
    f = ((bits >> 23) & 0xFF) - 126  # a = m * 2^f, m in [0.5, 1) (subnormals: -126, callers clamp)
    mant_t = int((qmax / 4.0 - 1.0) * (1 << 23))  # m > qmax / 8  <=>  mantissa bits > this
    return f - 3 + ((bits & 0x7FFFFF) > mant_t).to(torch.int32)


def _e2m1_round(v: Tensor) -> Tensor:
    """v -> its e2m1 value (nearest, ties to even, saturating at 6; +0 for what rounds to zero), fp32."""
    a = v.abs()
    idx = ((a > 0.25).int() + (a >= 0.75).int() + (a > 1.25).int() + (a >= 1.75).int() + (a > 2.5).int()
           + (a >= 3.5).int() + (a > 5.0).int())  # magnitude index 0..7, as ``floats.e2m1_encode``
    f = idx.float()
    mag = torch.where(idx < 4, f * 0.5, torch.where(idx < 6, f - 2.0, torch.where(idx == 6, 4.0, 6.0)))
    return torch.where((v < 0) & (idx > 0), -mag, mag)


def _pow2_operand(xs: Tensor, spec) -> tuple[Tensor, Tensor]:
    """int4p2 / fp4p2: xs (M, Kp) fp32 -> (code * 2^e as fp32 (M, Kp), row scale r (M, 1))."""
    m, kp = xs.shape
    g = spec.group
    gmax = xs.abs().reshape(m, kp // g, g).amax(-1)  # (M, G) max|X^| per group
    r = div_rn(gmax.amax(-1, keepdim=True), spec.qmax)  # (M, 1)
    rinv = reciprocal_rn(torch.where(r != 0, r, 1.0))
    # max|X^ * rinv| over a group == RN(max|X^| * rinv): rounding is monotone, so the group maxima need no second pass
    ygmax = gmax * rinv  # (M, G)
    e = torch.where(ygmax > 0, _exponent(ygmax, spec.qmax), spec.emin).clamp(spec.emin, 0)  # (M, G) int32
    y = (xs * rinv).reshape(m, kp // g, g) * pow2(-e).unsqueeze(-1)  # (M, G, g): exact scaling by 2^-e
    if spec.mode == P2_INT:
        v = torch.round(y).clamp(-8.0, 7.0).to(torch.int32).float()  # (through int32: -0 -> +0, as int8 codes)
    else:
        v = _e2m1_round(y)
    return (v * pow2(e).unsqueeze(-1)).reshape(m, kp), r


def _fp8_operand(xs: Tensor) -> tuple[Tensor, Tensor]:
    """fp8 per token: xs (M, Kp) fp32 -> (e4m3 values as fp32 (M, Kp), row scale s (M, 1))."""
    s = div_rn(xs.abs().amax(-1, keepdim=True), 448.0)  # (M, 1)
    return e4m3_round(xs * reciprocal_rn(torch.where(s != 0, s, 1.0))), s


def down_projection(x: Tensor, down_cat: Tensor) -> Tensor:
    """X (M, K) raw input @ the folded factor [hi | lo] (Kp, 2 Rp) bf16 -> (M, Rp) fp32 = X @ (hi + lo)."""
    k = x.shape[1]
    rank = down_cat.shape[1] // 2
    d = down_cat[:k]  # (K, 2 Rp): rows past K meet X's zero padding
    if x.is_cuda and x.dtype == torch.bfloat16:
        both = torch.mm(x, d, out_dtype=torch.float32)  # (M, 2 Rp): X @ hi, X @ lo, products exact
        return both[:, :rank] + both[:, rank:]
    return x.float() @ (d[:, :rank].float() + d[:, rank:].float())  # hi + lo is exact in fp32


def act_quant_inline(x, fmt, smooth: Optional[Tensor] = None, lr_down: Optional[Tensor] = None,
                     padded_in: Optional[int] = None, down_folded: Optional[Tensor] = None,
                     smooth_recip: Optional[Tensor] = None, down_cat: Optional[Tensor] = None) -> ActOperand:
    """``act_quant`` in plain torch ops (the same arguments; x (M, K) or a list of column blocks, concatenated
    here): q (M, Kp) float8_e4m3fn, row_scale (M,) fp32, lr (M, Rp) fp32 or None. Only ``INLINE_MODES``."""
    from .act_lowrank import cat_down, fold_down
    from .act_quant import _check, _column_blocks, _joined
    from .reference import smooth_reciprocal

    spec = act_spec(fmt)
    if spec is None or spec.mode not in INLINE_MODES:
        raise NotImplementedError(f"act_quant_inline: activation format {fmt!r} has no inline quantization (int4p2, "
                                  f"fp4p2 and per-token fp8 do); use act_quant")
    x = _joined(*_column_blocks(x))
    shape_of_down = lr_down if lr_down is not None or down_folded is None else down_folded[0].t()  # (Rp, Kp)
    kp = _check(x, smooth if smooth is not None else smooth_recip, shape_of_down, padded_in)
    if smooth_recip is None and smooth is not None:
        smooth_recip = smooth_reciprocal(smooth)
    if down_cat is None and lr_down is not None:
        down_cat = cat_down(down_folded if down_folded is not None else fold_down(lr_down, smooth))
    xs = x.float()  # (M, K) -> (M, Kp) fp32, smoothed
    if kp != x.shape[1]:
        xs = F.pad(xs, (0, kp - x.shape[1]))
    if smooth_recip is not None:
        xs = xs * smooth_recip
    q, r = _fp8_operand(xs) if spec.mode == FP8_ROW else _pow2_operand(xs, spec)
    lr = None if down_cat is None else down_projection(x, down_cat)
    return ActOperand(q.to(torch.float8_e4m3fn), r.reshape(-1), None, lr)
