"""The row/column-scaled FP8 GEMM through ``torch._scaled_mm`` (cuBLAS / CUTLASS row-wise), the low-rank branch
folded into K: the ``gemm="cublas"`` backend of the 'scaled' plan (opt-in, ``set_gemm_backend``).

    y = ([A | A_lr] @ [B | B_up]^T) * a_scale[m] * b_scale[n] + bias[n]

    A_lr (M, 3 Rp) = [hi(L') | lo(L') | hi(L')],   L'[m, j] = L[m, j] / a_scale[m] * 2^-p_j
    B_up (N, 3 Rp) = [hi(U') | hi(U') | lo(U')],   U'[n, j] = U[n, j] / b_scale[n] * 2^p_j

so the extra K columns contribute a_scale * b_scale * (hi hi + lo hi + hi lo) = L U^T up to the hi + lo split
(e4m3 hi = RN(v), lo = RN(v - hi): ~2^-8 relative per factor, or 2^-10 absolute below e4m3's normal range) and the
dropped lo lo product (~2^-16 relative).
L is act_quant's down-projection (fp32), U the up-projection. Why: on Hopper at the layer sizes of PixArt, SD3,
SANA and the SDXL UNet (K <= 6144) cuBLAS's FP8 GEMM is 1.35-1.55x bf16 where fourbit's Triton GEMM is ~1.0x
(docs/kernels.md), and an output-sized second GEMM for the branch would cost more than it saves. Used from
``CUBLAS_MIN_ROWS`` rows: below, the fold's fixed costs made layers 1.1-1.6x slower than Triton (H200, 600-666 rows).

Range: p_j is chosen once per layer so that |L'| <= 448 for every input: |L[m, j]| <= max|X^_m| ||d_j||_1 and
max|X^_m| = qmax * a_scale[m] for the row formats (``act_spec.qmax``: 7 int4p2, 6 fp4p2, 448 fp8), so
|L'| <= qmax ||d_j||_1 2^-p_j. A layer whose U' would then exceed 448 is not folded (``fold_weight`` returns None;
it keeps the Triton GEMM). A weight row with scale 0 has zero codes; its column scale becomes 1 (the main product
stays 0, the branch does not vanish).

``fold_lr`` is a small Triton kernel writing A_lr into the columns act_quant left free; ``fold_lr_torch`` and
``cublas_gemm_torch`` are the plain-torch twins (same signatures).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..formats.floats import e4m3_round
from ._common import ceil_div, e4m3_rn

E4M3_MAX = 448.0
FOLD_PARTS = 3  # extra K columns per rank column
CUBLAS_MIN_ROWS = 2048  # fewer rows keep the Triton GEMM (linear.jsonl run 2026-12-04b: slower at 600-666 rows)
_BOUND_MARGIN = 1.01  # headroom over qmax ||d_j||_1: L from the bf16 hi + lo folded factor, a_scale's rounding

BACKENDS = ("triton", "cublas")
_BACKEND = {"name": "triton", "min_rows": CUBLAS_MIN_ROWS}


def set_gemm_backend(name: str, min_rows: Optional[int] = None) -> None:
    """'triton' (default: fourbit's GEMM, branch and activation in its epilogue) or 'cublas' (``torch._scaled_mm``
    with the branch folded into K, for FP8-operand layers without an epilogue activation, from ``min_rows`` rows,
    default ``CUBLAS_MIN_ROWS``; other calls keep Triton). Read at each call; a layer's folded weight is built with
    its operand under 'cublas'."""
    if name not in BACKENDS:
        raise ValueError(f"fourbit: unknown GEMM backend {name!r}; choose one of {BACKENDS}")
    min_rows = CUBLAS_MIN_ROWS if min_rows is None else min_rows
    if min_rows < 0:
        raise ValueError(f"fourbit: min_rows must be >= 0, got {min_rows}")
    _BACKEND.update(name=name, min_rows=int(min_rows))


def gemm_backend(layer_choice: Optional[str] = None) -> str:
    """The backend a call takes: the layer's own (``layer_choice``: the "triton-cublas" kernel passes "cublas"), else
    the process-wide one (``set_gemm_backend``)."""
    if layer_choice is not None and layer_choice not in BACKENDS:
        raise ValueError(f"fourbit: unknown GEMM backend {layer_choice!r}; choose one of {BACKENDS}")
    return layer_choice or _BACKEND["name"]


def cublas_min_rows() -> int:
    return _BACKEND["min_rows"]


@dataclass
class FoldedWeight:
    """The weight side of the cuBLAS GEMM (see the module docstring)."""

    w_ext: Tensor  # (N, Kp + 3 Rp) float8_e4m3fn, contiguous: [B | B_up]; (N, Kp) without a branch
    col_scale: Tensor  # (N,) fp32: b_scale, zero entries replaced by 1
    lr_mult: Optional[Tensor]  # (Rp,) fp32, 2^-p_j; None without a branch
    bias16: Optional[Tensor] = None  # (N,) the layer's bias in its 16-bit dtype: read as is, no cast per call


def lr_bound_mult(down_l1: Tensor, qmax: float) -> Tensor:
    """2^-p_j (Rp,) fp32: the largest power of two with qmax ||d_j||_1 2^-p_j * margin <= 448 (1 where d_j = 0)."""
    bound = down_l1.double() * qmax * _BOUND_MARGIN
    p = torch.ceil(torch.log2(torch.where(bound > 0, bound / E4M3_MAX, torch.ones_like(bound))))
    return torch.pow(2.0, -p).float()


def _split_e4m3(v: Tensor) -> tuple[Tensor, Tensor]:
    """v (fp32, |v| <= 448) -> (hi, lo) e4m3 values as fp32: hi = RN(v), lo = RN(v - hi) (``floats.e4m3_round``)."""
    hi = e4m3_round(v)
    return hi, e4m3_round(v - hi)


def fold_weight(w: Tensor, col_scale: Tensor, up: Optional[Tensor], down_l1: Optional[Tensor],
                qmax: float) -> Optional[FoldedWeight]:
    """w (N, Kp) float8_e4m3fn operand, col_scale (N,) or (1,) fp32, up (N, Rp) fp32 and down_l1 (Rp,) = the L1
    norms of the down-projection's rows (as applied to X^), or both None -> FoldedWeight, or None where U' would
    leave e4m3's range (the layer keeps the Triton GEMM)."""
    n, kp = w.shape
    cs = col_scale.float().reshape(-1).expand(n)
    cs = torch.where(cs != 0, cs, torch.ones_like(cs)).contiguous()
    if up is None:
        return FoldedWeight(w.contiguous(), cs, None)
    rp = up.shape[1]
    mult = lr_bound_mult(down_l1.to(up.device), qmax)  # (Rp,)
    u = up.float() / cs[:, None] / mult[None, :]  # (N, Rp): U / b_scale * 2^p (exact power-of-two scaling)
    if not bool(torch.isfinite(u).all()) or float(u.abs().max()) > E4M3_MAX:
        return None
    hi, lo = _split_e4m3(u)
    w_ext = torch.empty((n, kp + FOLD_PARTS * rp), dtype=torch.float8_e4m3fn, device=w.device)
    w_ext[:, :kp] = w
    w_ext[:, kp:] = torch.cat([hi, hi, lo], 1).to(torch.float8_e4m3fn)  # exact casts
    return FoldedWeight(w_ext, cs, mult)


