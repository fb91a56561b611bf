"""Dynamic activation quantization fused with the smoothing division and the low-rank down-projection.

One kernel reads each token's row of X (M, K) and emits what the GEMM needs:
  q      (M, Kp) the GEMM operand:
           int4p2 / fp4p2    float8_e4m3fn  value(code) * 2^e          (exact; row scale r in ``row_scale``)
           int8 (per token)  int8 codes                                (scale in ``row_scale``)
           fp8 (per token)   float8_e4m3fn  e4m3(X^ / s)               (s = max|X^_row| / 448 in ``row_scale``)
           int4 (groups)     float8_e4m3fn codes -8..7                 (fp32 group scales in ``group_scale``)
           fp4 / nvfp4       bfloat16      e2m1 value * e4m3 scale     (exact; outer fp32 scale separate)
           mxfp4             bfloat16      e2m1 value * 2^e            (exact)
  row_scale   (M,) fp32 per-token scale (or (1,) per-tensor for nvfp4), None where the format has none
  group_scale (K/g, M) fp32, group-major (int4 only)
  lr     (M, R) fp32: X^ @ lr_down^T, the low-rank branch's down-projection (R padded to a power of 2 >= 16)
with X^ = pad(X) * (1 / smooth) computed in fp32 exactly as ``fourbit.kernels.reference`` does, and codes/scales bit-for-bit
those of the format's reference ``quantize`` (the ``act_quant_torch`` twin builds them from it).

Two paths (``ActConfig``; defaults from the H100 sweeps, see DEFAULT_CONFIG):
  * single pass (``_act_fused_kernel``; default without a down-projection): one program per row (or few rows),
    walking it twice in chunks: row maximum, then quantize and store (the second walk hits L1/L2), so X is read
    from memory once; formats without a row scale walk once;
  * two launches (default with a down-projection; always for per-tensor scales): a *stats* kernel (row maxima
    of |X^| and the down-projection, each program over a slice of K, partials summed in a fixed order) and the
    *quantize* kernel, one program per (rows, columns) tile.
The down-projection multiplies the raw X by ``fold_down(lr_down, smooth)`` = (lr_down / smooth)^T in bf16 hi + lo
(no division; exact products for bf16 X; differs from the fp32 reference by ~2^-16 relative per product and the
summation order). ``fast_div`` computes the IEEE divisions from cached reciprocals (``_div``), bit-exact.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .reference import smooth_reciprocal
from ._common import (aligned_empty, amax as _amax, total as _total, as_int_value, ceil_div, check_device, e2m1_round,
                      frexp_exponent, interpreting, mantissa_bits, next_pow2, next_up, num_sms, pow2, round_half_even,
                      round_to_mantissa)

try:  # the GPU's rint (round half to even); the interpreter path never calls it
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover
    from triton.language.extra.cuda import libdevice

# kernel modes (one per family of format numerics)
P2_INT, P2_E2M1, INT8_ROW, INT4_GROUP, E2M1_E4M3, MX, FP8_ROW = range(7)
_TINY = 1.1754943508222875e-38  # smallest normal fp32 (floor of fp4/nvfp4 outer scales)
_FP32_MAX = 3.4028234663852886e38
_BF16_MAX = 3.3895313892515355e38


@dataclass(frozen=True)
class ActSpec:
    """How a format's activation quantizer maps onto the kernel (see ``act_spec``)."""

    mode: int
    group: int  # group size (== block width for per-row int8)
    qmax: float = 7.0
    emin: int = 0
    scale16: str = "float16"  # int4's group-scale dtype
    outer: int = 0  # fp4 family: 0 none, 1 per tensor, 2 per row

    @property
    def row_pass(self) -> bool:
        return self.mode in (P2_INT, P2_E2M1, INT8_ROW, FP8_ROW) or self.outer == 2

    @property
    def operand_dtype(self) -> torch.dtype:
        if self.mode == INT8_ROW:
            return torch.int8
        if self.mode in (E2M1_E4M3, MX):
            return torch.bfloat16
        return torch.float8_e4m3fn


@functools.lru_cache(maxsize=256)
def act_spec(fmt) -> Optional[ActSpec]:
    """The kernel spec of activation format ``fmt``, or None if no kernel implements it (use the reference).
    Cached: formats are immutable and hash by their spec."""
    name = getattr(fmt, "name", None)
    g = fmt.group_size if fmt is not None else None
    pow2_group = g is not None and g >= 16 and (g & (g - 1)) == 0
    if name == "int4p2" and pow2_group:
        return ActSpec(P2_INT, g, 7.0, int(fmt.EMIN))
    if name == "fp4p2" and pow2_group:
        return ActSpec(P2_E2M1, g, 6.0, int(fmt.EMIN))
    if name == "int8" and g is None and fmt.scale_dtype == torch.float32:
        return ActSpec(INT8_ROW, 0, 127.0)
    if name == "fp8" and g is None:
        return ActSpec(FP8_ROW, 0, 448.0)
    if name == "int4" and pow2_group and g >= 32:
        return ActSpec(INT4_GROUP, g, 7.0, scale16=str(fmt.scale_dtype).replace("torch.", ""))
    if name == "fp4" and pow2_group:
        return ActSpec(E2M1_E4M3, g, 6.0, outer={None: 0, "tensor": 1, "row": 2}[fmt.outer_scale])
    if name == "nvfp4":
        return ActSpec(E2M1_E4M3, 16, 6.0, outer=1)
    if name == "mxfp4":
        return ActSpec(MX, 32, 6.0)
    return None


@dataclass
class ActOperand:
    """What ``act_quant`` returns (shapes in the module docstring)."""

    q: Tensor
    row_scale: Optional[Tensor] = None
    group_scale: Optional[Tensor] = None
    lr: Optional[Tensor] = None


@dataclass(frozen=True)
class ActConfig:
    """Which path and tiles.

    ``single_pass`` (without a down-projection; ``single_pass_lr`` with one): one launch
    (``_act_fused_kernel``), one program per ``rows`` rows (``rows_lr``
    when there is a down-projection: tensor-core dots need >= 16 rows) walking whole rows in chunks of
    ``chunk`` columns (0: the whole padded row in one chunk), ``warps`` warps, ``stages`` software-pipeline
    stages. Formats with a per-tensor scale (nvfp4, fp4 with a tensor scale) always take the two-launch path.
    With a down-projection and ``lr_split``, a stats launch over slices of K computes it first (raw X times the
    ``fold_down`` factor; thousands of programs of stats_BM rows); else the single-pass kernel does it itself.
    Two-launch path: stats kernel (row maxima and the down-projection) over slices of K,
    programs of stats_BM rows, ``split`` slices per row block (None: enough programs to fill the GPU ~4 times),
    then the quantize kernel, one program per (BM rows, BK columns) tile (BK a multiple of the group).
    ``hw_round``: use the GPU's round-to-nearest-even instruction (the interpreter emulates it).
    """

    single_pass: bool = True  # without a down-projection
    single_pass_lr: bool = False  # with one
    rows: int = 1
    rows_lr: int = 16
    chunk: int = 1024
    warps: int = 4
    stages: int = 1
    large_k: int = 0  # padded K from which the single pass uses ``large_chunk`` / ``large_warps`` (0: never)
    large_chunk: int = 2048
    large_warps: int = 8
    lr_split: bool = True  # single pass + rank: the down-projection in its own stats launch (split K, folded)
    lr_mm_rows: int = 0  # with a down-projection, M >= this, bf16 X on CUDA: single pass without it, and the
    #                      down-projection as one cuBLAS GEMM X @ [hi | lo] with fp32 output (0: never)
    lr_mm_stream_max_k: int = 0  # cuBLAS down-projection with Kp <= this: on a side stream, concurrent with the
    #                              single pass (X fits in L2, so the two share its reads); 0: never
    fast_div: bool = False  # int8's row division from a reciprocal (bit-exact, see ``_div``); measured slower on H100
    BM: int = 16
    BK: int = 256
    num_warps: int = 4
    stats_BM: int = 32
    stats_BK: int = 128
    stats_warps: int = 4
    split: Optional[int] = None
    hw_round: bool = True
    lr_dot: str = "folded"  # stats kernel's down-projection: "folded" (raw X @ fold_down factor: bf16 hi + lo),
    #                        "tf32" (X^ @ lr_down^T), or "bf16x2" (X^ in two bf16 halves)
    # the split pass (``_act_split_kernel``): per-row-scale formats with the branch and Kp >= split_min_k (0: never)
    split_min_k: int = 0
    split_rows: int = 64  # rows per block (tensor-core dots: >= 16)
    split_bk: int = 128  # columns per step of its first walk (row maxima + down-projection)
    split_qrows: int = 8  # quantize tiles of its second walk: split_qrows x split_qbk
    split_qbk: int = 256
    split_slices: Optional[int] = None  # slices of K per row block (None: chosen by ``_split_plan``)
    split_warps: int = 4
    split_ctas: int = 2  # programs per SM; split_warps x split_ctas <= 8 keeps them resident at once whatever
    #                      registers the kernel takes (<= 255 per thread: 8 warps' worth fill one SM's 64K)
    split_stages: int = 2
    split_l2_bytes: int = 24 << 20  # cap on the X bytes one round of blocks holds in L2 between the two walks


