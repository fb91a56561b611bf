"""QuaRTZ activation quantization for the GEMM: x -> the decoded 8-bit operand q~ and one fp32 scale per token.

For the per-token variant (``make_format("quartz", stage1="token", ...)``, names ``quartz_tok*``) every decoded
value q~ = sign * (c << FLAG) is exact in FP8 e4m3 and in int8 (see ``fourbit.formats.quartz``), so the
quantize kernel can hand the GEMM q~ directly and the product is a plain row/column-scaled FP8 (or int8) GEMM:

    y[m, n] = row_scale[m] * w_scale[n] * sum_k q~[m, k] * w8[n, k]   (+ the low-rank branch, + bias)

One program takes BM tokens and reads their rows twice: pass 1 finds max|x^| per row (and accumulates the
low-rank down-projection x^ @ lr_down^T when given), pass 2 quantizes group by group:
    x^ = pad(x) * (1 / smooth) (fp32, exactly as ``fourbit.kernels.reference``)
    s  = max|x^_row| / 127;  q = clamp(rint(x^ / s), -127, 127)      (unsigned: / 255, clamp to [0, 255])
    FLAG per G_s group from max|q|;  c = |q| >> FLAG (trunc) or min(rint(|x^ / s| / 2^FLAG), 7) (round)
    q~ = sign(q) * c * 2^FLAG  -> stored as float8_e4m3fn (or int8; uint8 for the unsigned variant)
Outputs are bit-for-bit those of the format's reference ``quantize`` (``quartz_quant_torch`` is the twin).
Only exact casts are used, so the kernel is also bit-exact under Triton's CPU interpreter.

Signature (what a linear kernel calls; same shape of call as ``act_quant.act_quant``):
    quartz_quant(x (M, K) float, fmt, smooth=None (Kp,) fp32, lr_down=None (R, Kp), padded_in=None (Kp),
                 out="fp8" | "int8", config=None) -> QuaRTZOperand(q (M, Kp), row_scale (M,) fp32, lr (M, R') | None)
R' is R padded to a power of two >= 16 (extra columns are zero).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .reference import smooth_reciprocal
from ._common import amax as _amax, check_device, next_pow2, rint_small


@dataclass
class QuaRTZOperand:
    """q (M, Kp) e4m3 / int8 / uint8 decoded operand; row_scale (M,) fp32; lr (M, R') fp32 or None."""

    q: Tensor
    row_scale: Tensor
    lr: Optional[Tensor] = None
    group_scale: Optional[Tensor] = None  # always None: the token variant has no group scales


@dataclass(frozen=True)
class QuaRTZQuantConfig:
    """BM rows per program, BK columns per step (a multiple of G_s).

    Chosen by a sweep on an H100 (M=4608, K=3072 bf16, quartz_tok; BM 4-32, BK 128-1024, 2-8 warps):
    BM=4, BK=1024, 4 warps took 42 us (a bf16 copy of x: 25 us; BM=32, BK=256, 8 warps: 110 us).
    With the low-rank down-projection (a tl.dot) BM is raised to 16, the smallest dot tile, and BK capped
    at 256 (BK=1024 with the dot needs 268 KB of shared memory, over the H100's 227 KB).
    """

    BM: int = 4
    BK: int = 1024
    num_warps: int = 4


DEFAULT_CONFIG = QuaRTZQuantConfig()


@triton.jit
def _load_smoothed(x_ptr, rsmooth_ptr, row_off, cols, row_mask, K, Kp, HAS_SMOOTH: tl.constexpr):
    """fp32 x^ = x * (1 / smooth) with zeros past K (the padding); rsmooth_ptr: ``smooth_reciprocal(smooth)``."""
    x = tl.load(x_ptr + row_off + cols, mask=row_mask & (cols < K), other=0.0).to(tl.float32)
    if HAS_SMOOTH:
        x = x * tl.load(rsmooth_ptr + cols, mask=cols < Kp, other=1.0)
    return x


@triton.jit
def _quartz_quant_kernel(
    x_ptr, smooth_ptr, down_ptr, q_ptr, rs_ptr, lr_ptr,
    M, K, Kp, stride_xm, stride_qm, stride_lr, stride_dn,
    G: tl.constexpr, NG: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr, MAG: tl.constexpr,
    SIGNED: tl.constexpr,
    ROUND: tl.constexpr, OUT_FP8: tl.constexpr, HAS_SMOOTH: tl.constexpr, RANK: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr,
):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = rows < M
    xrow = rows.to(tl.int64) * stride_xm
    if RANK > 0:
        acc_l = tl.full((BM, RANK), 0, tl.float32)
        offs_r = tl.arange(0, RANK)

    # ---- pass 1: the row maximum (and the low-rank down-projection) ----
    amax = tl.full((BM,), 0, tl.float32)
    for k0 in range(0, Kp, BK):
        cols = k0 + tl.arange(0, BK)
        xs = _load_smoothed(x_ptr, smooth_ptr, xrow[:, None], cols[None, :], rmask[:, None], K, Kp, HAS_SMOOTH)
        amax = tl.maximum(amax, _amax(tl.abs(xs), 1))
        if RANK > 0:
            d = tl.load(down_ptr + offs_r[None, :] * stride_dn + cols[:, None], mask=cols[:, None] < Kp, other=0.0)
            acc_l = tl.dot(xs, d.to(tl.float32), acc_l, input_precision="tf32")
    s = tl.math.div_rn(amax, QMAX)  # (BM,) the stage-1 scale
    tl.store(rs_ptr + rows, s, mask=rmask)
    s_safe = tl.where(s != 0, s, 1.0)

    # ---- pass 2: stage 1 and leading-zero suppression, NG groups of G at a time ----
    grp = tl.arange(0, NG)
    el = tl.arange(0, G)
    for k0 in range(0, Kp, BK):
        cols = k0 + grp[None, :, None] * G + el[None, None, :]  # (1, NG, G)
        xs = _load_smoothed(x_ptr, smooth_ptr, xrow[:, None, None], cols, rmask[:, None, None], K, Kp,
                            HAS_SMOOTH)  # (BM, NG, G)
        if not SIGNED:
            xs = tl.maximum(xs, 0.0)  # the unsigned variant clips negative inputs
        y = tl.math.div_rn(xs, s_safe[:, None, None])
        q = tl.minimum(tl.maximum(rint_small(y), QMIN), QMAX)  # |y| <= 255: exact
        m = tl.abs(q)  # integer-valued fp32
        big = _amax(m, 2)  # (BM, NG): the highest set bit of the OR is that of the max
        flag = ((big >= (1 << MAG)).to(tl.int32) + (big >= (2 << MAG)).to(tl.int32)
                + (big >= (4 << MAG)).to(tl.int32) + (big >= (8 << MAG)).to(tl.int32))
        inv = tl.where(flag == 0, 1.0, tl.where(flag == 1, 0.5, tl.where(flag == 2, 0.25,
                       tl.where(flag == 3, 0.125, 0.0625))))[:, :, None]  # 2^-FLAG, exact
        if ROUND:
            c = tl.minimum(rint_small(tl.abs(y) * inv), (1 << MAG) - 1.0)
        else:
            c = tl.floor(m * inv)
        mag = c.to(tl.int32) << flag[:, :, None]  # integer: no -0 below
        qt = tl.where(q < 0, -mag, mag)
        if OUT_FP8:
            out = qt.to(tl.float32).to(tl.float8e4nv)  # exact: <= 4 significant bits, |q~| <= 240
        else:
            out = qt.to(tl.int8) if SIGNED else qt.to(tl.uint8)
        tl.store(q_ptr + rows[:, None, None].to(tl.int64) * stride_qm + cols, out,
                 mask=rmask[:, None, None] & (cols < Kp))
    if RANK > 0:
        tl.store(lr_ptr + rows[:, None] * stride_lr + offs_r[None, :], acc_l, mask=rmask[:, None])


def _check(x, fmt, smooth, lr_down, padded_in, out):
    from ..formats import QuaRTZ

    if not isinstance(fmt, QuaRTZ) or fmt.stage1 != "token":
        raise ValueError(f"quartz_quant: needs a per-token QuaRTZ format (quartz_tok*), got {fmt!r}")
    if out not in ("fp8", "int8"):
        raise ValueError(f"quartz_quant: out must be 'fp8' or 'int8', got {out!r}")
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"quartz_quant: x must be a 2-D float tensor (M, K), got {tuple(x.shape)} {x.dtype}")
    kp = padded_in if padded_in is not None else x.shape[1]
    if kp < x.shape[1] or kp % fmt.lzs_group:
        raise ValueError(f"quartz_quant: padded_in={kp} must be >= K={x.shape[1]} and a multiple of "
                         f"{fmt.lzs_group}")
    if smooth is not None and smooth.shape != (kp,):
        raise ValueError(f"quartz_quant: smooth must be ({kp},), got {tuple(smooth.shape)}")
    if lr_down is not None and (lr_down.dim() != 2 or lr_down.shape[1] != kp):
        raise ValueError(f"quartz_quant: lr_down must be (R, {kp}), got {tuple(lr_down.shape)}")
    return kp


