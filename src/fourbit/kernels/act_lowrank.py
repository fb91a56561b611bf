"""The low-rank branch's down-projection operand and its cuBLAS path.

``fold_down`` builds the factor every path multiplies the raw X by: D = (lr_down / smooth)^T in bf16 hi + lo.
From ``ActConfig.lr_mm_rows`` rows (bf16 X on CUDA), ``act_quant_mm`` runs act_quant's single pass beside the
down-projection as one cuBLAS GEMM X @ [hi | lo] with fp32 output, on a side stream (concurrent with the single
pass) up to ``lr_mm_stream_max_k``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._common import next_pow2
from .act_single import act_quant_single
from .act_spec import ActOperand


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


def act_quant_mm(x, spec, smooth, smooth_recip, kp, cfg, down_folded, down_cat, tail=None,
                 extra=0) -> Optional[ActOperand]:
    """The single pass beside the down-projection as one cuBLAS GEMM (concurrent on a side stream up to
    ``lr_mm_stream_max_k``). None where torch lacks the GEMM. ``tail``: X's second column block."""
    if kp <= cfg.lr_mm_stream_max_k:
        return _act_quant_mm_concurrent(x, spec, smooth, smooth_recip, kp, cfg, down_folded, down_cat, tail, extra)
    lr = _down_projection_mm(x, down_folded, down_cat, tail=tail)
    if lr is None:
        return None
    out = act_quant_single(x, spec, smooth, smooth_recip, kp, cfg, tail, extra)
    out.lr = lr
    return out


_SIDE_STREAMS: dict = {}


def _act_quant_mm_concurrent(x, spec, smooth, smooth_recip, kp, cfg, down_folded, down_cat,
                             tail=None, extra=0) -> Optional[ActOperand]:
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
    out = act_quant_single(x, spec, smooth, smooth_recip, kp, cfg, tail, extra)
    cur.wait_stream(side)
    if not ok:
        return None
    out.lr = lr
    return out
