"""Few-row layers of the Hopper-native formats: a quantized GEMV on the packed 4-bit weight.

    y (M, N) = Q(X^) (M, Kp) @ W (N, Kp)^T * r_x[m] * r_w[n]  +  (X @ D) (M, R) @ U (N, R)^T  +  bias[n]

for int4p2 / fp4p2 activations x int4p2 / fp4p2 weights and M <= ``GemvConfig.max_m`` rows (FLUX's adaLN
modulation runs at M = batch size). There the GEMM path is bound by the weight bytes and by launches: it reads
the FP8 operand (1 byte per parameter; in memory mode it first writes it) after act_quant's two launches. This
path reads the packed 4-bit codes and their exponents (~0.52 bytes per parameter) in both modes, in two launches:

  * ``_few_rows_act_kernel``: act_quant for few rows in one launch; each of a few programs takes the whole rows'
    maxima (a few KB from L2), quantizes its slice of K (``p2_values``: act_quant's codes, bit for bit; stored as
    fp32 values, each group's even columns before its odd ones) and computes its slice's part of the folded
    down-projection X @ D;
  * ``_gemv_kernel``, one program per ``BN`` output channels: walks K in chunks of ``BK``, decodes the weight's
    nibbles times their group's 2^e without a multiply (``_weight_values``), accumulates on CUDA cores in fp32
    (each row's products reduced every step), then applies the row and channel scales,
    sums the down-projection's partials in a fixed order, adds the up-projection and the bias, and rounds once.

Numerics: the same quantized operands as the GEMM path; the sums are plain fp32 (no FP8 tensor-core
accumulation), so the result is the fp32 twin's up to summation order. ``gemv_torch`` is that twin
(``act_quant_torch`` + ``expand_weight_torch`` + ``scaled_gemm_torch``), same signature.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import amax as _amax, ceil_div, check_device, interpreting, next_pow2, pow2, total as _total
from .act_spec import P2_E2M1, P2_INT, act_spec
from .act_tiles import _down_dot, _load_smoothed, _row_scale, _scale_consts, p2_values
from .weights import nibble_value


@dataclass(frozen=True)
class GemvConfig:
    """``max_m``: the most rows this path takes (``linear_forward``). The GEMV: ``BN`` output channels per program
    at one row (divided by the rows, rounded up to a power of two, down to 8), ``BK`` columns per step (raised to a
    multiple of the group), ``warps``. The activation launch: ``act_programs`` slices of K (few: every GEMV program
    sums their partial down-projections), ``act_BK`` columns per step, ``act_row_elems`` elements per step of its
    row-maxima walk, ``act_warps``."""

    max_m: int = 1
    BN: int = 16
    BK: int = 512
    warps: int = 4
    act_programs: int = 24
    act_BK: int = 128
    act_row_elems: int = 4096
    act_warps: int = 4


#: H100 sweep (benchmarks/step_shapes.py --only adaLN --few-rows 2,4; results/step-shapes-gemv.h100.2026-11-22.*):
#: at one row, 16 x 512 tiles: 3072 x 18432 0.027 ms (act_quant + GEMM 0.039, bf16 0.044), 3072 x 9216 0.018 ms
#: (0.028, bf16 0.023); at 2 rows already slower than act_quant + GEMM (0.042 vs 0.039), at 4 rows 2x slower.
DEFAULT_GEMV = GemvConfig()


def gemv_supported(act_format, weight_format) -> bool:
    """True if this pair of formats has the GEMV kernel: int4p2 / fp4p2 on both sides, one group size."""
    a = act_spec(act_format)
    if a is None or a.mode not in (P2_INT, P2_E2M1) or getattr(weight_format, "name", None) not in ("int4p2", "fp4p2"):
        return False
    return weight_format.group_size == a.group  # one group geometry: the weight's exponents per activation group


@triton.jit
def _few_rows_act_kernel(x_ptr, rsmooth_ptr, d_ptr, q_ptr, rs_ptr, plr_ptr,
                         M, K, Kp, stride_xm, stride_qm, cols_per_prog,
                         A_MODE: tl.constexpr, A_G: tl.constexpr, QMAX: tl.constexpr, EMIN: tl.constexpr,
                         MANT_T: tl.constexpr, HAS_SMOOTH: tl.constexpr, RANK: tl.constexpr, XSPLIT: tl.constexpr,
                         UPCAST: tl.constexpr, QROWS: tl.constexpr, BM: tl.constexpr,
                         BK: tl.constexpr, ABK: tl.constexpr):
    """act_quant for a few rows in one launch: every program takes the whole rows' maxima (a few KB from L2),
    then quantizes its slice of K (act_quant's codes, as fp32 values in the GEMV's order) and adds up its slice's part of the
    down-projection X @ D (partials (programs, M, R), summed by the GEMV in a fixed order)."""
    pid = tl.program_id(0)
    rows = tl.arange(0, BM)
    rmask = rows < M
    xrow = rows.to(tl.int64) * stride_xm
    # the rows' maxima: few wide steps (a latency-bound walk otherwise), one reduction at the end
    arows = tl.arange(0, QROWS)
    amask = arows < M
    big = tl.full((QROWS, ABK), 0, tl.float32)
    for k0 in range(0, Kp, ABK):
        cols = k0 + tl.arange(0, ABK)
        xs = _load_smoothed(x_ptr, rsmooth_ptr, arows.to(tl.int64)[:, None] * stride_xm, cols[None, :], amask[:, None],
                            K, Kp, HAS_SMOOTH)
        big = tl.maximum(big, tl.abs(xs))
    rsc, div = _row_scale(_amax(big, 1), A_MODE, QMAX, 0)  # (QROWS,)
    if pid == 0:
        tl.store(rs_ptr + arows, rsc, mask=amask)
    NG: tl.constexpr = BK // A_G
    if RANK > 0:
        acc = tl.full((BM, RANK), 0, tl.float32)
    k_lo = pid * cols_per_prog
    for k0 in range(k_lo, tl.minimum(k_lo + cols_per_prog, Kp), BK):
        cols = k0 + tl.arange(0, NG)[None, :, None] * A_G + tl.arange(0, A_G)[None, None, :]  # (1, NG, A_G)
        xs = _load_smoothed(x_ptr, rsmooth_ptr, arows.to(tl.int64)[:, None, None] * stride_xm, cols,
                            amask[:, None, None], K, Kp, HAS_SMOOTH)
        q = p2_values(xs, div, A_MODE, EMIN, MANT_T)  # (QROWS, NG, A_G) code * 2^e, fp32
        # stored per group as [even columns | odd columns], the order the GEMV pairs them with the weight's nibbles
        c = tl.arange(0, A_G)[None, None, :]
        pos = cols - c + (c % 2) * (A_G // 2) + c // 2
        tl.store(q_ptr + arows[:, None, None].to(tl.int64) * stride_qm + pos, q, mask=cols < Kp)  # rows >= M: zeros
        if RANK > 0:
            c2 = k0 + tl.arange(0, BK)
            x = tl.load(x_ptr + xrow[:, None] + c2[None, :], mask=rmask[:, None] & (c2[None, :] < K), other=0.0)
            acc = _down_dot(x, d_ptr, c2, Kp, acc, RANK, XSPLIT, UPCAST)
    if RANK > 0:
        offs_r = tl.arange(0, RANK)
        tl.store(plr_ptr + (pid * M + rows[:, None]).to(tl.int64) * RANK + offs_r[None, :], acc,
                 mask=rmask[:, None])


@triton.jit
def _weight_values(byte, e, W_E2M1: tl.constexpr):
    """Packed bytes (..., HG) int32 and their group's exponent e (..., 1) -> (low, high) nibble values * 2^e, fp32.
    int4 without a multiply: the fp32 with exponent 23 + e and low bits (code ^ 8) is 2^(23+e) + (code ^ 8) 2^e;
    minus 2^(23+e) + 8 * 2^e it is code * 2^e, exactly."""
    if W_E2M1:
        sc = pow2(e)
        lo = nibble_value(byte & 0xF, True) * sc
        hi = nibble_value((byte >> 4) & 0xF, True) * sc
    else:
        magic = ((150 + e) << 23) | 8
        off = (((150 + e) << 23).to(tl.float32, bitcast=True)) * (1.0 + 8.0 / 8388608.0)  # 2^(23+e) + 8 * 2^e
        lo = ((byte & 0xF) ^ magic).to(tl.float32, bitcast=True) - off
        hi = (((byte >> 4) & 0xF) ^ magic).to(tl.float32, bitcast=True) - off
    return lo, hi


@triton.jit
def _gemv_kernel(q_ptr, rs_ptr, plr_ptr, wp_ptr, we_ptr, wr_ptr, up_ptr, bias_ptr, out_ptr,
                 M, N, Kp, KH, SPLIT, stride_qm, stride_wp, stride_we, stride_om,
                 W_E2M1: tl.constexpr, G: tl.constexpr, RANK: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """One program per BN output channels: fp32 sums of the activation operand times the decoded weight, then
    the row and channel scales, the up-projection and the bias. Each row's products are reduced every step (one
    fp32 sum per lane, reduced after the walk, measured no faster)."""
    pid = tl.program_id(0)
    rows = tl.arange(0, BM)
    rmask = rows < M
    chans = pid * BN + tl.arange(0, BN)
    cmask = chans < N
    WGN: tl.constexpr = BK // G
    HG: tl.constexpr = G // 2
    grp = tl.arange(0, WGN)
    hj = tl.arange(0, HG)
    wrow = chans.to(tl.int64)
    acc = tl.full((BM, BN), 0, tl.float32)
    # KH = Kp / 2 bytes per weight row, a separate argument: its divisibility by 16 lets the loads vectorize
    for kh0 in range(0, KH, BK // 2):
        bcols = kh0 + tl.arange(0, BK // 2)  # byte columns
        byte = tl.load(wp_ptr + wrow[:, None] * stride_wp + bcols[None, :], mask=cmask[:, None] & (bcols[None, :] < KH),
                       other=0)
        byte = tl.reshape(byte, (BN, WGN, HG)).to(tl.int32)  # (BN, WGN, HG): group, then byte in the group
        gcols = kh0 // HG + grp
        e = tl.load(we_ptr + wrow[:, None] * stride_we + gcols[None, :], mask=cmask[:, None] & (gcols[None, :] < Kp // G),
                    other=0).to(tl.int32)  # (BN, WGN)
        w_lo, w_hi = _weight_values(byte, e[:, :, None], W_E2M1)  # (BN, WGN, HG): columns 2j, 2j + 1
        qcols = 2 * kh0 + grp[:, None] * G + hj[None, :]  # (WGN, HG): each group's even columns, then its odd ones
        qm = qcols < Kp
        for r in tl.static_range(BM):  # the rows one by one (rows M..BM of q are zeros): (BN, WGN, HG) tiles
            qp = q_ptr + r * stride_qm + qcols
            x_even = tl.load(qp, mask=qm, other=0.0)  # (WGN, HG) fp32
            x_odd = tl.load(qp + HG, mask=qm, other=0.0)
            prod = x_even[None, :, :] * w_lo + x_odd[None, :, :] * w_hi
            part = _total(_total(prod, 2), 1)  # (BN,)
            acc = tl.where(rows[:, None] == r, acc + part[None, :], acc)
    y = acc
    y = y * tl.load(rs_ptr + rows, mask=rmask, other=0.0)[:, None]
    y = y * tl.load(wr_ptr + chans, mask=cmask, other=0.0)[None, :]
    if RANK > 0:
        offs_r = tl.arange(0, RANK)
        lr = tl.full((BM, RANK), 0, tl.float32)
        for s in range(SPLIT):  # the partials in a fixed order (deterministic)
            lr += tl.load(plr_ptr + (s * M + rows[:, None]).to(tl.int64) * RANK + offs_r[None, :],
                          mask=rmask[:, None], other=0.0)
        up = tl.load(up_ptr + wrow[:, None] * RANK + offs_r[None, :], mask=cmask[:, None], other=0.0)  # (BN, R)
        up = up.to(tl.float32)  # (a 16-bit up-projection: exact in fp32)
        y += _total(lr[:, None, :] * up[None, :, :], 2)
    if HAS_BIAS:
        y += tl.load(bias_ptr + chans, mask=cmask, other=0.0)[None, :]
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_om + chans[None, :], y.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


def _up_operand(up: Tensor) -> Tensor:
    """The up-projection as the kernel reads it: fp32, bf16 or fp16 as given (converted to fp32 in registers)."""
    return (up if up.dtype in (torch.float32, torch.bfloat16, torch.float16) else up.float()).contiguous()


def _check(x, act_format, weight_format, kp, packed, scales, row_scale, down_folded, up, bias):
    if not gemv_supported(act_format, weight_format):
        raise NotImplementedError(f"gemv: no kernel for activations {act_format!r} x weights {weight_format!r} "
                                  f"(int4p2 / fp4p2 on both sides)")
    if x.dim() != 2 or not x.is_floating_point() or x.shape[1] > kp:
        raise ValueError(f"gemv: x must be a 2-D float tensor (M, K <= {kp}), got {tuple(x.shape)} {x.dtype}")
    n = packed.shape[0]
    if packed.dtype != torch.uint8 or packed.shape != (n, kp // 2):
        raise ValueError(f"gemv: packed weight must be uint8 (N, {kp // 2}), got {tuple(packed.shape)} {packed.dtype}")
    if scales.shape != (n, kp // weight_format.group_size):
        raise ValueError(f"gemv: weight exponents must be ({n}, {kp // weight_format.group_size}), "
                         f"got {tuple(scales.shape)}")
    if row_scale is None or row_scale.numel() != n:
        raise ValueError(f"gemv: the weight's row scale must have {n} elements")
    if (down_folded is None) != (up is None):
        raise ValueError("gemv: give both down_folded and up (the low-rank branch) or neither")
    if up is not None and (up.shape[0] != n or down_folded.shape[1:] != (kp, up.shape[1])):
        raise ValueError(f"gemv: low-rank factors must be down_folded (2, {kp}, R) and up ({n}, R), got "
                         f"{tuple(down_folded.shape)} and {tuple(up.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"gemv: bias must be ({n},), got {tuple(bias.shape)}")
    return n


def gemv(x: Tensor, act_format, weight_format, padded_in: int, packed: Tensor, scales: Tensor, row_scale: Tensor,
         smooth_recip: Optional[Tensor] = None, down_folded: Optional[Tensor] = None, up: Optional[Tensor] = None,
         bias: Optional[Tensor] = None, out_dtype: Optional[torch.dtype] = None,
         config: Optional[GemvConfig] = None) -> Tensor:
    """The quantized layer's output for few rows: (M, K) -> (M, N) in ``out_dtype`` (default x's dtype).

    packed (N, Kp/2) uint8, scales (N, Kp/g) int8 exponents, row_scale (N,) fp32: the layer's weight buffers;
    smooth_recip (Kp,) fp32; down_folded (2, Kp, R) bf16 (``fold_down``) and up (N, R) fp32, bf16 or fp16 (R a
    power of two >= 16); bias (N,) fp32 (or the layer's dtype)."""
    cfg = config or DEFAULT_GEMV
    kp = padded_in
    n = _check(x, act_format, weight_format, kp, packed, scales, row_scale, down_folded, up, bias)
    check_device(x, packed, scales, row_scale, smooth_recip, down_folded, up, bias)
    if x.stride(1) != 1:
        x = x.contiguous()
    m, k = x.shape
    spec = act_spec(act_format)
    g = spec.group
    out = torch.empty((m, n), device=x.device, dtype=out_dtype or x.dtype)
    if m == 0 or n == 0:
        return out
    rank = 0 if up is None else up.shape[1]
    qrows = next_pow2(m)
    q = torch.empty((qrows, kp), device=x.device, dtype=torch.float32)  # per group: even columns, then odd
    rs = torch.empty((m,), device=x.device, dtype=torch.float32)
    bk_act = max(cfg.act_BK, g)
    progs = max(1, min(cfg.act_programs, ceil_div(kp, bk_act)))
    cols_per_prog = ceil_div(ceil_div(kp, bk_act), progs) * bk_act
    progs = ceil_div(kp, cols_per_prog)
    plr = torch.empty((progs, m, rank), device=x.device, dtype=torch.float32) if rank else None
    dummy = out
    _few_rows_act_kernel[(progs,)](
        x, dummy if smooth_recip is None else smooth_recip, dummy if down_folded is None else down_folded.contiguous(),
        q, rs, dummy if plr is None else plr, m, k, kp, x.stride(0), q.stride(0), cols_per_prog,
        A_MODE=spec.mode, A_G=g, QMAX=float(spec.qmax), EMIN=spec.emin, MANT_T=_scale_consts(spec)["MANT_T"],
        HAS_SMOOTH=smooth_recip is not None, RANK=rank, XSPLIT=x.dtype != torch.bfloat16, UPCAST=interpreting(),
        QROWS=qrows, BM=max(16, qrows), BK=bk_act,
        ABK=min(next_pow2(kp), max(bk_act, cfg.act_row_elems // qrows)), num_warps=cfg.act_warps)
    bn = max(8, cfg.BN // next_pow2(m))  # the work per step stays about the same
    _gemv_kernel[(ceil_div(n, bn),)](
        q, rs, dummy if plr is None else plr, packed, scales, row_scale.float().reshape(-1).contiguous(),
        dummy if up is None else _up_operand(up), dummy if bias is None else bias.float().contiguous(), out,
        m, n, kp, kp // 2, progs, q.stride(0), packed.stride(0), scales.stride(0), out.stride(0),
        W_E2M1=weight_format.name == "fp4p2", G=g, RANK=rank, HAS_BIAS=bias is not None,
        BM=next_pow2(m), BN=bn, BK=max(cfg.BK, g), num_warps=cfg.warps)
    return out


def gemv_torch(x: Tensor, act_format, weight_format, padded_in: int, packed: Tensor, scales: Tensor,
               row_scale: Tensor, smooth_recip: Optional[Tensor] = None, down_folded: Optional[Tensor] = None,
               up: Optional[Tensor] = None, bias: Optional[Tensor] = None, out_dtype: Optional[torch.dtype] = None,
               config: Optional[GemvConfig] = None) -> Tensor:
    """Plain-torch twin of ``gemv``: the references of act_quant, the weight operand and the scaled GEMM."""
    from .act_quant import act_quant_torch
    from .gemm import scaled_gemm_torch
    from .weights import expand_weight_torch

    kp = padded_in
    _check(x, act_format, weight_format, kp, packed, scales, row_scale, down_folded, up, bias)
    k = x.shape[1]
    xs = x.float() if smooth_recip is None else x.float() * smooth_recip[:k].float()  # the kernels' X^
    a = act_quant_torch(xs, act_format, padded_in=kp)
    w = expand_weight_torch(packed, scales, row_scale, weight_format, kp)
    lr = None
    if up is not None:  # the folded down-projection: X @ (hi + lo), as act_quant's stats kernel
        d = down_folded[:, :k].float()
        lr = x.float() @ d[0] + x.float() @ d[1]
    up = None if up is None else up.float()  # the GEMV sums the branch in fp32, whatever up's dtype
    return scaled_gemm_torch(a.q, w.w, a.row_scale, w.col_scale, lr, up, bias, out_dtype=out_dtype or x.dtype)