#: H100 sweeps (benchmarks/act_quant.py, results/act_quant.h100.2026-11-22b.*; Triton 3.6): one row per program
#: in chunks of 1024 columns with 4 warps beat the two-launch path by 30% without the branch (2.3x vs 3.4x the
#: memory floor at 4608 x 3072); rows of 16 with the down-projection's dot inside were 3-4x slower (the factor
#: is re-read from L2 by every 16 rows); dividing from cached reciprocals (``fast_div``) was 25% slower (its
#: guard). The stats kernel's tile (two-launch path, or the split-K down-projection): 64x32 was 20% faster than
#: 64x64 and 2x faster than 32x128 (2026-11-22 sweep).
#: With the rank-32 branch (2026-11-22b sweep with cached factors): two launches, the stats kernel computing row
#: maxima and the folded down-projection, then quantize tiles of 4 x 512, were 4% faster than the single pass
#: plus a split-K down-projection launch at K >= 12288 and equal at K = 3072.
#: With the smoothing and the row scale as multiplications by reciprocals (2026-11-22c probe,
#: results/act_quant-probe.h100.2026-11-22.*): single pass without the branch 0.038 -> 0.023 ms at 4608 x 3072
#: with 2 stages, 0.148 -> 0.080 ms at 4608 x 12288 with chunks of 2048 and 8 warps.
#: The down-projection as a cuBLAS GEMM beside the single pass (results/act_quant-lrmm.h100.2026-11-22.*):
#: 0.040 -> 0.036 ms at 4608 x 3072, 0.142 -> 0.130 at 4608 x 12288, equal at 4608 x 15360, slower at
#: 1024 x 3072 (0.0136 -> 0.0163): used from 2048 rows.
#: Session 4 (results/branch-probe.h100.2026-11-22*): the cuBLAS down-projection on a side stream, concurrent
#: with the single pass, 0.038 -> 0.031 ms at 4608 x 3072 (X fits in L2: the two kernels share its reads), no gain
#: at K = 12288, slower at 15360; chunks of 4096 from K = 8192 (no branch) 0.079 -> 0.076 ms at 4608 x 12288 and
#: 0.112 -> 0.098 at 4608 x 15360. Tried and dropped: the cuBLAS down-projection over row chunks that stay in L2
#: (1.3-1.6x slower), one wave of 64-row programs with the dot inside (2.4-2.8x slower).
DEFAULT_CONFIG = ActConfig(single_pass=True, single_pass_lr=False, stages=2, large_k=8192, large_chunk=4096,
                           large_warps=8, lr_mm_rows=2048, lr_mm_stream_max_k=4096, BM=4, BK=512, num_warps=4,
                           stats_BM=64, stats_BK=32)


# ---- the kernels --------------------------------------------------------------------------------
@triton.jit
def _any(bad, NDIM: tl.constexpr):
    """True if any element of the (NDIM-d, NDIM in 1..3) boolean tensor is set (a scalar, for a branch)."""
    b = bad.to(tl.int32)
    if NDIM == 3:
        b = _amax(b, 2)
    if NDIM >= 2:
        b = _amax(b, 1)
    return _amax(b, 0) > 0


@triton.jit
def _div(a, b, rb, FAST: tl.constexpr, NDIM: tl.constexpr):
    """a / b rounded to nearest even, bit for bit IEEE division (``div_rn``).

    FAST: from rb = RN(1/b) (NaN where |b| is outside [2^-100, 2^100]: ``recip``) with three instructions and
    no special-function unit (Markstein): q0 = a * rb is within 1 ulp of a / b, the residual r = a - q0 * b is
    exact in one fma, and RN(q0 + r * rb) is the correctly rounded quotient, provided nothing underflows or
    overflows: |a| >= 2^-100 or a == 0, and 2^-120 <= |q0| <= 2^120. Where some element of the tile is outside
    that (never for activations in practice), the tile takes ``div_rn`` for those elements (a branch per tile).
    r == 0 means q0 is exact (this also keeps the sign of -0 / b)."""
    if FAST:
        q0 = a * rb
        r = tl.fma(-q0, b, a)
        q = tl.where(r == 0, q0, tl.fma(r, rb, q0))
        aa = tl.abs(a)
        aq = tl.abs(q0)
        bad = ((aa != 0) & ((aa < 7.888609052210118e-31) | (aq < 7.52316384526264e-37))) | ~(aq <= 1.329227995784916e36)
        if _any(bad, NDIM):
            q = tl.where(bad, tl.math.div_rn(a, b), q)
    else:
        q = tl.math.div_rn(a, b)
    return q


@triton.jit
def _recip(b):
    """RN(1 / b), NaN where |b| is outside [2^-100, 2^100] (so that ``_div`` takes its exact branch there)."""
    rb = tl.math.div_rn(tl.full(b.shape, 1.0, tl.float32), b)
    ab = tl.abs(b)
    return tl.where((ab >= 7.888609052210118e-31) & (ab <= 1.2676506002282294e30), rb, float("nan"))


def recip(b: Tensor) -> Tensor:
    """Host twin of ``_recip`` (fp32): the reciprocal operand of the kernels' fast division."""
    b = b.float()
    ok = (b.abs() >= 2.0 ** -100) & (b.abs() <= 2.0 ** 100)
    return torch.where(ok, 1.0 / b, torch.full_like(b, float("nan")))


