"""The tile numerics shared by the activation kernels (``act_single``, ``act_two``) and the GEMV: loading X^ (smoothing
by a cached reciprocal, zeros past K, two column blocks), per-row scales, quantizing a (rows, groups, group) tile to
the GEMM operand of each mode (``act_spec``), and the folded down-projection on tensor cores.

Every rounding is the format reference's, bit for bit, on the GPU and under Triton's interpreter (see ``_common``).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import (amax as _amax, e2m1_round, e4m3_rn, frexp_exponent, mantissa_bits, next_up, pow2,
                      rint_small, round_half_even, round_to_mantissa, to_e4m3)
from .act_spec import _BF16_MAX, P2_E2M1, P2_INT

try:  # the GPU's rint (round half to even); the interpreter path never calls it
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover
    from triton.language.extra.cuda import libdevice

_SCALE16 = {  # int4 group-scale dtype -> (mantissa bits dropped from fp32, max, subnormal quantum, smallest normal)
    "float16": (13, 65504.0, 2.0 ** -24, 2.0 ** -14),
    "bfloat16": (16, _BF16_MAX, 0.0, 0.0),
}


def _scale_consts(spec):
    """The constexpr arguments of ``_quant_tile`` for an ``ActSpec``."""
    s_drop, s_max, s_subq, s_minn = _SCALE16.get(spec.scale16, _SCALE16["float16"])
    mant_t = int((spec.qmax / 4.0 - 1.0) * (1 << 23)) if spec.mode in (P2_INT, P2_E2M1) else 0
    return dict(MANT_T=mant_t, S_DROP=s_drop, S_MAX=s_max, S_SUBQ=s_subq, S_MINN=s_minn)


@triton.jit
def _load_smoothed(x_ptr, rsmooth_ptr, row_off, cols, row_mask, K, Kp, HAS_SMOOTH: tl.constexpr):
    """fp32 X^ = X * (1 / smooth) with zeros past K (the padding); rsmooth_ptr: ``smooth_reciprocal(smooth)``."""
    x = tl.load(x_ptr + row_off + cols, mask=row_mask & (cols < K), other=0.0).to(tl.float32)
    if HAS_SMOOTH:
        x = _smooth(x, rsmooth_ptr, cols, Kp)
    return x


@triton.jit
def _load_blocks(x_ptr, x2_ptr, row_off, row2_off, cols, row_mask, K1, K, TWO: tl.constexpr):
    """Raw X at ``cols`` (zeros past K). TWO: X is two column blocks, [x_ptr rows, columns < K1 | x2_ptr rows,
    columns K1..K) (a concatenation that was never written); else one at x_ptr."""
    if TWO:
        a = tl.load(x_ptr + row_off + cols, mask=row_mask & (cols < K1), other=0.0)
        b = tl.load(x2_ptr + row2_off + (cols - K1), mask=row_mask & (cols >= K1) & (cols < K), other=0.0)
        return tl.where(cols < K1, a, b)
    else:
        return tl.load(x_ptr + row_off + cols, mask=row_mask & (cols < K), other=0.0)


@triton.jit
def _smooth(x, rsmooth_ptr, cols, Kp):
    """x * (1 / smooth) (the reference's smoothing: one fp32 multiply by the cached reciprocal). Callers' x is 0 past
    K, so the masked reciprocal is 0 too (registers zeroed two at a time, not set to 1.0 one by one)."""
    return x * tl.load(rsmooth_ptr + cols, mask=cols < Kp, other=0.0)


@triton.jit
def _rne(x, HW: tl.constexpr):
    if HW:
        return libdevice.rint(x)
    else:
        return round_half_even(x)


@triton.jit
def _row_scale(amax, MODE: tl.constexpr, QMAX: tl.constexpr, OUTER: tl.constexpr):
    """Per-row scale (what ``row_scale`` stores) and the divisor the quantizer uses, from max|X^_row|."""
    rsc = amax
    div = amax
    if MODE == 0 or MODE == 1 or MODE == 6:  # r = max|x_row| / qmax
        rsc = tl.math.div_rn(amax, QMAX)
        div = tl.where(rsc != 0, rsc, 1.0)
    if MODE == 2:  # int8: s = max / 127 (next fp32 up where it would clip by > half a step)
        rsc = tl.math.div_rn(amax, QMAX)
        bump = (amax > 127.5 * rsc) & (rsc < 3.4028234663852886e38)
        rsc = tl.where(bump, (rsc.to(tl.int32, bitcast=True) + 1).to(tl.float32, bitcast=True), rsc)
        div = tl.where(rsc != 0, rsc, 1.0)
    if OUTER == 2:
        rsc = tl.maximum(tl.math.div_rn(amax, 2688.0), 1.1754943508222875e-38)
        div = rsc
    return rsc, div


@triton.jit
def p2_values(xs, div, MODE: tl.constexpr, EMIN: tl.constexpr, MANT_T: tl.constexpr):
    """int4p2 (MODE 0) / fp4p2 (MODE 1): a (BM, NG, G) tile of X^ -> code * 2^e as fp32 (exact in FP8 e4m3).
    div: (BM,) the row divisor of ``_row_scale``. y = X^ * RN(1 / r): one IEEE reciprocal per row, as the
    format's reference. Codes by ``rint_small`` (full-rate adds, no -0), not the GPU's rounding instruction."""
    return p2_values_given_max(xs, _amax(tl.abs(xs), 2), div, MODE, EMIN, MANT_T)


@triton.jit
def p2_values_given_max(xs, gx, div, MODE: tl.constexpr, EMIN: tl.constexpr, MANT_T: tl.constexpr):
    """``p2_values`` given gx (BM, NG), each group's max |X^| (the single pass has it from the row maximum): the
    groups' max |y| is RN(gx * RN(1 / r)) exactly (rounding is monotone and odd), so y is not reduced."""
    rr = tl.math.div_rn(tl.full(div.shape, 1.0, tl.float32), div)
    y = xs * rr[:, None, None]
    gmax = gx * rr[:, None]
    e = frexp_exponent(gmax) - 3 + (mantissa_bits(gmax) > MANT_T).to(tl.int32)
    e = tl.where(gmax > 0, e, EMIN)
    e = tl.minimum(tl.maximum(e, EMIN), 0)
    v = y * pow2(-e)[:, :, None]
    if MODE == 0:
        c = tl.minimum(tl.maximum(rint_small(v), -8.0), 7.0)
    else:
        c = e2m1_round(v)
    return c * pow2(e)[:, :, None]


@triton.jit
def _quant_tile(xs, div, t_one, gs_ptr, rows, rmask, k0, stride_gs, Kp,
                MODE: tl.constexpr, G: tl.constexpr, NG: tl.constexpr, QMAX: tl.constexpr, EMIN: tl.constexpr,
                MANT_T: tl.constexpr, S_DROP: tl.constexpr, S_MAX: tl.constexpr, S_SUBQ: tl.constexpr,
                S_MINN: tl.constexpr, OUTER: tl.constexpr, HW_ROUND: tl.constexpr):
    """Quantize one (BM, NG, G) tile of X^ -> the GEMM operand (int4 groups: also stores the group scales).
    div: (BM,) the row divisor of ``_row_scale`` (row formats); t_one: the per-tensor scale (nvfp4)."""
    grp = tl.arange(0, NG)
    if MODE == 0 or MODE == 1:
        out = to_e4m3(p2_values(xs, div, MODE, EMIN, MANT_T), HW_ROUND)  # exact
    if MODE == 2:
        c = tl.minimum(tl.maximum(_rne(tl.math.div_rn(xs, div[:, None, None]), HW_ROUND), -127.0), 127.0)
        out = c.to(tl.int32).to(tl.int8)
    if MODE == 3:
        gmax = _amax(tl.abs(xs), 2)
        s = round_to_mantissa(tl.minimum(tl.math.div_rn(gmax, 7.0), S_MAX), S_DROP, S_SUBQ, S_MINN)
        s = tl.where((gmax > 7.5 * s) & (s < S_MAX), next_up(s, S_DROP, S_SUBQ, S_MINN), s)
        s_safe = tl.where(s != 0, s, 1.0)
        c = tl.minimum(tl.maximum(rint_small(tl.math.div_rn(xs, s_safe[:, :, None])), -8.0), 7.0)
        out = to_e4m3(c, HW_ROUND)
        gcol = k0 // G + grp
        tl.store(gs_ptr + gcol[None, :] * stride_gs + rows[:, None], s,
                 mask=rmask[:, None] & (gcol[None, :] < Kp // G))
    if MODE == 4:
        gmax = _amax(tl.abs(xs), 2)
        if OUTER == 0:
            rel = gmax
        if OUTER == 1:
            rel = tl.math.div_rn(gmax, t_one)
        if OUTER == 2:
            rel = tl.math.div_rn(gmax, div[:, None])
        s = round_to_mantissa(tl.minimum(tl.math.div_rn(rel, 6.0), 448.0), 20, 0.001953125, 0.015625)
        s = tl.where((rel > 7.0 * s) & (s < 448.0), next_up(s, 20, 0.001953125, 0.015625), s)
        if OUTER == 0:
            eff = s
        if OUTER == 1:
            eff = s * t_one
        if OUTER == 2:
            eff = s * div[:, None]
        eff = tl.where(eff != 0, eff, 1.0)
        v = e2m1_round(tl.math.div_rn(xs, eff[:, :, None]))
        out = (v * s[:, :, None]).to(tl.bfloat16)  # exact: <= 6 significant bits
    if MODE == 6:  # fp8 per row: e4m3(X^ * RN(1 / s)), nearest even, saturating, zeros +0 (``e4m3_rn``)
        y = xs * tl.math.div_rn(tl.full(div.shape, 1.0, tl.float32), div)[:, None, None]
        if HW_ROUND:  # the GPU's conversion rounds to nearest even and saturates as e4m3_rn; zeros made +0 first
            out = to_e4m3(tl.where(tl.abs(y) > 0.0009765625, y, 0.0), HW_ROUND)  # |y| <= 2^-10 rounds to 0
        else:
            out = to_e4m3(e4m3_rn(y), HW_ROUND)  # exact cast of a value already on the grid
    if MODE == 5:
        gmax = _amax(tl.abs(xs), 2)
        e = tl.where(gmax > 0, frexp_exponent(gmax) - 3, -127)
        e = tl.minimum(tl.maximum(e, -127), 127)
        v = e2m1_round(xs * pow2(-e)[:, :, None])
        out = (v * pow2(e)[:, :, None]).to(tl.bfloat16)
    return out


@triton.jit
def _down_dot(x, d_ptr, cols, Kp, acc, RANK: tl.constexpr, XSPLIT: tl.constexpr, UPCAST: tl.constexpr):
    """acc += x @ D[cols] with D = lr_down^T / smooth split into bf16 hi + lo ((2, Kp, RANK), see ``fold_down``).

    x (BM, BK) raw input (zeros past K). bf16 x: the products x * hi and x * lo are exact in the fp32
    accumulator; other dtypes: x split into bf16 hi + lo as well (x_lo * d_lo dropped, ~2^-16 relative)."""
    offs_r = tl.arange(0, RANK)
    dmask = cols[:, None] < Kp
    dp = d_ptr + cols[:, None] * RANK + offs_r[None, :]
    d_hi = tl.load(dp, mask=dmask, other=0.0)
    d_lo = tl.load(dp + Kp * RANK, mask=dmask, other=0.0)
    if UPCAST:  # interpreter: its bf16 dot is wrong; the same sum of products in fp32
        xf = x.to(tl.float32)
        acc = tl.dot(xf, d_hi.to(tl.float32), acc)
        acc = tl.dot(xf, d_lo.to(tl.float32), acc)
    else:
        if XSPLIT:
            xf = x.to(tl.float32)
            x_hi = xf.to(tl.bfloat16)
            x_lo = (xf - x_hi.to(tl.float32)).to(tl.bfloat16)
            acc = tl.dot(x_hi, d_hi, acc)
            acc = tl.dot(x_hi, d_lo, acc)
            acc = tl.dot(x_lo, d_hi, acc)
        else:
            acc = tl.dot(x, d_hi, acc)
            acc = tl.dot(x, d_lo, acc)
    return acc