@triton.jit
def _fold_lr_kernel(lr_ptr, rs_ptr, mult_ptr, out_ptr, M, stride_lr, stride_out,
                    R: tl.constexpr, BM: tl.constexpr):
    """out[m, 0:3R] = [hi | lo | hi] of L[m] / rs[m] * mult (e4m3 by integer rounding, as the twin)."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.arange(0, R)
    rmask = rows < M
    lr = tl.load(lr_ptr + rows[:, None].to(tl.int64) * stride_lr + cols[None, :], mask=rmask[:, None], other=0.0)
    rs = tl.load(rs_ptr + rows, mask=rmask, other=1.0)
    mult = tl.load(mult_ptr + cols)
    v = tl.where(rs[:, None] > 0, tl.math.div_rn(lr, tl.where(rs > 0, rs, 1.0)[:, None]), 0.0) * mult[None, :]
    hi = e4m3_rn(v)
    lo = e4m3_rn(v - hi)  # v - hi is exact
    base = out_ptr + rows[:, None].to(tl.int64) * stride_out + cols[None, :]
    m2 = rmask[:, None]
    tl.store(base, hi.to(tl.float8e4nv), mask=m2)
    tl.store(base + R, lo.to(tl.float8e4nv), mask=m2)
    tl.store(base + 2 * R, hi.to(tl.float8e4nv), mask=m2)


def _check_fold(lr: Tensor, a_scale: Tensor, lr_mult: Tensor, out: Tensor) -> None:
    m, r = lr.shape
    if a_scale.numel() != m or lr_mult.numel() != r or out.shape != (m, FOLD_PARTS * r):
        raise ValueError(f"fold_lr: lr (M, R) = {tuple(lr.shape)}, a_scale {tuple(a_scale.shape)}, lr_mult "
                         f"{tuple(lr_mult.shape)} and out {tuple(out.shape)} (M, {FOLD_PARTS}R) do not match")
    if out.dtype != torch.float8_e4m3fn or out.stride(1) != 1:
        raise ValueError("fold_lr: out must be float8_e4m3fn with contiguous rows")


def fold_lr(lr: Tensor, a_scale: Tensor, lr_mult: Tensor, out: Tensor) -> Tensor:
    """Write A_lr (module docstring) into ``out`` (M, 3R) float8_e4m3fn (a column block of act_quant's operand):
    lr (M, R) fp32, a_scale (M,) fp32, lr_mult (R,) fp32 (``FoldedWeight.lr_mult``). R: a power of two."""
    _check_fold(lr, a_scale, lr_mult, out)
    m, r = lr.shape
    bm = max(1, min(64, 4096 // r))
    _fold_lr_kernel[(ceil_div(m, bm),)](lr, a_scale, lr_mult, out, m, lr.stride(0), out.stride(0), R=r, BM=bm,
                                        num_warps=4)
    return out


def fold_lr_torch(lr: Tensor, a_scale: Tensor, lr_mult: Tensor, out: Tensor) -> Tensor:
    """Plain-torch twin of ``fold_lr``."""
    _check_fold(lr, a_scale, lr_mult, out)
    rs = a_scale.float().reshape(-1, 1)
    v = torch.where(rs > 0, lr.float() / torch.where(rs > 0, rs, torch.ones_like(rs)), torch.zeros_like(lr.float()))
    hi, lo = _split_e4m3(v * lr_mult.float().reshape(1, -1))
    out.copy_(torch.cat([hi, lo, hi], 1).to(torch.float8_e4m3fn))
    return out


_ROWWISE: dict = {}


def rowwise_scaled_mm(device: torch.device) -> bool:
    """Whether this torch runs ``_scaled_mm`` with per-row x per-column scales on ``device`` (CUDA: FP8 tensor cores,
    compute capability >= 8.9; CPU: torch >= 2.13 does, 2.11 only per-tensor scales). Tried once per device."""
    key = str(device)
    if key not in _ROWWISE:
        if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
            _ROWWISE[key] = False
        else:
            try:
                a = torch.zeros((16, 16), device=device).to(torch.float8_e4m3fn)
                torch._scaled_mm(a, a.t(), scale_a=torch.ones((16, 1), device=device),
                                 scale_b=torch.ones((1, 16), device=device), out_dtype=torch.bfloat16)
                _ROWWISE[key] = True
            except (RuntimeError, NotImplementedError, TypeError):
                _ROWWISE[key] = False
    return _ROWWISE[key]


def cublas_supported(a_dtype: torch.dtype, n: int, k: int, device: torch.device) -> bool:
    """Whether ``torch._scaled_mm`` takes these operands here (FP8 e4m3, K and N multiples of 16, row-wise scales)."""
    return a_dtype == torch.float8_e4m3fn and k % 16 == 0 and n % 16 == 0 and rowwise_scaled_mm(device)


def cublas_gemm(a: Tensor, w: FoldedWeight, a_scale: Tensor, bias: Optional[Tensor], out_dtype: torch.dtype) -> Tensor:
    """a (M, K') float8_e4m3fn with the folded columns filled (K' = ``w.w_ext.shape[1]``), a_scale (M,) fp32
    -> (M, N) out_dtype: one ``torch._scaled_mm`` (fast FP8 accumulation, as the Triton GEMM's default). An fp32
    output adds the bias after the GEMM (CUDA's _scaled_mm takes a bias only for 16-bit outputs)."""
    if a.shape[1] != w.w_ext.shape[1] or a.stride(1) != 1:
        raise ValueError(f"cublas_gemm: a {tuple(a.shape)} must have {w.w_ext.shape[1]} contiguous columns")
    fused_bias = bias is not None and out_dtype != torch.float32
    if fused_bias:
        bias = w.bias16 if w.bias16 is not None and w.bias16.dtype == out_dtype else bias.to(out_dtype)
    y = torch._scaled_mm(a, w.w_ext.t(), scale_a=a_scale.reshape(-1, 1), scale_b=w.col_scale.reshape(1, -1),
                         bias=bias if fused_bias else None, out_dtype=out_dtype, use_fast_accum=True)
    if bias is not None and not fused_bias:
        y += bias.float()
    return y


def cublas_gemm_torch(a: Tensor, w: FoldedWeight, a_scale: Tensor, bias: Optional[Tensor],
                      out_dtype: torch.dtype) -> Tensor:
    """Plain-torch twin of ``cublas_gemm`` (fp32 math; the bias rounded to out_dtype first, as cuBLAS reads it)."""
    y = (a.float() @ w.w_ext.float().t()) * a_scale.float().reshape(-1, 1) * w.col_scale.reshape(1, -1)
    if bias is not None:
        y = y + bias.to(out_dtype).float()
    return y.to(out_dtype)
