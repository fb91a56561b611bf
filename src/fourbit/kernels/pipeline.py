"""Row-chunk pipelining: act_quant of the next block of rows runs while the GEMM of the current one does.

A layer quantizes X in one pass (memory-bound) and then multiplies (compute-bound, at the power limit); one after
the other the GPU does one kind of work at a time, so no such layer can beat "cast X + FP8 GEMM" (the
separate-pass bound in ``benchmarks/linear.py``). Split into chunks of whole 128-row blocks, act_quant runs on the
caller's stream and the GEMMs on a high-priority side stream, each GEMM waiting for its chunk's operands only;
the quantization of chunk i + 1 then runs beside the GEMM of chunk i, on the SMs the GEMM leaves idle in its
partial last wave and in the memory bandwidth it does not use.

Rows are independent in both kernels, so chunking does not change the numerics: the result is the one-call result
bit for bit wherever the GEMM's tile schedule is the same per tile (data-parallel tiles; a stream-K tail splits
some tiles' K loop differently, an fp32 summation-order difference).

Buffer lifetimes need no cross-stream bookkeeping: the output is allocated on the caller's stream before the
fork, every act_quant operand is allocated there too, and the caller's stream waits for the GEMM stream before
returning (also under CUDA-graph capture).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ._common import ceil_div
from .act_quant import act_quant
from .activation import OutputActivation
from .gemm import GemmConfig, scaled_gemm
from .weights import WeightOperand

ROW_BLOCK = 128
_GEMM_STREAMS: dict = {}


def chunk_bounds(m: int, chunks: int, block: int = ROW_BLOCK) -> list[tuple[int, int]]:
    """[(start, end), ...]: m rows in at most ``chunks`` runs of whole ``block``-row blocks, as even as possible
    (the last run takes the remainder rows)."""
    if m <= 0:
        return []
    blocks = ceil_div(m, block)
    chunks = max(1, min(chunks, blocks))
    bounds, start = [], 0
    for i in range(chunks):
        end = min(m, (blocks * (i + 1) // chunks) * block)
        if end > start:
            bounds.append((start, end))
        start = end
    return bounds


def _gemm_stream(device: torch.device) -> "torch.cuda.Stream":
    index = device.index if device.index is not None else torch.cuda.current_device()
    s = _GEMM_STREAMS.get(index)
    if s is None:
        lo, hi = torch.cuda.Stream.priority_range() if hasattr(torch.cuda.Stream, "priority_range") else (0, -1)
        s = _GEMM_STREAMS[index] = torch.cuda.Stream(device=index, priority=min(lo, hi))
    return s


def _rows(x: Union[Tensor, Sequence[Tensor]], r0: int, r1: int):
    return x[r0:r1] if isinstance(x, Tensor) else [b[r0:r1] for b in x]


def pipelined_scaled_gemm(x2: Union[Tensor, Sequence[Tensor]], act_format, padded_in: int, w: WeightOperand,
                          smooth_recip: Optional[Tensor], down_folded: Optional[Tensor], down_cat: Optional[Tensor],
                          up: Optional[Tensor], bias: Optional[Tensor], chunks: int,
                          gemm_config: Optional[GemmConfig] = None,
                          act: Optional[OutputActivation] = None) -> Tensor:
    """``quantized_gemm`` on the 'scaled' plan, (M, K) -> (M, N) in x2's dtype, with act_quant and the GEMM
    pipelined over ``chunks`` row chunks (module docstring). Without CUDA (Triton's interpreter) the chunks run
    one after the other: the same calls, the same result."""
    first = x2 if isinstance(x2, Tensor) else x2[0]
    m, dtype, dev = first.shape[0], first.dtype, first.device
    out = torch.empty((m, w.w.shape[0]), device=dev, dtype=dtype)
    pipelined = dev.type == "cuda"
    if pipelined:
        cur = torch.cuda.current_stream(dev)
        side = _gemm_stream(dev)
        side.wait_stream(cur)  # ``out`` exists before the GEMM stream writes it
    for r0, r1 in chunk_bounds(m, chunks):
        a = act_quant(_rows(x2, r0, r1), act_format, padded_in=padded_in, down_folded=down_folded,
                      smooth_recip=smooth_recip, down_cat=down_cat)
        lr = a.lr if down_folded is not None else None
        if not pipelined:
            scaled_gemm(a.q, w.w, a.row_scale, w.col_scale, lr, up, bias, out_dtype=dtype, config=gemm_config,
                        act=act, out=out[r0:r1])
            continue
        ready = torch.cuda.Event()
        ready.record(cur)
        with torch.cuda.stream(side):
            side.wait_event(ready)
            scaled_gemm(a.q, w.w, a.row_scale, w.col_scale, lr, up, bias, out_dtype=dtype, config=gemm_config,
                        act=act, out=out[r0:r1])
    if pipelined:
        cur.wait_stream(side)  # operands freed (on ``cur``) only after the GEMMs that read them
    return out
