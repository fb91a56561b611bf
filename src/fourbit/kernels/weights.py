"""Weight operands: packed 4-bit codes + group scales -> the operand the GEMM reads.

    int4p2 / fp4p2   float8_e4m3fn  value(code) * 2^e          (exact; column scale = the format's row_scale)
    int4             float8_e4m3fn  codes -8..7                (group scales (K/g, N) fp32 for grouped_gemm)
    fp4 / nvfp4      bfloat16       e2m1 value * e4m3 scale    (exact; outer fp32 scale applied in the epilogue)
    mxfp4            bfloat16       e2m1 value * 2^e           (exact)
    int8             int8 codes as stored (no expansion)        (per-channel scale)
    fp8              float8_e4m3fn codes as stored (no expansion) (per-channel scale)

Speed mode caches the result per layer; memory mode calls ``expand_weight`` before each GEMM (one read
of the 4-bit weight, one write of the operand: ~1.5 bytes per parameter of extra traffic per call).
``expand_weight_torch`` is the plain-torch twin (built from the format's reference).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import aligned_empty, ceil_div, check_device, e2m1_value, pow2, tma_aligned

# scale kinds
S_NONE, S_EXP, S_E4M3, S_E8M0 = range(4)

_KINDS = {  # format name -> (operand kind, code kind, scale kind)
    "int4p2": ("fp8", "int4", S_EXP),
    "fp4p2": ("fp8", "e2m1", S_EXP),
    "int4": ("codes", "int4", S_NONE),
    "fp4": ("bf16", "e2m1", S_E4M3),
    "nvfp4": ("bf16", "e2m1", S_E4M3),
    "mxfp4": ("bf16", "e2m1", S_E8M0),
    "int8": ("int8", "int8", S_NONE),
    "fp8": ("fp8", "e4m3", S_NONE),  # 8-bit: the stored codes are the operand
}


@functools.lru_cache(maxsize=256)
def weight_kind(fmt) -> Optional[str]:
    """'fp8' | 'codes' | 'bf16' | 'int8' for a weight format the kernels expand, else None."""
    entry = _KINDS.get(getattr(fmt, "name", None))
    if entry is None:
        return None
    g = fmt.group_size
    if fmt.code_bits == 8:  # per-row scales only
        return entry[0] if g is None else None
    if g is None or g < 2 or g % 2:
        return None
    return entry[0]


@dataclass
class WeightOperand:
    w: Tensor  # (N, Kp)
    col_scale: Optional[Tensor] = None  # (N,) or (1,) fp32, multiplied per output column in the epilogue
    group_scale: Optional[Tensor] = None  # (Kp/g, N) fp32 (int4 codes only)
    folded: Optional[object] = None  # ``gemm_cublas.FoldedWeight`` (the 'cublas' GEMM backend); w is then a view of it

    def nbytes(self) -> int:
        parts = (self.w, self.col_scale, self.group_scale)
        if self.folded is not None:  # w shares the folded operand's storage (bias16 is the layer's own buffer)
            parts = (self.folded.w_ext, self.folded.col_scale, self.folded.lr_mult, self.col_scale)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


@triton.jit
def nibble_value(nib, CODE_E2M1: tl.constexpr):
    """4-bit codes (int32 0..15) -> their values as fp32: int4 two's complement, or e2m1 (bit 3 the sign)."""
    if CODE_E2M1:
        mag = e2m1_value(nib & 7)
        v = tl.where((nib & 8) != 0, -mag, mag)
    else:  # the fp32 with bits 2^23 + (nib ^ 8), minus 2^23 + 8: exact, and no integer-to-float conversion
        v = ((nib ^ 8) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
    return v


@triton.jit
def _scale_values(ptrs, mask, SCALE: tl.constexpr):
    """Stored group scales -> fp32 multipliers: exponents (SCALE 1), e4m3/fp16 values (2), e8m0 (3). (The
    masked-off value is given in the scales' own type: Triton 3.6 cannot cast an int fill to fp8.)"""
    if SCALE == 1:
        return pow2(tl.load(ptrs, mask=mask, other=0).to(tl.int32))
    elif SCALE == 2:
        return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    else:
        return pow2(tl.load(ptrs, mask=mask, other=127).to(tl.int32) - 127)


@triton.jit
def _tile_bytes(p_ptr, rows, hcols, N, KH, stride_p):
    """A (BN, BKH) tile of packed bytes as int32 (zeros outside the weight)."""
    mask = (rows[:, None] < N) & (hcols[None, :] < KH)
    return tl.load(p_ptr + rows[:, None].to(tl.int64) * stride_p + hcols[None, :], mask=mask, other=0).to(tl.int32)


@triton.jit
def _store_pairs(o_ptr, v_lo, v_hi, rows, pid_k, N, KH, stride_o, BN: tl.constexpr, BKH: tl.constexpr):
    """Interleave the low- and high-nibble values (low first) into (BN, 2 BKH) operand columns and store them."""
    out = tl.reshape(tl.join(v_lo, v_hi), (BN, 2 * BKH)).to(o_ptr.dtype.element_ty)  # exact values
    ocols = pid_k * 2 * BKH + tl.arange(0, 2 * BKH)
    tl.store(o_ptr + rows[:, None].to(tl.int64) * stride_o + ocols[None, :], out,
             mask=(rows[:, None] < N) & (ocols[None, :] < 2 * KH))


@triton.jit
def _expand_kernel(p_ptr, s_ptr, o_ptr, N, KH, stride_p, stride_s, stride_o,
                   G: tl.constexpr, CODE_E2M1: tl.constexpr, SCALE: tl.constexpr,
                   BN: tl.constexpr, BKH: tl.constexpr):
    """(N, KH) bytes of two 4-bit codes -> (N, 2 KH) operand values, low nibble first. The tile's bytes are
    viewed as (BN, groups, G / 2) so that each group scale is loaded once (G a power of two dividing 2 BKH)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    NGRP: tl.constexpr = 2 * BKH // G
    rows = pid_n * BN + tl.arange(0, BN)
    byte = _tile_bytes(p_ptr, rows, pid_k * BKH + tl.arange(0, BKH), N, KH, stride_p)
    byte = tl.reshape(byte, (BN, NGRP, G // 2))  # (BN, groups, bytes of a group)
    v_lo = nibble_value(byte & 0xF, CODE_E2M1)
    v_hi = nibble_value((byte >> 4) & 0xF, CODE_E2M1)
    if SCALE != 0:  # both nibbles of a byte share a group (G even)
        grp = pid_k * NGRP + tl.arange(0, NGRP)
        smask = (rows[:, None] < N) & (grp[None, :] < (2 * KH) // G)
        sc = _scale_values(s_ptr + rows[:, None].to(tl.int64) * stride_s + grp[None, :], smask, SCALE)
        v_lo = v_lo * sc[:, :, None]  # (BN, groups, 1)
        v_hi = v_hi * sc[:, :, None]
    _store_pairs(o_ptr, v_lo, v_hi, rows, pid_k, N, KH, stride_o, BN, BKH)


@triton.jit
def _expand_any_group_kernel(p_ptr, s_ptr, o_ptr, N, KH, stride_p, stride_s, stride_o,
                             G: tl.constexpr, CODE_E2M1: tl.constexpr, SCALE: tl.constexpr,
                             BN: tl.constexpr, BKH: tl.constexpr):
    """``_expand_kernel`` for group sizes that are not powers of two: the scale gathered per byte."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BN + tl.arange(0, BN)
    hcols = pid_k * BKH + tl.arange(0, BKH)
    byte = _tile_bytes(p_ptr, rows, hcols, N, KH, stride_p)
    v_lo = nibble_value(byte & 0xF, CODE_E2M1)
    v_hi = nibble_value((byte >> 4) & 0xF, CODE_E2M1)
    if SCALE != 0:
        mask = (rows[:, None] < N) & (hcols[None, :] < KH)
        sc = _scale_values(s_ptr + rows[:, None].to(tl.int64) * stride_s + (2 * hcols[None, :]) // G, mask, SCALE)
        v_lo = v_lo * sc
        v_hi = v_hi * sc
    _store_pairs(o_ptr, v_lo, v_hi, rows, pid_k, N, KH, stride_o, BN, BKH)


def _operand_dtype(kind: str) -> torch.dtype:
    return {"fp8": torch.float8_e4m3fn, "codes": torch.float8_e4m3fn, "bf16": torch.bfloat16}[kind]


def _scales(fmt, scales: Tensor, row_scale: Optional[Tensor], kind: str) -> tuple:
    """(col_scale, group_scale) for the epilogue / grouped GEMM."""
    col = None if row_scale is None else row_scale.float().reshape(-1).contiguous()
    if fmt.code_bits == 8:  # int8 / fp8: the per-row scale is the group scale
        return scales.float().reshape(-1).contiguous(), None
    if kind == "codes":
        return col, scales.float().t().contiguous()
    return col, None


def expand_weight(packed: Tensor, scales: Tensor, row_scale: Optional[Tensor], fmt, kp: int,
                  out: Optional[Tensor] = None) -> WeightOperand:
    """Packed weight (N, Kp * bits / 8) + scales -> ``WeightOperand`` (Triton; ``out`` may be a reused buffer)."""
    kind = weight_kind(fmt)
    if kind is None:
        raise NotImplementedError(f"expand_weight: no kernel for weight format {fmt!r}")
    col, grp = _scales(fmt, scales, row_scale, kind)
    if fmt.code_bits == 8:  # int8 / fp8 codes are the operand as stored
        view = torch.int8 if kind == "int8" else torch.float8_e4m3fn
        return WeightOperand(tma_aligned(packed.view(view)[:, :kp]), col, grp)
    check_device(packed, scales)
    n = packed.shape[0]
    if packed.shape[1] * 2 != kp:
        raise ValueError(f"expand_weight: packed width {packed.shape[1]} does not hold Kp={kp} 4-bit codes")
    _, code, skind = _KINDS[fmt.name]
    if out is None:
        out = aligned_empty(n, kp, _operand_dtype(kind), packed.device)
    s = scales.contiguous()
    g = fmt.group_size
    bn, bkh = 32, max(128, g // 2)
    grid = (ceil_div(n, bn), ceil_div(kp // 2, bkh))
    kernel = _expand_kernel if g & (g - 1) == 0 else _expand_any_group_kernel
    kernel[grid](packed, s, out, n, kp // 2, packed.stride(0), s.stride(0), out.stride(0),
                 G=g, CODE_E2M1=code == "e2m1", SCALE=skind, BN=bn, BKH=bkh, num_warps=4)
    return WeightOperand(out, col, grp)


def expand_weight_torch(packed: Tensor, scales: Tensor, row_scale: Optional[Tensor], fmt, kp: int,
                        out: Optional[Tensor] = None) -> WeightOperand:
    """Plain-torch twin of ``expand_weight`` (through the format's unpack and reference numerics)."""
    from ..formats import QuantizedTensor
    from ..formats.floats import e2m1_decode

    kind = weight_kind(fmt)
    if kind is None:
        raise NotImplementedError(f"expand_weight: no kernel for weight format {fmt!r}")
    col, grp = _scales(fmt, scales, row_scale, kind)
    codes = fmt.unpack(packed, kp)
    if fmt.code_bits == 8:
        return WeightOperand(codes.view(torch.int8 if kind == "int8" else torch.float8_e4m3fn), col, grp)
    n = codes.shape[0]
    if kind == "fp8":
        w = fmt.fp8_values(QuantizedTensor(codes, scales, row_scale)).to(torch.float8_e4m3fn)
    elif kind == "codes":
        w = codes.to(torch.float16).to(torch.float8_e4m3fn)
    elif fmt.name == "mxfp4":
        w = fmt.dequantize(QuantizedTensor(codes, scales, None)).to(torch.bfloat16)
    else:
        g = fmt.group_size
        w = (e2m1_decode(codes).reshape(n, kp // g, g) * scales.float().unsqueeze(-1)).reshape(n, kp)
        w = w.to(torch.bfloat16)
    if out is not None:
        out.copy_(w)
        w = out
    return WeightOperand(w.contiguous(), col, grp)