def _out_dtype(fmt, out: str) -> torch.dtype:
    if out == "fp8":
        return torch.float8_e4m3fn
    return torch.int8 if fmt.signed else torch.uint8


def quartz_quant(x: Tensor, fmt, smooth: Optional[Tensor] = None, lr_down: Optional[Tensor] = None,
                 padded_in: Optional[int] = None, out: str = "fp8",
                 config: Optional[QuaRTZQuantConfig] = None) -> QuaRTZOperand:
    """Quantize activations x (M, K) with a per-token QuaRTZ format into the GEMM operand (see module docstring)."""
    kp = _check(x, fmt, smooth, lr_down, padded_in, out)
    check_device(x, smooth, lr_down)
    if x.stride(1) != 1:
        x = x.contiguous()
    cfg = config or DEFAULT_CONFIG
    g = fmt.lzs_group
    bk = max(g, cfg.BK // g * g)
    bm = cfg.BM
    if lr_down is not None:  # the down-projection's tl.dot: >= 16 rows, and a K tile that fits shared memory
        bm, bk = max(bm, 16), min(bk, max(g, 256))
    m, k = x.shape
    dev = x.device
    q = torch.empty((m, kp), device=dev, dtype=_out_dtype(fmt, out))
    rs = torch.empty((m,), device=dev, dtype=torch.float32)
    lr, rank = None, 0
    if lr_down is not None:
        rank = next_pow2(lr_down.shape[0], 16)
        lr = torch.empty((m, rank), device=dev, dtype=torch.float32)
        if lr_down.shape[0] != rank:
            lr_down = torch.nn.functional.pad(lr_down, (0, 0, 0, rank - lr_down.shape[0]))
        lr_down = lr_down.contiguous()
    if smooth is not None:
        smooth = smooth_reciprocal(smooth).contiguous()  # the kernel multiplies by 1 / smooth
    dummy = rs
    _quartz_quant_kernel[(triton.cdiv(m, bm),)](
        x, dummy if smooth is None else smooth, dummy if lr_down is None else lr_down, q, rs,
        dummy if lr is None else lr,
        m, k, kp, x.stride(0), q.stride(0), 0 if lr is None else lr.stride(0),
        0 if lr_down is None else lr_down.stride(0),
        G=g, NG=bk // g, QMIN=-float(fmt.qmax) if fmt.signed else 0.0, QMAX=float(fmt.qmax), MAG=fmt.mag_bits,
        SIGNED=fmt.signed, ROUND=fmt.mode == "round",
        OUT_FP8=out == "fp8", HAS_SMOOTH=smooth is not None, RANK=rank, BM=bm, BK=bk,
        num_warps=cfg.num_warps,
    )
    return QuaRTZOperand(q, rs, lr)


def quartz_quant_torch(x: Tensor, fmt, smooth: Optional[Tensor] = None, lr_down: Optional[Tensor] = None,
                       padded_in: Optional[int] = None, out: str = "fp8",
                       config: Optional[QuaRTZQuantConfig] = None) -> QuaRTZOperand:
    """The same outputs from the format's reference ``quantize`` (plain torch, any device)."""
    kp = _check(x, fmt, smooth, lr_down, padded_in, out)
    xs = x.float()
    if kp != xs.shape[1]:
        xs = torch.nn.functional.pad(xs, (0, kp - xs.shape[1]))
    if smooth is not None:
        xs = xs * smooth_reciprocal(smooth)
    qt = fmt.quantize(xs)
    q = fmt.fp8_values(qt).to(torch.float8_e4m3fn) if out == "fp8" else fmt.decode_int8(qt)
    lr = None
    if lr_down is not None:
        rank = next_pow2(lr_down.shape[0], 16)
        lr = torch.nn.functional.pad(xs @ lr_down.float().t(), (0, rank - lr_down.shape[0]))
    return QuaRTZOperand(q, qt.row_scale.reshape(-1), lr)
