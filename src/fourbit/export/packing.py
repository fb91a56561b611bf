"""nunchaku's tensor layouts for its W4A4 GEMM (as read from its published code, see ``docs/export.md``), written
from the layout description: each ``pack_*`` has an ``unpack_*`` inverse, so a file can be decoded again.

All layouts are for warp_n = 128 output channels per tile and 4-bit codes; N and K must be multiples of 128.
- weights: 4-bit codes (N, K) viewed as (N/128, 8, 2, 8, 1, K/64, 1, 2, 4, 8) = (n tile, n pack, n in pack,
  n lane, reg n, k tile, k pack, k in pack, k lane, 8 codes in one 32-bit register), reordered to
  (n tile, k tile, k pack, n pack, n lane, k lane, n in pack, k in pack, reg n, codes); 8 codes share one int32
  (code i in bits 4i..4i+3, little-endian), stored as int8 (N, K/2).
- scales: per output channel and K group, (N, G) viewed as (N/128, 1, 8, 2, 4, 2, G), reordered to
  (n tile, G, 1, 8, 4, 2, 2); stored (G, N). Per-channel vectors (bias, smoothing) use the same order with G = 1.
- low-rank factors (16-bit): rows padded to 16, columns to 16, viewed in 16 x 16 blocks of (2, 8, 1) x (2, 4, 2),
  reordered to (blocks, 8 lanes n, 4 lanes k, 2, 2, 1, 2); the down factor (r, K) is stored (K, r), the up
  factor (N, r) as (N, r).
"""
from __future__ import annotations

import torch
from torch import Tensor

WARP_N = 128
K_UNIT = 128  # the GEMM reads K in two 64-wide steps

_W_VIEW = (8, 2, 8, 1, 1, 2, 4, 8)  # after (n tiles) and before/after (k tiles): see pack_weight
_W_PERM = (0, 5, 6, 1, 3, 8, 2, 7, 4, 9)
_S_PERM = (0, 6, 1, 2, 4, 3, 5)
_LR_PERM = (0, 1, 3, 6, 2, 5, 4, 7)


def _inverse(perm) -> tuple:
    return tuple(sorted(range(len(perm)), key=lambda i: perm[i]))


def pack_weight(codes: Tensor) -> Tensor:
    """(N, K) integer codes in [-8, 7] -> (N, K/2) int8."""
    n, k = codes.shape
    if n % WARP_N or k % K_UNIT:
        raise ValueError(f"nunchaku weights need N and K multiples of 128, got {n} x {k}")
    w = codes.to(torch.int32).reshape(n // WARP_N, 8, 2, 8, 1, k // 64, 1, 2, 4, 8)
    w = w.permute(*_W_PERM).contiguous() & 0xF  # (..., 8 codes of one register)
    shift = torch.arange(0, 32, 4, dtype=torch.int32)
    w = (w << shift).sum(dim=-1, dtype=torch.int32)  # one int32 per 8 codes
    return w.view(torch.int8).reshape(n, k // 2)


def unpack_weight(packed: Tensor) -> Tensor:
    """(N, K/2) int8 -> (N, K) int8 codes in [-8, 7] (the inverse of ``pack_weight``)."""
    n, half = packed.shape
    k = half * 2
    words = packed.contiguous().view(torch.int32).reshape(n // WARP_N, k // 64, 1, 8, 8, 4, 2, 2, 1)
    shift = torch.arange(0, 32, 4, dtype=torch.int32)
    nib = (words.unsqueeze(-1) >> shift) & 0xF  # (..., 8) unsigned nibbles
    nib = torch.where(nib >= 8, nib - 16, nib)  # two's complement 4-bit
    return nib.permute(*_inverse(_W_PERM)).reshape(n, k).to(torch.int8)


def pack_scale(scale: Tensor) -> Tensor:
    """(N, G) 16-bit scales -> (G, N) in nunchaku's order (G = 1: a per-channel vector, returned (N,))."""
    n, g = scale.shape
    s = scale.reshape(n // WARP_N, 1, 8, 2, 4, 2, g).permute(*_S_PERM).contiguous()
    return s.reshape(-1) if g == 1 else s.reshape(g, n)


def unpack_scale(packed: Tensor, n: int) -> Tensor:
    """(G, N) or (N,) -> (N, G) (the inverse of ``pack_scale``)."""
    g = packed.numel() // n
    s = packed.reshape(n // WARP_N, g, 1, 8, 4, 2, 2).permute(*_inverse(_S_PERM))
    return s.reshape(n, g)


def _lr_view(w: Tensor, down: bool) -> tuple:
    rows, cols = w.shape
    if down:  # (r, K): r is the packed 'n' side
        w = w.reshape(rows // 16, 16, cols // 16, 16).permute(2, 0, 1, 3)
    else:  # (N, r)
        w = w.reshape(rows // 16, 16, cols // 16, 16).permute(0, 2, 1, 3)
    return w.reshape(w.shape[0], w.shape[1], 2, 8, 1, 2, 4, 2)


def pack_lowrank(w: Tensor, down: bool) -> Tensor:
    """down (r, K) -> (K, r); up (N, r) -> (N, r); both dimensions must be multiples of 16 (pad first)."""
    rows, cols = w.shape
    if rows % 16 or cols % 16:
        raise ValueError(f"low-rank factors are packed in 16 x 16 blocks, got {rows} x {cols}")
    p = _lr_view(w, down).permute(*_LR_PERM).contiguous()
    return p.reshape(cols, rows) if down else p.reshape(rows, cols)


def unpack_lowrank(packed: Tensor, down: bool) -> Tensor:
    """The inverse of ``pack_lowrank``: (K, r) -> down (r, K); (N, r) -> up (N, r)."""
    if down:
        k, r = packed.shape
        blocks = packed.reshape(k // 16, r // 16, 8, 4, 2, 2, 1, 2).permute(*_inverse(_LR_PERM))
        return blocks.reshape(k // 16, r // 16, 16, 16).permute(1, 2, 0, 3).reshape(r, k)
    n, r = packed.shape
    blocks = packed.reshape(n // 16, r // 16, 8, 4, 2, 2, 1, 2).permute(*_inverse(_LR_PERM))
    return blocks.reshape(n // 16, r // 16, 16, 16).permute(0, 2, 1, 3).reshape(n, r)
