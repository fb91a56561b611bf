"""Dynamic activation quantization fused with the smoothing and the low-rank down-projection: ``act_quant``.

One call reads X (M, K) (or two column blocks whose concatenation is X) and returns what the GEMM needs
(``act_spec.ActOperand``):
  q      (M, Kp) the GEMM operand of the format's mode (``act_spec``: FP8 / int8 / bf16)
  row_scale   (M,) fp32 per-token scale (or (1,) per-tensor for nvfp4), None where the format has none
  group_scale (K/g, M) fp32, group-major (int4 only)
  lr     (M, R) fp32: X^ @ lr_down^T, the low-rank branch's down-projection (R padded to a power of 2 >= 16)
with X^ = pad(X) * (1 / smooth) in fp32 as ``fourbit.kernels.reference`` computes it, and codes/scales bit for bit
those of the format's reference ``quantize`` (``act_quant_torch``, the twin, builds them from it). The
down-projection multiplies the raw X by ``fold_down(lr_down, smooth)`` in bf16 hi + lo (exact products for bf16 X;
~2^-16 relative per product and another summation order than the fp32 reference).

Paths (``act_path``, one table; each in its own module with kernel and launcher):
  "given"             ``act_given``    the rows' max |X^| given (``row_amax``, row formats): one pass over (rows,
                                       column slices) tiles, codes and the down-projection's partials, X read once
  "single"            ``act_single``   one pass per row, no branch
  "single+mm[-side]"  ``act_lowrank``  the single pass + the down-projection as one cuBLAS GEMM (on a side stream)
  "two"               ``act_two``      stats launch (row maxima / tensor maximum, down-projection) + quantize tiles
Options measured slower and removed (numbers in docs/kernels.md): the down-projection inside the single pass
(``single_pass_lr``, 3-4x slower), the single pass after a split-K down-projection launch (``lr_split``, 4% slower
than two launches), the split pass with its in-kernel wait (``split_min_k``, probe only), IEEE division from
reciprocals (``fast_div``, 25% slower), tf32 / bf16x2 down-projections (``lr_dot``; the folded factor is exact
for bf16 X), and two launches without the branch (``single_pass=False``, 30% slower).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ._common import check_device, next_pow2
from .act_given import act_quant_given, check_row_amax, given_supported
from .act_lowrank import _MM_FP32_OUT, _down_projection_mm, act_quant_mm, cat_down, fold_down  # noqa: F401
from .act_single import act_quant_single
from .act_spec import (E2M1_E4M3, FP8_ROW, INT4_GROUP, INT8_ROW, MX, P2_E2M1, P2_INT, ActOperand,  # noqa: F401
                       ActSpec, act_spec)
from .act_tiles import _down_dot, _load_smoothed, _row_scale, _scale_consts, p2_values  # noqa: F401
from .act_two import act_quant_two
from .reference import smooth_reciprocal


@dataclass(frozen=True)
class ActConfig:
    """Tiles of each path, and the thresholds of ``act_path``.

    single pass: one program per ``rows`` rows walking them in chunks of ``chunk`` columns (0: the whole padded
    row), ``warps`` warps, ``stages`` software-pipeline stages; padded K in (chunk, ``whole_row_k``]: one chunk of
    next_pow2(Kp) (0: never); ``one_load``: a row of one chunk is loaded once for its maximum and its codes (else
    twice; H200: 7-11% faster at 8192 x 640-1536, equal elsewhere, ``act_chunk_probe.jsonl`` 2026-12-04b); from
    padded K ``large_k`` (0: never) chunks of ``large_chunk`` with ``large_warps``. With the branch, from
    ``lr_mm_rows`` rows (0: never) of bf16 X on CUDA the down-projection is one cuBLAS GEMM beside the single pass,
    on a side stream when Kp <= ``lr_mm_stream_max_k``.
    Two launches: stats kernel over slices of K, programs of ``stats_BM`` rows x ``stats_BK`` columns per step,
    ``split`` slices per row block (None: enough programs to fill the GPU ~4 times), then the quantize kernel, one
    program per (``BM`` rows, ``BK`` columns) tile.
    Row maxima given (``act_given``): programs of ``given_BM`` rows x ``given_cols`` columns from padded K
    ``large_k`` (``given_cols_small`` below), in steps of ``given_BK`` columns (at least the group), ``given_warps``
    warps. ``hw_round``: the GPU's own instructions (round to nearest even, four-at-a-time FP8 conversion) rather
    than the portable forms the interpreter runs.
    """

    rows: int = 1
    chunk: int = 1024
    whole_row_k: int = 0
    one_load: bool = True
    warps: int = 4
    stages: int = 1
    large_k: int = 0
    large_chunk: int = 2048
    large_warps: int = 8
    lr_mm_rows: int = 0
    lr_mm_stream_max_k: int = 0
    BM: int = 16
    BK: int = 256
    num_warps: int = 4
    stats_BM: int = 32
    stats_BK: int = 128
    stats_warps: int = 4
    split: Optional[int] = None
    given_BM: int = 64
    given_BK: int = 64
    given_cols: int = 2048
    given_cols_small: int = 512
    given_warps: int = 4
    hw_round: bool = True


#: H100 sweeps (benchmarks/act_quant.py, results/act_quant.jsonl, run 2026-11-22b; Triton 3.6): one row per program
#: in chunks of 1024 columns with 4 warps beat the two-launch path by 30% without the branch (2.3x vs 3.4x the
#: memory floor at 4608 x 3072); rows of 16 with the down-projection's dot inside were 3-4x slower (the factor
#: is re-read from L2 by every 16 rows); dividing from cached reciprocals (``fast_div``) was 25% slower (its
#: guard). The stats kernel's tile (two-launch path, or the split-K down-projection): 64x32 was 20% faster than
#: 64x64 and 2x faster than 32x128 (2026-11-22 sweep).
#: With the rank-32 branch (2026-11-22b sweep with cached factors): two launches, the stats kernel computing row
#: maxima and the folded down-projection, then quantize tiles of 4 x 512, were 4% faster than the single pass
#: plus a split-K down-projection launch at K >= 12288 and equal at K = 3072.
#: With the smoothing and the row scale as multiplications by reciprocals (2026-11-22c probe,
#: results/act_quant.jsonl, probe run): single pass without the branch 0.038 -> 0.023 ms at 4608 x 3072
#: with 2 stages, 0.148 -> 0.080 ms at 4608 x 12288 with chunks of 2048 and 8 warps.
#: The down-projection as a cuBLAS GEMM beside the single pass (results/act_quant.jsonl, lrmm run):
#: 0.040 -> 0.036 ms at 4608 x 3072, 0.142 -> 0.130 at 4608 x 12288, equal at 4608 x 15360, slower at
#: 1024 x 3072 (0.0136 -> 0.0163): used from 2048 rows.
#: Session 4 (results/branch_probe.jsonl): the cuBLAS down-projection on a side stream, concurrent
#: with the single pass, 0.038 -> 0.031 ms at 4608 x 3072 (X fits in L2: the two kernels share its reads), no gain
#: at K = 12288, slower at 15360; chunks of 4096 from K = 8192 (no branch) 0.079 -> 0.076 ms at 4608 x 12288 and
#: 0.112 -> 0.098 at 4608 x 15360. Tried and dropped: the cuBLAS down-projection over row chunks that stay in L2
#: (1.3-1.6x slower), one wave of 64-row programs with the dot inside (2.4-2.8x slower).
#: H200 (results/act_chunk_probe.jsonl, run 2026-12-04; every family's M >= 2048 and K, chunks 256-4096 x 4/8 warps):
#: the default was best or within 1% everywhere except padded K in (1024, 2048], where one chunk of 2048 columns
#: beat two of 1024 (the second mostly masked): 8192 x 1152 21.1 -> 19.0 us, 8192 x 1536 21.7 -> 20.9, 2048 x 1280
#: 7.0 -> 6.7 (``whole_row_k``). Chunks of 256 / 512 were 1.1-3x slower: the pass is bound by its per-chunk work, not
#: by memory (1.5-2x a plain cast to fp8, 2-3.6x the DRAM floor).
#: Row maxima given (H200, results/rowmax_probe.jsonl runs 2026-12-05 / b, int4p2 + rank-32 branch): 64 x 64 steps,
#: 4 warps, 2048 columns per program 0.066 ms at 4096 x 12288 (1024: 0.072, 512: 0.069; today's path 0.103), 512
#: per program 0.025 at 4608 x 3072 (1024: 0.029, 2048: 0.045); 32-row programs 1.2-1.5x slower, 128-column steps
#: 2.5-3x, 2 warps 5-6x (the ``given_*`` defaults).
DEFAULT_CONFIG = ActConfig(stages=2, whole_row_k=2048, large_k=8192, large_chunk=4096, large_warps=8, lr_mm_rows=2048,
                           lr_mm_stream_max_k=4096, BM=4, BK=512, num_warps=4, stats_BM=64, stats_BK=32)


#: the largest (padded) branch rank the path "given" takes: its programs keep a (given_BM, rank) fp32 partial in
#: registers; a LoRA-grown branch beyond it takes the usual path (the row maxima ignored)
GIVEN_MAX_RANK = 64


def act_path(spec: ActSpec, m: int, kp: int, branch: bool, bf16_cuda: bool, cfg: ActConfig,
             row_amax: bool = False) -> str:
    """The launch path for these operands, first matching row of the table (why: ``DEFAULT_CONFIG``'s notes).
    ``row_amax``: the caller gives the rows' max |X^| (taken by the row formats, ignored by the others)."""
    table = (
        (row_amax and given_supported(spec), "given"),
        (spec.outer == 1, "two"),  # a per-tensor scale: the stats launch gives the tensor maximum first
        (not branch, "single"),
        (bf16_cuda and cfg.lr_mm_rows and m >= cfg.lr_mm_rows and kp <= cfg.lr_mm_stream_max_k, "single+mm-side"),
        (bf16_cuda and cfg.lr_mm_rows and m >= cfg.lr_mm_rows, "single+mm"),
        (True, "two"),
    )
    return next(path for cond, path in table if cond)


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


def act_quant(x, fmt, smooth: Optional[Tensor] = None, lr_down: Optional[Tensor] = None,
              padded_in: Optional[int] = None, config: Optional[ActConfig] = None,
              down_folded: Optional[Tensor] = None, smooth_recip: Optional[Tensor] = None,
              down_cat: Optional[Tensor] = None, extra_cols: int = 0, *,
              row_amax: Optional[Tensor] = None) -> ActOperand:
    """Quantize activations x (M, K) with format ``fmt`` for the GEMM, fused with smoothing and X^ @ lr_down^T.

    smooth: (Kp,) fp32 or None; lr_down: (R, Kp) 16-bit or fp32 (R padded to a power of two >= 16 inside);
    padded_in: Kp (zero-padding of K up to the group multiple); x may be any float dtype and row stride.
    x may also be a list of column blocks [(M, K1), (M, K2)] whose concatenation is X (e.g. an attention output
    and an MLP activation that a model concatenates): the single pass reads both in place, the two-launch path
    concatenates them first.
    Layers pass what they cache: down_folded = ``fold_down(lr_down, smooth)``, smooth_recip = ``smooth_reciprocal(smooth)``,
    down_cat = ``cat_down(down_folded)``; computed here when None. The kernels read only these, so either may be
    given without its source (``smooth`` / ``lr_down`` None). ``extra_cols``: the operand is the first Kp columns of
    a wider buffer (``ActOperand.q_ext``, (M, Kp + extra_cols)) whose last columns the caller fills.
    ``row_amax``: (M,) fp32, each row's max |X^| (X^ = pad(X) * smooth_recip in fp32) where the caller knows it
    (the GEMM that produced X): the row formats (int4p2, fp4p2, fp8, int8 per token) then read X once (path
    "given"; the same codes and scales when it is the true maximum); other formats, and branches of padded rank above
    ``GIVEN_MAX_RANK``, ignore it.
    """
    spec = act_spec(fmt)
    if spec is None:
        raise NotImplementedError(f"act_quant: no kernel for activation format {fmt!r}")
    if smooth is None and smooth_recip is not None:
        smooth = smooth_recip  # below, only its shape and presence are read
    if lr_down is None and down_folded is not None:
        lr_down = down_folded[0].t()  # (Rp, Kp) view: only its shape is read
    x, tail = _column_blocks(x)
    kp = _check(x, smooth, lr_down, padded_in, x.shape[1] + (0 if tail is None else tail.shape[1]))
    check_device(x, tail, smooth, lr_down)
    if x.stride(1) != 1:
        x = x.contiguous()
    if tail is not None and tail.stride(1) != 1:
        tail = tail.contiguous()
    cfg = config or DEFAULT_CONFIG
    if smooth is not None and smooth_recip is None:
        smooth_recip = smooth_reciprocal(smooth)
    if lr_down is not None:
        if down_folded is None:
            down_folded = fold_down(lr_down, smooth)
        rank = next_pow2(lr_down.shape[0], 16)
        if down_folded.shape != (2, kp, rank) or down_folded.dtype != torch.bfloat16:
            raise ValueError(f"act_quant: down_folded must be (2, {kp}, {rank}) bfloat16 (fold_down), "
                             f"got {tuple(down_folded.shape)} {down_folded.dtype}")
        down_folded = down_folded.contiguous()
    bf16_cuda = x.is_cuda and x.dtype == torch.bfloat16 and _MM_FP32_OUT[0]
    given = row_amax is not None and (down_folded is None or down_folded.shape[2] <= GIVEN_MAX_RANK)
    path = act_path(spec, x.shape[0], kp, lr_down is not None, bf16_cuda, cfg, given)
    if path == "given":  # (it checks row_amax)
        return act_quant_given(x, spec, smooth_recip, kp, cfg, row_amax, down_folded, tail, extra_cols)
    if row_amax is not None:
        check_row_amax(row_amax, x.shape[0], x.device)  # ignored by this format, but a wrong one is a caller's mistake
    if path == "single":
        return act_quant_single(x, spec, smooth, smooth_recip, kp, cfg, tail, extra_cols)
    if path.startswith("single+mm"):  # (its stream choice is lr_mm_stream_max_k's, as in the table)
        out = act_quant_mm(x, spec, smooth, smooth_recip, kp, cfg, down_folded, down_cat, tail, extra_cols)
        if out is not None:
            return out  # else torch lacks the fp32-output GEMM: the two launches from now on
    return act_quant_two(_joined(x, tail), spec, smooth_recip, kp, cfg, down_folded, extra_cols)


# ---- the plain-torch twin ----------------------------------------------------------------------
def act_quant_torch(x: Tensor, fmt, smooth: Optional[Tensor] = None, lr_down: Optional[Tensor] = None,
                    padded_in: Optional[int] = None, config: Optional["ActConfig"] = None,
                    down_folded: Optional[Tensor] = None, smooth_recip: Optional[Tensor] = None, *,
                    row_amax: Optional[Tensor] = None) -> ActOperand:
    """The same outputs from the format's reference ``quantize`` (plain torch, any device); ``row_amax`` is
    ignored (the reference computes the row maxima itself: the same values where the caller's are true)."""
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