@triton.jit
def _div_kernel(a_ptr, b_ptr, rb_ptr, o_ptr, N, FAST: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    a = tl.load(a_ptr + offs, mask=m, other=1.0)
    b = tl.load(b_ptr + offs, mask=m, other=1.0)
    rb = tl.load(rb_ptr + offs, mask=m, other=1.0)
    tl.store(o_ptr + offs, _div(a, b, rb, FAST, 1), mask=m)


def div_elementwise(a: Tensor, b: Tensor, fast: bool = True) -> Tensor:
    """a / b (fp32, same shape) through the kernels' division ``_div``: for checking that it is IEEE's."""
    a, b = a.float().contiguous(), b.float().contiguous()
    out = torch.empty_like(a)
    _div_kernel[(ceil_div(a.numel(), 1024),)](a, b, recip(b), out, a.numel(), FAST=fast, BLOCK=1024)
    return out


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
    """x * (1 / smooth) (the reference's smoothing: one fp32 multiply by the cached reciprocal)."""
    return x * tl.load(rsmooth_ptr + cols, mask=cols < Kp, other=1.0)


@triton.jit
def _rne(x, HW: tl.constexpr):
    if HW:
        return libdevice.rint(x)
    else:
        return round_half_even(x)


@triton.jit
def _act_stats_kernel(x_ptr, rsmooth_ptr, down_ptr, pmax_ptr, plr_ptr,
                      M, K, Kp, stride_xm, stride_dn, cols_per_split,
                      NEED_AMAX: tl.constexpr, HAS_SMOOTH: tl.constexpr, RANK: tl.constexpr,
                      LR_DOT: tl.constexpr, XSPLIT: tl.constexpr, UPCAST: tl.constexpr,
                      BM: tl.constexpr, BK: tl.constexpr):
    """Partial row maxima of |X^| (SPLIT, M) and partial down-projections (SPLIT, M, RANK) over one K slice.
    LR_DOT: 0 tf32 X^ @ lr_down^T, 1 X^ in bf16 hi + lo, 2 raw X @ ``fold_down`` factor (no division)."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < M
    xrow = rows.to(tl.int64) * stride_xm
    k_lo = pid_s * cols_per_split
    amax = tl.full((BM,), 0, tl.float32)
    if RANK > 0:
        acc = tl.full((BM, RANK), 0, tl.float32)
        offs_r = tl.arange(0, RANK)
    for k0 in range(k_lo, tl.minimum(k_lo + cols_per_split, Kp), BK):
        cols = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + xrow[:, None] + cols[None, :], mask=rmask[:, None] & (cols[None, :] < K), other=0.0)
        if NEED_AMAX or LR_DOT < 2:
            xs = x.to(tl.float32)
            if HAS_SMOOTH:
                xs = _smooth(xs, rsmooth_ptr, cols[None, :], Kp)
        if NEED_AMAX:
            amax = tl.maximum(amax, _amax(tl.abs(xs), 1))
        if RANK > 0:
            if LR_DOT == 2:
                acc = _down_dot(x, down_ptr, cols, Kp, acc, RANK, XSPLIT, UPCAST)
            else:
                d = tl.load(down_ptr + offs_r[None, :] * stride_dn + cols[:, None], mask=cols[:, None] < Kp,
                            other=0.0)
                if LR_DOT == 1:  # xs = hi + lo, both bf16 (~16 significant bits); d is bf16: both products exact
                    hi = xs.to(tl.bfloat16)
                    lo = (xs - hi.to(tl.float32)).to(tl.bfloat16)
                    if UPCAST:  # interpreter: its bf16 dot is wrong; the same products in fp32
                        acc = tl.dot(hi.to(tl.float32), d.to(tl.float32), acc)
                        acc = tl.dot(lo.to(tl.float32), d.to(tl.float32), acc)
                    else:
                        acc = tl.dot(hi, d, acc)
                        acc = tl.dot(lo, d, acc)
                else:
                    acc = tl.dot(xs, d.to(tl.float32), acc, input_precision="tf32")  # (BM, BK) @ (BK, RANK)
    if NEED_AMAX:
        tl.store(pmax_ptr + pid_s * M + rows, amax, mask=rmask)
    if RANK > 0:
        tl.store(plr_ptr + (pid_s * M + rows[:, None]).to(tl.int64) * RANK + offs_r[None, :], acc,
                 mask=rmask[:, None])


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
def p2_values(xs, div, MODE: tl.constexpr, EMIN: tl.constexpr, MANT_T: tl.constexpr, HW_ROUND: tl.constexpr):
    """int4p2 (MODE 0) / fp4p2 (MODE 1): a (BM, NG, G) tile of X^ -> code * 2^e as fp32 (exact in FP8 e4m3).
    div: (BM,) the row divisor of ``_row_scale``. y = X^ * RN(1 / r): one IEEE reciprocal per row, as the
    format's reference."""
    y = xs * tl.math.div_rn(tl.full(div.shape, 1.0, tl.float32), div)[:, None, None]
    gmax = _amax(tl.abs(y), 2)  # (BM, NG)
    e = frexp_exponent(gmax) - 3 + (mantissa_bits(gmax) > MANT_T).to(tl.int32)
    e = tl.where(gmax > 0, e, EMIN)
    e = tl.minimum(tl.maximum(e, EMIN), 0)
    v = y * pow2(-e)[:, :, None]
    if MODE == 0:
        c = as_int_value(tl.minimum(tl.maximum(_rne(v, HW_ROUND), -8.0), 7.0))
    else:
        c = e2m1_round(v)
    return c * pow2(e)[:, :, None]


@triton.jit
def _quant_tile(xs, div, t_one, gs_ptr, rows, rmask, k0, stride_gs, Kp,
                MODE: tl.constexpr, G: tl.constexpr, NG: tl.constexpr, QMAX: tl.constexpr, EMIN: tl.constexpr,
                MANT_T: tl.constexpr, S_DROP: tl.constexpr, S_MAX: tl.constexpr, S_SUBQ: tl.constexpr,
                S_MINN: tl.constexpr, OUTER: tl.constexpr, HW_ROUND: tl.constexpr, FAST: tl.constexpr):
    """Quantize one (BM, NG, G) tile of X^ -> the GEMM operand (int4 groups: also stores the group scales).
    div: (BM,) the row divisor of ``_row_scale`` (row formats); t_one: the per-tensor scale (nvfp4)."""
    grp = tl.arange(0, NG)
    if MODE == 0 or MODE == 1:
        out = p2_values(xs, div, MODE, EMIN, MANT_T, HW_ROUND).to(tl.float8e4nv)  # exact
    if MODE == 2:
        d3 = tl.broadcast_to(div[:, None, None], xs.shape)
        rd3 = d3
        if FAST:  # the row divisor's reciprocal (fast IEEE division)
            rd3 = tl.broadcast_to(_recip(div)[:, None, None], xs.shape)
        c = tl.minimum(tl.maximum(_rne(_div(xs, d3, rd3, FAST, 3), HW_ROUND), -127.0), 127.0)
        out = c.to(tl.int32).to(tl.int8)
    if MODE == 3:
        gmax = _amax(tl.abs(xs), 2)
        s = round_to_mantissa(tl.minimum(tl.math.div_rn(gmax, 7.0), S_MAX), S_DROP, S_SUBQ, S_MINN)
        s = tl.where((gmax > 7.5 * s) & (s < S_MAX), next_up(s, S_DROP, S_SUBQ, S_MINN), s)
        s_safe = tl.where(s != 0, s, 1.0)
        c = tl.minimum(tl.maximum(_rne(tl.math.div_rn(xs, s_safe[:, :, None]), HW_ROUND), -8.0), 7.0)
        out = as_int_value(c).to(tl.float8e4nv)
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
    if MODE == 6:  # fp8 per row: e4m3(X^ * RN(1 / s)), saturating; exact cast of a value already on the grid
        y = xs * tl.math.div_rn(tl.full(div.shape, 1.0, tl.float32), div)[:, None, None]
        mag = round_to_mantissa(tl.minimum(tl.abs(y), 448.0), 20, 0.001953125, 0.015625)
        out = tl.where(y < 0, -mag, mag).to(tl.float8e4nv)
    if MODE == 5:
        gmax = _amax(tl.abs(xs), 2)
        e = tl.where(gmax > 0, frexp_exponent(gmax) - 3, -127)
        e = tl.minimum(tl.maximum(e, -127), 127)
        v = e2m1_round(xs * pow2(-e)[:, :, None])
        out = (v * pow2(e)[:, :, None]).to(tl.bfloat16)
    return out


@triton.jit
def _act_quant_kernel(
    x_ptr, rsmooth_ptr, q_ptr, rs_ptr, gs_ptr, pmax_ptr, plr_ptr, lr_ptr, t_ptr,
    M, K, Kp, stride_xm, stride_qm, stride_gs, SPLIT,
    MODE: tl.constexpr, G: tl.constexpr, NG: tl.constexpr, QMAX: tl.constexpr, EMIN: tl.constexpr,
    MANT_T: tl.constexpr,  # pow2 modes: mantissa bits above which frexp's m exceeds QMAX / 8
    S_DROP: tl.constexpr, S_MAX: tl.constexpr, S_SUBQ: tl.constexpr, S_MINN: tl.constexpr,  # 16-bit scale grid
    OUTER: tl.constexpr, ROW_PASS: tl.constexpr, HAS_SMOOTH: tl.constexpr, RANK: tl.constexpr,
    HW_ROUND: tl.constexpr, FAST: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
):
    """The two-launch path's second kernel: quantize one (BM, BK) tile, row scales from the stats partials."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < M

    # ---- per-row scales from the stats kernel's partial maxima (every program recomputes them) ----
    div = tl.full((BM,), 1.0, tl.float32)
    if ROW_PASS:
        amax = tl.full((BM,), 0, tl.float32)
        for s in range(SPLIT):
            amax = tl.maximum(amax, tl.load(pmax_ptr + s * M + rows, mask=rmask, other=0.0))
        rsc, div = _row_scale(amax, MODE, QMAX, OUTER)
        if pid_k == 0:
            tl.store(rs_ptr + rows, rsc, mask=rmask)
    t_one = 1.0
    if OUTER == 1:
        t_one = tl.load(t_ptr)
    if RANK > 0:  # the down-projection: sum of the partials, in a fixed order (deterministic)
        if pid_k == 0:
            offs_r = tl.arange(0, RANK)
            lr = tl.full((BM, RANK), 0, tl.float32)
            for s in range(SPLIT):
                lr += tl.load(plr_ptr + (s * M + rows[:, None]).to(tl.int64) * RANK + offs_r[None, :],
                              mask=rmask[:, None], other=0.0)
            tl.store(lr_ptr + rows[:, None].to(tl.int64) * RANK + offs_r[None, :], lr, mask=rmask[:, None])

    # ---- quantize one (BM, NG, G) tile ----
    k0 = pid_k * BK
    grp = tl.arange(0, NG)
    el = tl.arange(0, G)
    cols = k0 + grp[None, :, None] * G + el[None, None, :]  # (1, NG, G)
    xs = _load_smoothed(x_ptr, rsmooth_ptr, rows[:, None, None].to(tl.int64) * stride_xm, cols,
                        rmask[:, None, None], K, Kp, HAS_SMOOTH)  # (BM, NG, G)
    out = _quant_tile(xs, div, t_one, gs_ptr, rows, rmask, k0, stride_gs, Kp, MODE, G, NG, QMAX, EMIN, MANT_T,
                      S_DROP, S_MAX, S_SUBQ, S_MINN, OUTER, HW_ROUND, FAST)
    tl.store(q_ptr + rows[:, None, None].to(tl.int64) * stride_qm + cols, out,
             mask=rmask[:, None, None] & (cols < Kp))


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


@triton.jit
def _act_fused_kernel(
    x_ptr, x2_ptr, rsmooth_ptr, d_ptr, plr_ptr, q_ptr, rs_ptr, gs_ptr, lr_ptr, t_ptr,
    M, K1, K, Kp, stride_xm, stride_x2m, stride_qm, stride_gs, SPLIT,
    MODE: tl.constexpr, G: tl.constexpr, NG: tl.constexpr, QMAX: tl.constexpr, EMIN: tl.constexpr,
    MANT_T: tl.constexpr, S_DROP: tl.constexpr, S_MAX: tl.constexpr, S_SUBQ: tl.constexpr, S_MINN: tl.constexpr,
    OUTER: tl.constexpr, ROW_PASS: tl.constexpr, HAS_SMOOTH: tl.constexpr, RANK: tl.constexpr,
    LR_MODE: tl.constexpr, LR_Q: tl.constexpr, XSPLIT: tl.constexpr, UPCAST: tl.constexpr, HW_ROUND: tl.constexpr,
    FAST: tl.constexpr, TWO: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
):
    """One program per BM rows (whole rows): X read from memory once. TWO: X is two column blocks
    (``_load_blocks``; LR_MODE 0 or 2 only).

    Row formats: loop 1 over K (row maxima of |X^|, and the down-projection on tensor cores if LR_MODE == 1),
    loop 2 over K (quantize and store; the row block was just read, so this read mostly hits L1/L2). Other
    formats: one loop. LR_MODE: 0 no down-projection, 1 in this kernel (``_down_dot``), 2 sum the SPLIT partials
    of a preceding stats launch (``_act_stats_kernel`` over slices of K, fixed order)."""
    pid = tl.program_id(0)
    rows = pid * BM + tl.arange(0, BM)
    rmask = rows < M
    xrow = rows.to(tl.int64) * stride_xm
    x2row = rows.to(tl.int64) * stride_x2m
    if LR_MODE == 1:
        acc = tl.full((BM, RANK), 0, tl.float32)
    div = tl.full((BM,), 1.0, tl.float32)
    if ROW_PASS:
        amax = tl.full((BM,), 0, tl.float32)
        for k0 in range(0, Kp, BK):
            cols = k0 + tl.arange(0, BK)
            x = _load_blocks(x_ptr, x2_ptr, xrow[:, None], x2row[:, None], cols[None, :], rmask[:, None], K1, K, TWO)
            xs = x.to(tl.float32)
            if HAS_SMOOTH:
                xs = _smooth(xs, rsmooth_ptr, cols[None, :], Kp)
            amax = tl.maximum(amax, _amax(tl.abs(xs), 1))
            if LR_MODE == 1:
                acc = _down_dot(x, d_ptr, cols, Kp, acc, RANK, XSPLIT, UPCAST)
        rsc, div = _row_scale(amax, MODE, QMAX, OUTER)
        tl.store(rs_ptr + rows, rsc, mask=rmask)
    t_one = 1.0
    if OUTER == 1:
        t_one = tl.load(t_ptr)
    grp = tl.arange(0, NG)
    el = tl.arange(0, G)
    for k0 in range(0, Kp, BK):
        cols3 = k0 + grp[None, :, None] * G + el[None, None, :]  # (1, NG, G)
        xs3 = _load_blocks(x_ptr, x2_ptr, xrow[:, None, None], x2row[:, None, None], cols3, rmask[:, None, None],
                           K1, K, TWO).to(tl.float32)
        if HAS_SMOOTH:
            xs3 = _smooth(xs3, rsmooth_ptr, cols3, Kp)
        out = _quant_tile(xs3, div, t_one, gs_ptr, rows, rmask, k0, stride_gs, Kp, MODE, G, NG, QMAX, EMIN,
                          MANT_T, S_DROP, S_MAX, S_SUBQ, S_MINN, OUTER, HW_ROUND, FAST)
        tl.store(q_ptr + rows[:, None, None].to(tl.int64) * stride_qm + cols3, out,
                 mask=rmask[:, None, None] & (cols3 < Kp))
        if LR_Q:  # LR_MODE == 1 for formats without a row pass
            cols = k0 + tl.arange(0, BK)
            x = tl.load(x_ptr + xrow[:, None] + cols[None, :], mask=rmask[:, None] & (cols[None, :] < K), other=0.0)
            acc = _down_dot(x, d_ptr, cols, Kp, acc, RANK, XSPLIT, UPCAST)
    if LR_MODE == 2:  # the partials of the stats launch, summed in a fixed order (deterministic)
        offs_r = tl.arange(0, RANK)
        acc = tl.full((BM, RANK), 0, tl.float32)
        for sp in range(SPLIT):
            acc += tl.load(plr_ptr + (sp * M + rows[:, None]).to(tl.int64) * RANK + offs_r[None, :],
                           mask=rmask[:, None], other=0.0)
    if LR_MODE > 0:
        offs_r = tl.arange(0, RANK)
        tl.store(lr_ptr + rows[:, None].to(tl.int64) * RANK + offs_r[None, :], acc, mask=rmask[:, None])


@triton.jit
def _act_split_kernel(
    x_ptr, rsmooth_ptr, d_ptr, pmax_ptr, plr_ptr, cnt_ptr, q_ptr, rs_ptr, lr_ptr,
    M, K, Kp, stride_xm, stride_qm, SLICE, NSLICE, ITEMS,
    MODE: tl.constexpr, G: tl.constexpr, NG: tl.constexpr, QMAX: tl.constexpr, EMIN: tl.constexpr,
    MANT_T: tl.constexpr, S_DROP: tl.constexpr, S_MAX: tl.constexpr, S_SUBQ: tl.constexpr, S_MINN: tl.constexpr,
    HAS_SMOOTH: tl.constexpr, RANK: tl.constexpr, XSPLIT: tl.constexpr, UPCAST: tl.constexpr,
    HW_ROUND: tl.constexpr, FAST: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, QBM: tl.constexpr,
    QBK: tl.constexpr, NUM_PROGS: tl.constexpr, NS_P2: tl.constexpr,  # NS_P2: a power of two >= NSLICE
    LRB: tl.constexpr,
    PHASE: tl.constexpr,  # 1: first walk only, 2: second walk only (two launches), 3: both, with the wait
):
    """Row formats with the down-projection, X read from memory once at any K (the split pass).

    Work items are (block of BM rows, slice of SLICE columns), NSLICE slices per block, handed out round robin
    to NUM_PROGS persistent programs (a multiple of NSLICE, at most one per SM, so every block's slices run in
    the same round, all resident at once). First walk over the item: partial row maxima of |X^| and the partial
    down-projection (``_down_dot``, tensor cores) into per-slice slots; then the block's count is raised and the
    program waits until all NSLICE slices of its block have counted. Second walk over the same item (its X was
    just read by this SM, so it comes from L2): the row scales from the NSLICE partial maxima (max is exact in any
    order: the codes are the single pass's, bit for bit), quantize and store. The block's programs also sum the
    down-projection's partials (LRB rows each, one fixed reduction: deterministic); slice 0's stores the row scales. Under the interpreter
    (programs run one after another) the two walks are two launches, PHASE 1 then PHASE 2."""
    pid = tl.program_id(0)
    for item in range(pid, ITEMS, NUM_PROGS):
        rb = item // NSLICE
        sl = item - rb * NSLICE
        k_lo = sl * SLICE
        k_hi = tl.minimum(k_lo + SLICE, Kp)
        if PHASE != 2:
            rows = rb * BM + tl.arange(0, BM)
            rmask = rows < M
            xrow = rows.to(tl.int64) * stride_xm
            amax = tl.full((BM,), 0, tl.float32)
            acc = tl.full((BM, RANK), 0, tl.float32)
            for k0 in range(k_lo, k_hi, BK):
                cols = k0 + tl.arange(0, BK)
                x = tl.load(x_ptr + xrow[:, None] + cols[None, :], mask=rmask[:, None] & (cols[None, :] < K),
                            other=0.0)
                xs = x.to(tl.float32)
                if HAS_SMOOTH:
                    xs = _smooth(xs, rsmooth_ptr, cols[None, :], Kp)
                amax = tl.maximum(amax, _amax(tl.abs(xs), 1))
                acc = _down_dot(x, d_ptr, cols, Kp, acc, RANK, XSPLIT, UPCAST)
            offs_r = tl.arange(0, RANK)
            tl.store(pmax_ptr + sl * M + rows, amax, mask=rmask)
            tl.store(plr_ptr + (sl * M + rows[:, None]).to(tl.int64) * RANK + offs_r[None, :], acc,
                     mask=rmask[:, None])
            if PHASE == 3:  # (a scalar atomic: one thread, after a barrier of the whole program)
                tl.debug_barrier()  # every thread's partials are written before the count goes up
                tl.atomic_add(cnt_ptr + rb, 1, sem="release")
        if PHASE != 1:
            if PHASE == 3:  # wait for the block's other slices (all running in this round)
                while tl.atomic_add(cnt_ptr + rb, 0, sem="acquire") < NSLICE:
                    pass
            sps = tl.arange(0, NS_P2)
            smask = sps < NSLICE
            # the down-projection: the slices' partials summed by a fixed reduction tree (deterministic), LRB rows
            # at a time, the chunks of the block shared out over its slices' programs
            offs_r = tl.arange(0, RANK)
            for c in range(sl, BM // LRB, NSLICE):
                lrows = rb * BM + c * LRB + tl.arange(0, LRB)
                lmask = lrows < M
                plr = tl.load(plr_ptr + (sps[:, None, None] * M + lrows[None, :, None]).to(tl.int64) * RANK
                              + offs_r[None, None, :], mask=smask[:, None, None] & lmask[None, :, None], other=0.0,
                              cache_modifier=".cg")  # (NS_P2, LRB, RANK)
                tl.store(lr_ptr + lrows[:, None].to(tl.int64) * RANK + offs_r[None, :], _total(plr, 0),
                         mask=lmask[:, None])
            grp = tl.arange(0, NG)
            el = tl.arange(0, G)
            for r0 in range(rb * BM, rb * BM + BM, QBM):
                qrows = r0 + tl.arange(0, QBM)
                qmask = qrows < M
                row_max = _amax(tl.load(pmax_ptr + sps[:, None] * M + qrows[None, :], mask=smask[:, None] & qmask[None, :],
                                        other=0.0, cache_modifier=".cg"), 0)  # (NS_P2, QBM) -> (QBM,)
                rsc, div = _row_scale(row_max, MODE, QMAX, 0)
                if sl == 0:
                    tl.store(rs_ptr + qrows, rsc, mask=qmask)
                qrow = qrows[:, None, None].to(tl.int64)
                for k0 in range(k_lo, k_hi, QBK):
                    cols3 = k0 + grp[None, :, None] * G + el[None, None, :]  # (1, NG, G)
                    xs3 = _load_smoothed(x_ptr, rsmooth_ptr, qrow * stride_xm, cols3, qmask[:, None, None], K, Kp,
                                         HAS_SMOOTH)
                    out = _quant_tile(xs3, div, 1.0, rs_ptr, qrows, qmask, k0, 0, Kp, MODE, G, NG, QMAX, EMIN,
                                      MANT_T, S_DROP, S_MAX, S_SUBQ, S_MINN, 0, HW_ROUND, FAST)
                    tl.store(q_ptr + qrow * stride_qm + cols3, out, mask=qmask[:, None, None] & (cols3 < k_hi))


# ---- launcher ---------------------------------------------------------------------------------
_SCALE16 = {  # (mantissa bits dropped from fp32, max, subnormal quantum, smallest normal)
    "float16": (13, 65504.0, 2.0 ** -24, 2.0 ** -14),
    "bfloat16": (16, _BF16_MAX, 0.0, 0.0),
}


def _column_blocks(x) -> tuple[Tensor, Optional[Tensor]]:
    """``act_quant``'s x: one (M, K) tensor, or a list of column blocks (M, K_i) that X is the concatenation of.
    Returns (first block, second block or None); three or more blocks are concatenated into one."""
    if isinstance(x, Tensor):
        return x, None
    blocks = list(x)
    if not blocks or not all(isinstance(b, Tensor) and b.dim() == 2 for b in blocks):
        raise ValueError("act_quant: x must be a 2-D tensor (M, K) or a non-empty list of 2-D column blocks")
    first = blocks[0]
    if any(b.shape[0] != first.shape[0] or b.dtype != first.dtype or b.device != first.device for b in blocks):
        raise ValueError(f"act_quant: column blocks must share rows, dtype and device, got "
                         f"{[(tuple(b.shape), b.dtype, str(b.device)) for b in blocks]}")
    if len(blocks) == 1:
        return first, None
    if len(blocks) > 2:
        return torch.cat(blocks, 1), None
    return first, blocks[1]


def _joined(x: Tensor, tail: Optional[Tensor]) -> Tensor:
    """X itself, for the paths that read one tensor (the concatenation is written only there)."""
    return x if tail is None else torch.cat([x, tail], 1)


def _check(x, smooth, lr_down, padded_in, k=None):
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"act_quant: x must be a 2-D float tensor (M, K), got {tuple(x.shape)} {x.dtype}")
    k = x.shape[1] if k is None else k
    kp = padded_in if padded_in is not None else k
    if kp < k:
        raise ValueError(f"act_quant: padded_in={kp} < K={k}")
    if smooth is not None and smooth.shape != (kp,):
        raise ValueError(f"act_quant: smooth must be ({kp},), got {tuple(smooth.shape)}")
    if lr_down is not None and (lr_down.dim() != 2 or lr_down.shape[1] != kp):
        raise ValueError(f"act_quant: lr_down must be (R, {kp}), got {tuple(lr_down.shape)}")
    return kp


def fold_down(lr_down: Tensor, smooth: Optional[Tensor] = None) -> Tensor:
    """The single-pass path's down-projection operand: D = (lr_down / smooth)^T, R zero-padded to a power of
    two >= 16, split into bf16 hi + lo = D to ~2^-16 relative: (2, Kp, Rp) bfloat16, contiguous.

    X^ @ lr_down^T == X @ D (smoothing folded into the factor ahead of time), so the kernel multiplies the raw
    input: for bf16 X every product X * hi and X * lo is exact in the fp32 accumulator. Layers cache it."""
    rank = next_pow2(lr_down.shape[0], 16)
    d = lr_down.float()
    if smooth is not None:
        d = d / smooth.float()  # IEEE division, fp32
    d = torch.nn.functional.pad(d, (0, 0, 0, rank - d.shape[0])).t()  # (Kp, Rp)
    hi = d.to(torch.bfloat16)
    lo = (d - hi.float()).to(torch.bfloat16)
    return torch.stack([hi, lo]).contiguous()


_MM_FP32_OUT = [True]  # this torch has mm(bf16, bf16, out_dtype=float32) on CUDA (checked on first use)


def _down_projection_mm(x: Tensor, down_folded: Tensor, down_cat: Optional[Tensor],
                        out: Optional[Tensor] = None, tail: Optional[Tensor] = None) -> Optional[Tensor]:
    """X @ (hi + lo) as one cuBLAS GEMM with fp32 output (two, summed, for X in two column blocks [x | tail]):
    (M, Rp) fp32 (into ``out`` if given), or None where torch cannot do that (then the Triton path is used from
    then on, after one warning)."""
    if down_cat is None:
        down_cat = cat_down(down_folded)
    k1 = x.shape[1]
    try:
        both = torch.mm(x, down_cat[:k1], out_dtype=torch.float32)  # (M, 2 Rp): X @ hi, X @ lo
        if tail is not None:
            both += torch.mm(tail, down_cat[k1: k1 + tail.shape[1]], out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError) as e:
        import warnings

        _MM_FP32_OUT[0] = False
        warnings.warn(f"fourbit act_quant: torch.mm(..., out_dtype=float32) is not available here ({e}); the "
                      f"low-rank down-projection runs in the Triton stats kernel instead", stacklevel=3)
        return None
    rank = down_folded.shape[2]
    return torch.add(both[:, :rank], both[:, rank:], out=out)


def cat_down(down_folded: Tensor) -> Tensor:
    """(2, Kp, Rp) ``fold_down`` factor -> (Kp, 2 Rp) [hi | lo], the operand of ``ActConfig.lr_mm``."""
    return down_folded.permute(1, 0, 2).reshape(down_folded.shape[1], -1).contiguous()


def act_quant(x, fmt, smooth: Optional[Tensor] = None, lr_down: Optional[Tensor] = None,
              padded_in: Optional[int] = None, config: Optional[ActConfig] = None,
              down_folded: Optional[Tensor] = None, smooth_recip: Optional[Tensor] = None,
              down_cat: Optional[Tensor] = None) -> ActOperand:
    """Quantize activations x (M, K) with format ``fmt`` for the GEMM, fused with smoothing and X^ @ lr_down^T.

    smooth: (Kp,) fp32 or None; lr_down: (R, Kp) 16-bit or fp32 (R padded to a power of two >= 16 inside);
    padded_in: Kp (zero-padding of K up to the group multiple); x may be any float dtype and row stride.
    x may also be a list of column blocks [(M, K1), (M, K2)] whose concatenation is X (e.g. an attention output
    and an MLP activation that a model concatenates): the single pass reads both where it runs (no branch, or
    the cuBLAS down-projection), other paths concatenate them first.
    Layers pass what they cache: down_folded = ``fold_down(lr_down, smooth)``, smooth_recip = ``smooth_reciprocal(smooth)``;
    computed here when None. The kernels read only these two, so either may be given without its source
    (``smooth`` / ``lr_down`` None).
    """
    spec = act_spec(fmt)
    if spec is None:
        raise NotImplementedError(f"act_quant: no kernel for activation format {fmt!r}")
    if smooth is None and smooth_recip is not None:
        smooth = smooth_recip  # below, only its shape and presence are read
    from_folded = lr_down is None and down_folded is not None
    if from_folded:
        lr_down = down_folded[0].t()  # (Rp, Kp) view: only its shape is read
    x, tail = _column_blocks(x)
    kp = _check(x, smooth, lr_down, padded_in, x.shape[1] + (0 if tail is None else tail.shape[1]))
    check_device(x, tail, smooth, lr_down)
    if x.stride(1) != 1:
        x = x.contiguous()
    if tail is not None and tail.stride(1) != 1:
        tail = tail.contiguous()
    cfg = config or DEFAULT_CONFIG
    fast = cfg.fast_div
    if smooth is not None and smooth_recip is None:
        smooth_recip = smooth_reciprocal(smooth)
    single = (cfg.single_pass if lr_down is None else cfg.single_pass_lr) and spec.outer != 1
    folded = lr_down is not None and (single or cfg.lr_dot == "folded" or from_folded)
    if not folded:
        down_folded = None
    if folded and down_folded is None:
        down_folded = fold_down(lr_down, smooth)
    if folded:
        rank = next_pow2(lr_down.shape[0], 16)
        if down_folded.shape != (2, kp, rank) or down_folded.dtype != torch.bfloat16:
            raise ValueError(f"act_quant: down_folded must be (2, {kp}, {rank}) bfloat16 (fold_down), "
                             f"got {tuple(down_folded.shape)} {down_folded.dtype}")
        down_folded = down_folded.contiguous()
    if folded and spec.mode in (P2_INT, P2_E2M1, INT8_ROW, FP8_ROW) and cfg.split_min_k and kp >= cfg.split_min_k:
        return _act_quant_split(_joined(x, tail), spec, smooth, smooth_recip, kp, cfg, down_folded, fast)
    if (folded and spec.outer != 1 and cfg.lr_mm_rows and x.shape[0] >= cfg.lr_mm_rows and x.is_cuda
            and x.dtype == torch.bfloat16 and _MM_FP32_OUT[0]):
        out = _act_quant_mm(x, spec, smooth, smooth_recip, kp, cfg, down_folded, down_cat, fast, tail)
        if out is not None:
            return out
    if single and lr_down is None:  # the one path that reads two column blocks itself
        return _act_quant_single(x, spec, smooth, smooth_recip, None, kp, cfg, None, fast, tail)
    x = _joined(x, tail)
    if single:
        return _act_quant_single(x, spec, smooth, smooth_recip, lr_down, kp, cfg, down_folded, fast)
    return _act_quant_two(x, spec, smooth, smooth_recip, lr_down, kp, cfg, down_folded, fast)


def _scale_consts(spec: ActSpec):
    s_drop, s_max, s_subq, s_minn = _SCALE16.get(spec.scale16, _SCALE16["float16"])
    mant_t = int((spec.qmax / 4.0 - 1.0) * (1 << 23)) if spec.mode in (P2_INT, P2_E2M1) else 0
    return dict(MANT_T=mant_t, S_DROP=s_drop, S_MAX=s_max, S_SUBQ=s_subq, S_MINN=s_minn)


def _stats(x, smooth, smooth_recip, down, kp, rank, need_amax, cfg, dummy, lr_dot):
    """Launch the stats kernel over slices of K: (split, pmax (split, M) or None, plr (split, M, R) or None)."""
    m, k = x.shape
    dev = x.device
    n_rb = ceil_div(m, cfg.stats_BM)
    k_steps = ceil_div(kp, cfg.stats_BK)
    split = cfg.split or ceil_div(4 * num_sms(dev), n_rb)
    split = max(1, min(split, k_steps))
    cols_per_split = ceil_div(k_steps, split) * cfg.stats_BK
    split = ceil_div(kp, cols_per_split)
    pmax = torch.empty((split, m), device=dev, dtype=torch.float32) if need_amax else None
    plr = torch.empty((split, m, rank), device=dev, dtype=torch.float32) if rank else None
    code = {"tf32": 0, "bf16x2": 1, "folded": 2}[lr_dot]
    if code == 1 and (down is None or down.dtype != torch.bfloat16):
        code = 0
    _act_stats_kernel[(n_rb, split)](
        x, dummy if smooth is None else smooth_recip,
        dummy if down is None else down, dummy if pmax is None else pmax, dummy if plr is None else plr,
        m, k, kp, x.stride(0), 0 if down is None or code == 2 else down.stride(0), cols_per_split,
        NEED_AMAX=need_amax, HAS_SMOOTH=smooth is not None, RANK=rank, LR_DOT=code,
        XSPLIT=x.dtype != torch.bfloat16, UPCAST=interpreting(), 
        BM=cfg.stats_BM, BK=cfg.stats_BK, num_warps=cfg.stats_warps)
    return split, pmax, plr


def _act_quant_mm(x, spec, smooth, smooth_recip, kp, cfg, down_folded, down_cat, fast,
                  tail=None) -> Optional[ActOperand]:
    """The single pass beside the down-projection as one cuBLAS GEMM (concurrent on a side stream up to
    ``lr_mm_stream_max_k``). None where torch lacks the GEMM. ``tail``: X's second column block."""
    if kp <= cfg.lr_mm_stream_max_k:
        return _act_quant_mm_concurrent(x, spec, smooth, smooth_recip, kp, cfg, down_folded, down_cat, fast, tail)
    lr = _down_projection_mm(x, down_folded, down_cat, tail=tail)
    if lr is None:
        return None
    out = _act_quant_single(x, spec, smooth, smooth_recip, None, kp, cfg, None, fast, tail)
    out.lr = lr
    return out


_SIDE_STREAMS: dict = {}


def _act_quant_mm_concurrent(x, spec, smooth, smooth_recip, kp, cfg, down_folded, down_cat,
                             fast, tail=None) -> Optional[ActOperand]:
    """The cuBLAS down-projection on a side stream while the single pass runs on the current one (both stream
    X; together they use more of the memory bandwidth than either alone). Every buffer the side stream writes
    is allocated on the current stream before the fork, and the current stream waits for the side one before
    returning, so the caching allocator needs no cross-stream bookkeeping (also under CUDA-graph capture)."""
    dev = x.device
    rank = down_folded.shape[2]
    cur = torch.cuda.current_stream(dev)
    side = _SIDE_STREAMS.get(dev.index)
    if side is None:
        side = _SIDE_STREAMS[dev.index] = torch.cuda.Stream(dev)
    lr = torch.empty((x.shape[0], rank), device=dev, dtype=torch.float32)
    side.wait_stream(cur)
    with torch.cuda.stream(side):  # its (M, 2 Rp) temporary is freed there, reused only by later side work
        ok = _down_projection_mm(x, down_folded, down_cat, out=lr, tail=tail) is not None
    out = _act_quant_single(x, spec, smooth, smooth_recip, None, kp, cfg, None, fast, tail)
    cur.wait_stream(side)
    if not ok:
        return None
    out.lr = lr
    return out


def _act_quant_single(x, spec, smooth, smooth_recip, lr_down, kp, cfg, down_folded, fast, tail=None) -> ActOperand:
    """The single pass; ``tail`` (no down-projection here then): X's second column block, read in place."""
    m, k1 = x.shape
    k = k1 + (0 if tail is None else tail.shape[1])
    if tail is not None and lr_down is not None:
        raise ValueError("act_quant: two column blocks with the in-kernel down-projection (concatenate them first)")
    dev = x.device
    rank = 0 if lr_down is None else next_pow2(lr_down.shape[0], 16)
    large = cfg.large_k and kp >= cfg.large_k
    bk = (cfg.large_chunk if large else cfg.chunk) or next_pow2(kp)
    bk = max(bk, spec.group, 16)
    g = bk if spec.mode in (INT8_ROW, FP8_ROW) else spec.group
    q = aligned_empty(m, kp, spec.operand_dtype, dev)  # row stride 16-byte aligned for the GEMM's TMA
    lr = torch.empty((m, rank), device=dev, dtype=torch.float32) if rank else None
    rs = torch.empty((m,), device=dev, dtype=torch.float32) if spec.row_pass else None
    gs = torch.empty((kp // g, m), device=dev, dtype=torch.float32) if spec.mode == INT4_GROUP else None
    dummy = q
    lr_mode, split, plr = 0, 1, None
    bm = cfg.rows
    if rank and cfg.lr_split:
        lr_mode = 2
        split, _, plr = _stats(x, None, None, down_folded, kp, rank, False, cfg, dummy, "folded")
    elif rank:
        lr_mode = 1
        bm = cfg.rows_lr if interpreting() else max(cfg.rows_lr, 16)  # tensor-core dot: >= 16 rows
    _act_fused_kernel[(ceil_div(m, bm),)](
        x, x if tail is None else tail, dummy if smooth is None else smooth_recip,
        dummy if down_folded is None else down_folded, dummy if plr is None else plr, q,
        dummy if rs is None else rs, dummy if gs is None else gs, dummy if lr is None else lr, dummy,
        m, k1, k, kp, x.stride(0), x.stride(0) if tail is None else tail.stride(0), q.stride(0),
        0 if gs is None else gs.stride(0), split,
        MODE=spec.mode, G=g, NG=bk // g, QMAX=float(spec.qmax), EMIN=spec.emin, **_scale_consts(spec),
        OUTER=spec.outer, ROW_PASS=spec.row_pass, HAS_SMOOTH=smooth is not None, RANK=rank, LR_MODE=lr_mode,
        LR_Q=lr_mode == 1 and not spec.row_pass, XSPLIT=x.dtype != torch.bfloat16, UPCAST=interpreting(),
        HW_ROUND=cfg.hw_round and not interpreting(), FAST=fast, TWO=tail is not None, BM=bm, BK=bk,
        num_warps=cfg.large_warps if large else cfg.warps, num_stages=cfg.stages,
    )
    return ActOperand(q, rs, gs, lr)


def _split_plan(m: int, kp: int, cfg: ActConfig, sms: int) -> tuple[int, int, int]:
    """(slices per row block, columns per slice, programs) for the split pass: the fewest rounds x slice length
    (time per round), with programs a multiple of the slices (a round holds whole blocks) and a round's X within
    ``split_l2_bytes`` (it must still be in L2 for the second walk)."""
    unit = max(cfg.split_bk, cfg.split_qbk)
    units = ceil_div(kp, unit)
    n_rb = ceil_div(m, cfg.split_rows)
    best = None
    choices = [cfg.split_slices] if cfg.split_slices else range(1, min(units, sms) + 1)
    for ns in choices:
        per = ceil_div(units, ns)
        ns = ceil_div(units, per)  # slices actually needed at this length
        progs = min((sms // ns) * ns, n_rb * ns)
        if progs == 0:
            continue
        if progs * cfg.split_rows * per * unit * 2 > cfg.split_l2_bytes and best is not None:
            continue  # over the L2 cap (the first, finest candidate is kept as a fallback)
        cost = (ceil_div(n_rb * ns, progs) * per, -per)
        if best is None or cost < best[0]:
            best = (cost, ns, per * unit, progs)
    if best is None:
        raise ValueError(f"act_quant: split_slices={cfg.split_slices} exceeds the {sms} programs that can run at once")
    return best[1], best[2], best[3]


def _act_quant_split(x, spec, smooth, smooth_recip, kp, cfg, down_folded, fast) -> ActOperand:
    """The split pass (``_act_split_kernel``): row formats with the folded down-projection, X read once."""
    m, k = x.shape
    dev = x.device
    rank = down_folded.shape[2]
    if cfg.split_warps * cfg.split_ctas > 8:  # more might not all be resident at once: the wait would hang
        raise ValueError(f"act_quant: split_warps x split_ctas = {cfg.split_warps * cfg.split_ctas} > 8")
    ns, slice_cols, progs = _split_plan(m, kp, cfg, num_sms(dev) * (1 if interpreting() else cfg.split_ctas))
    qbk = cfg.split_qbk
    g = qbk if spec.mode in (INT8_ROW, FP8_ROW) else spec.group
    q = aligned_empty(m, kp, spec.operand_dtype, dev)  # row stride 16-byte aligned for the GEMM's TMA
    rs = torch.empty((m,), device=dev, dtype=torch.float32)
    lr = torch.empty((m, rank), device=dev, dtype=torch.float32)
    pmax = torch.empty((ns, m), device=dev, dtype=torch.float32)
    plr = torch.empty((ns, m, rank), device=dev, dtype=torch.float32)
    n_rb = ceil_div(m, cfg.split_rows)
    cnt = torch.zeros((n_rb,), device=dev, dtype=torch.int32)  # slices done per row block, zeroed per call
    args = (x, q if smooth is None else smooth_recip, down_folded, pmax, plr, cnt, q, rs, lr,
            m, k, kp, x.stride(0), q.stride(0), slice_cols, ns, n_rb * ns)
    meta = dict(MODE=spec.mode, G=g, NG=qbk // g, QMAX=float(spec.qmax), EMIN=spec.emin, **_scale_consts(spec),
                HAS_SMOOTH=smooth is not None, RANK=rank, XSPLIT=x.dtype != torch.bfloat16, UPCAST=interpreting(),
                HW_ROUND=cfg.hw_round and not interpreting(), FAST=fast, BM=cfg.split_rows, BK=cfg.split_bk,
                QBM=cfg.split_qrows, QBK=qbk, NUM_PROGS=progs, NS_P2=next_pow2(ns), LRB=min(8, cfg.split_rows), num_warps=cfg.split_warps,
                num_stages=cfg.split_stages)
    for phase in ((1, 2) if interpreting() else (3,)):  # the interpreter runs programs one after another
        _act_split_kernel[(progs,)](*args, PHASE=phase, **meta)
    return ActOperand(q, rs, None, lr)


def _act_quant_two(x, spec, smooth, smooth_recip, lr_down, kp, cfg, down_folded, fast) -> ActOperand:
    m, k = x.shape
    dev = x.device
    bk = max(cfg.BK, spec.group)
    g = bk if spec.mode in (INT8_ROW, FP8_ROW) else spec.group
    q = aligned_empty(m, kp, spec.operand_dtype, dev)  # row stride 16-byte aligned for the GEMM's TMA
    rs = gs = lr = t = None
    dummy = q
    rank = 0
    down = None
    if lr_down is not None:
        rank = next_pow2(lr_down.shape[0], 16)
        if down_folded is not None:
            down = down_folded
        else:
            down = lr_down
            if lr_down.shape[0] != rank:
                down = torch.nn.functional.pad(lr_down, (0, 0, 0, rank - lr_down.shape[0]))
            down = down.contiguous()
        lr = torch.empty((m, rank), device=dev, dtype=torch.float32)
    need_amax = spec.row_pass or spec.outer == 1
    split = 1
    pmax = plr = None
    if need_amax or rank:
        split, pmax, plr = _stats(x, smooth, smooth_recip, down, kp, rank, need_amax, cfg, dummy,
                                  "folded" if down_folded is not None else cfg.lr_dot)
    if spec.row_pass:
        rs = torch.empty((m,), device=dev, dtype=torch.float32)
    if spec.mode == INT4_GROUP:
        gs = torch.empty((kp // g, m), device=dev, dtype=torch.float32)
    if spec.outer == 1:  # nvfp4: t = max(max|X^| / (6 * 448), 2^-126) over the whole tensor
        t = rs = torch.clamp(pmax.amax().reshape(1) / (6.0 * 448.0), min=_TINY)
    _act_quant_kernel[(ceil_div(m, cfg.BM), ceil_div(kp, bk))](
        x, dummy if smooth is None else smooth_recip, q,
        dummy if rs is None else rs, dummy if gs is None else gs,
        dummy if pmax is None else pmax, dummy if plr is None else plr, dummy if lr is None else lr,
        dummy if t is None else t,
        m, k, kp, x.stride(0), q.stride(0), 0 if gs is None else gs.stride(0), split,
        MODE=spec.mode, G=g, NG=bk // g, QMAX=float(spec.qmax), EMIN=spec.emin, **_scale_consts(spec),
        OUTER=spec.outer, ROW_PASS=spec.row_pass,
        HAS_SMOOTH=smooth is not None, RANK=rank, HW_ROUND=cfg.hw_round and not interpreting(), FAST=fast,
        BM=cfg.BM, BK=bk, num_warps=cfg.num_warps,
    )
    return ActOperand(q, rs, gs, lr)


# ---- the plain-torch twin ----------------------------------------------------------------------
def act_quant_torch(x: Tensor, fmt, smooth: Optional[Tensor] = None, lr_down: Optional[Tensor] = None,
                    padded_in: Optional[int] = None, config: Optional[ActConfig] = None,
                    down_folded: Optional[Tensor] = None, smooth_recip: Optional[Tensor] = None) -> ActOperand:
    """The same outputs from the format's reference ``quantize`` (plain torch, any device)."""
    from ..formats.floats import e2m1_decode

    spec = act_spec(fmt)
    if spec is None:
        raise NotImplementedError(f"act_quant: no kernel for activation format {fmt!r}")
    x = _joined(*_column_blocks(x))
    kp = _check(x, smooth, lr_down, padded_in)
    xs = x.float()
    if kp != x.shape[1]:
        xs = torch.nn.functional.pad(xs, (0, kp - x.shape[1]))
    if smooth is not None:
        xs = xs * smooth_reciprocal(smooth)
    qt = fmt.quantize(xs)
    m = xs.shape[0]
    rs = gs = None
    if spec.mode in (P2_INT, P2_E2M1, FP8_ROW):
        q, r = fmt.to_fp8_operand(qt)
        rs = r.reshape(m)
    elif spec.mode == INT8_ROW:
        q, rs = qt.codes, qt.scales.float().reshape(m)
    elif spec.mode == INT4_GROUP:
        q = qt.codes.to(torch.float16).to(torch.float8_e4m3fn)
        gs = qt.scales.float().t().contiguous()
    elif spec.mode == E2M1_E4M3:
        g = spec.group
        q = (e2m1_decode(qt.codes).reshape(m, kp // g, g) * qt.scales.float().unsqueeze(-1)).reshape(m, kp)
        q = q.to(torch.bfloat16)
        if qt.row_scale is not None:
            rs = qt.row_scale.float().reshape(-1)
    else:  # MX: dequantize is exact (power-of-two scales, no outer scale)
        q = fmt.dequantize(qt).to(torch.bfloat16)
    lr = None
    if lr_down is not None:
        rank = next_pow2(lr_down.shape[0], 16)
        lr = xs @ lr_down.float().t()
        lr = torch.nn.functional.pad(lr, (0, rank - lr.shape[1])).contiguous()
    return ActOperand(q.contiguous(), rs, gs, lr)
