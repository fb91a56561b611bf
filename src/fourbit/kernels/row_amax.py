"""Row maxima of the next layer's smoothed input, computed where that input is produced: in the GEMM epilogue.

    out[m] = max over columns n in [lo, hi) of |round(y[m, n]) * mult[n - lo]|

y is the producing layer's output (after its epilogue activation), ``round`` its rounding to the output type (what
the next layer reads), ``mult`` the next layer's smoothing reciprocal for those columns. That is exactly the row
maximum ``act_quant`` computes for the next layer (the same fp32 products; a maximum has no order), so the next layer
can quantize from it and read its input once (``act_quant(..., row_amax=)``, path "given"): issue 19's route for
the large-K layers whose input a fourbit GEMM produces (FLUX.1's MLP output projections).

Each output tile reduces its rows over its columns in the range and combines them into ``out`` by an atomic maximum
on the fp32 bits as int32 (values >= 0 order as their bits): order-free, so deterministic. ``out`` must hold zeros (or maxima to combine with) before the
launch. ``row_amax_torch`` is the twin.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import amax as _amax


@dataclass(frozen=True)
class RowAmax:
    """A request to a GEMM for the row maxima of its output columns [lo, hi) times ``mult``: written into ``out``
    (M,) fp32 (combined by maximum with what it holds; zeros for a fresh one, ``RowAmax.zeros``)."""

    out: Tensor
    mult: Tensor
    lo: int
    hi: int

    @staticmethod
    def zeros(rows: int, mult: Tensor, lo: int, hi: int) -> "RowAmax":
        return RowAmax(torch.zeros(rows, device=mult.device, dtype=torch.float32), mult, lo, hi)

    def check(self, m: int, n: int) -> None:
        if not (0 <= self.lo < self.hi <= n):
            raise ValueError(f"row_amax: columns [{self.lo}, {self.hi}) are not a range of the {n} output columns")
        if self.out.shape != (m,) or self.out.dtype != torch.float32 or not self.out.is_contiguous():
            raise ValueError(f"row_amax: out must be a contiguous ({m},) float32 tensor, got "
                             f"{tuple(self.out.shape)} {self.out.dtype}")
        if self.mult.dtype != torch.float32 or self.mult.dim() != 1 or self.mult.numel() < self.hi - self.lo:
            raise ValueError(f"row_amax: mult must be float32 with at least {self.hi - self.lo} elements (the next "
                             f"layer's smoothing reciprocal for those columns), got {tuple(self.mult.shape)} "
                             f"{self.mult.dtype}")
        if self.mult.stride(0) != 1:
            raise ValueError("row_amax: mult must be contiguous")


def row_amax_torch(y: Tensor, req: Optional[RowAmax]) -> Optional[Tensor]:
    """The twin: y (M, N) as rounded to the output type -> req.out combined with the row maxima (in place)."""
    if req is None:
        return None
    v = (y[:, req.lo: req.hi].float() * req.mult[: req.hi - req.lo]).abs().amax(1)
    return torch.maximum(req.out, v, out=req.out)


@triton.jit
def tile_row_amax(yr, offs_m, offs_n, mask_m, off_n, amax_ptr, mult_ptr, lo, hi, BN: tl.constexpr):
    """Fold a (BM, BN) tile of the rounded output (as fp32) into the row maxima of its columns in [lo, hi)."""
    if (off_n + BN > lo) & (off_n < hi):
        inside = (offs_n >= lo) & (offs_n < hi)
        mult = tl.load(mult_ptr + (offs_n - lo), mask=inside, other=0.0)
        v = _amax(tl.abs(yr * mult[None, :]), 1)  # (BM,); columns outside the range: times 0
        # amax_ptr: the int32 view of the fp32 maxima. Non-negative floats order as their bits do, so one integer
        # atomic (no float compare-and-select pair), relaxed and its result unused: a fire-and-forget reduction
        # (Triton's float atomic_max waits for two round trips to L2 with acq_rel fences: +10% on a FLUX.1 GEMM)
        tl.atomic_max(amax_ptr + offs_m, v.to(tl.int32, bitcast=True), mask=mask_m, sem="relaxed")
