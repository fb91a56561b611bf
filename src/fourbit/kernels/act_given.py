"""act_quant with the row maxima given: X read once, in one streaming pass over (rows, column slices) tiles.

Row formats (int4p2, fp4p2, fp8 and int8 per token) need each row's max |X^| before its codes, so the single pass
walks a row twice and the branch's down-projection reads X again (a cuBLAS GEMM beside it at large M). When the
producer of X already knows the maxima (``row_amax``: a GEMM epilogue computes them), one pass over (``given_BM``
rows, a slice of columns) programs quantizes and stores each tile and, with the branch, accumulates the slice's
(BM, Rp) down-projection partial; the partials (slices, M, Rp) are summed in a fixed order afterwards
(deterministic). Codes and row scales are bit for bit ``act_quant``'s when ``row_amax`` is the true row maximum of
|X^| = |X * smooth_recip| (fp32).

Measured (H200, ``probes/rowmax_probe.py``, ``rowmax_probe.jsonl`` runs 2026-12-05 / b, int4p2 with the rank-32
branch, bf16 X; CUDA-graph replays over inputs larger than L2): 64 x 64 steps, 2048 columns per program and 4 warps
0.066 ms at 4096 x 12288 (today's single pass + cuBLAS down-projection 0.103, the single pass without the branch
0.064) and 0.094 at 4608 x 15360 (0.139); 512 columns per program 0.025 at 4608 x 3072 (0.029); the row maxima computed
outside the timing (their producer's cost apart). 128-column steps were 2.5-3x slower, 32-row programs 1.2-1.5x,
2 warps 5-6x. The library path (H100, ``rowmax_probe.py --library-only``, runs 2026-12-05c/d): 0.076 ms at 4096 x
12288 against 0.119 today, 0.107 at 4608 x 15360 against 0.163. In a FLUX.1 step the saving was smaller and the
producers' cost took it back (docs/kernels.md, session 21): ``fusion``'s rewrite 4, which feeds this path, is opt-in.
Launcher: ``act_quant_given``; twin: ``act_quant.act_quant_torch``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import amax as _amax, ceil_div, interpreting, operand_buffer
from .act_single import _load_tile, _quant_store
from .act_spec import FP8_ROW, INT8_ROW, P2_E2M1, P2_INT, ActOperand, ActSpec
from .act_tiles import _down_dot, _load_blocks, _row_scale, _scale_consts

#: the modes this path quantizes: one scale per row, from the row maximum alone
GIVEN_MODES = (P2_INT, P2_E2M1, INT8_ROW, FP8_ROW)


def given_supported(spec: ActSpec) -> bool:
    """True where the row maxima decide the scales (row formats without an outer scale)."""
    return spec.mode in GIVEN_MODES and spec.outer == 0


@triton.jit
def _act_given_kernel(
    x_ptr, x2_ptr, rsmooth_ptr, down_ptr, amax_ptr, q_ptr, rs_ptr, plr_ptr,
    M, K1, K, Kp, stride_xm, stride_x2m, stride_qm, cols_per_slice,
    MODE: tl.constexpr, G: tl.constexpr, NG: tl.constexpr, QMAX: tl.constexpr, EMIN: tl.constexpr,
    MANT_T: tl.constexpr, S_DROP: tl.constexpr, S_MAX: tl.constexpr, S_SUBQ: tl.constexpr, S_MINN: tl.constexpr,
    HAS_SMOOTH: tl.constexpr, TWO: tl.constexpr, RANK: tl.constexpr, XSPLIT: tl.constexpr, UPCAST: tl.constexpr,
    HW_ROUND: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
):
    """Codes of one (BM rows, slice of columns) block, the rows' max |X^| given; slice 0 stores the row scales.
    RANK > 0: the slice's down-projection partial X @ D into plr (SLICES, M, RANK). TWO: X in two column blocks."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < M
    rsc, div = _row_scale(tl.load(amax_ptr + rows, mask=rmask, other=0.0), MODE, QMAX, 0)
    if pid_s == 0:
        tl.store(rs_ptr + rows, rsc, mask=rmask)
    xrow = rows.to(tl.int64) * stride_xm
    x2row = rows.to(tl.int64) * stride_x2m
    qrow = q_ptr + rows[:, None, None].to(tl.int64) * stride_qm
    grp = tl.arange(0, NG)
    el = tl.arange(0, G)
    if RANK > 0:
        acc = tl.full((BM, RANK), 0, tl.float32)  # (tl.zeros: a @jit of Triton's, fixed at its import)
    k_lo = pid_s * cols_per_slice
    for k0 in range(k_lo, tl.minimum(k_lo + cols_per_slice, Kp), BK):
        if RANK > 0:
            cols = k0 + tl.arange(0, BK)
            x = _load_blocks(x_ptr, x2_ptr, xrow[:, None], x2row[:, None], cols[None, :], rmask[:, None], K1, K, TWO)
            acc = _down_dot(x, down_ptr, cols, Kp, acc, RANK, XSPLIT, UPCAST)
        cols3 = k0 + grp[None, :, None] * G + el[None, None, :]  # (1, NG, G): the same columns, in groups
        xs3 = _load_tile(x_ptr, x2_ptr, rsmooth_ptr, xrow, x2row, cols3, rmask, K1, K, Kp, TWO, HAS_SMOOTH)  # L1
        gx = div  # the groups' max |X^| (int4p2 / fp4p2 codes); unused by the per-row modes
        if MODE == 0 or MODE == 1:
            gx = _amax(tl.abs(xs3), 2)  # (BM, NG)
        _quant_store(xs3, gx, cols3, k0, qrow, div, 1.0, rs_ptr, rows, rmask, 0, Kp, MODE, G, NG, QMAX, EMIN,
                     MANT_T, S_DROP, S_MAX, S_SUBQ, S_MINN, 0, HW_ROUND)
    if RANK > 0:
        offs_r = tl.arange(0, RANK)
        tl.store(plr_ptr + (pid_s * M + rows[:, None]).to(tl.int64) * RANK + offs_r[None, :], acc,
                 mask=rmask[:, None])


def given_meta(spec: ActSpec, kp: int, cfg, two=False, has_smooth=True, rank=0, xsplit=False) -> tuple[dict, int]:
    """(the compile-time arguments of ``_act_given_kernel``: constexprs and ``num_warps``; its columns per program)
    for padded K ``kp``. Steps of BK = max(``given_BK``, group) columns; per-row modes quantize a step
    as one "group" (as ``single_pass_meta``); ``given_cols`` per program from ``large_k`` (0: never), else
    ``given_cols_small``, rounded up to a multiple of BK."""
    bm, bk = cfg.given_BM, max(cfg.given_BK, spec.group)
    for name, v in (("given_BM", bm), ("given_BK", bk)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"act_quant_given: ActConfig.{name} must be a power of two >= 16, got {v}")
    large = cfg.large_k and kp >= cfg.large_k
    cols = ceil_div(cfg.given_cols if large else cfg.given_cols_small, bk) * bk
    g = bk if spec.mode in (INT8_ROW, FP8_ROW) else spec.group
    return dict(MODE=spec.mode, G=g, NG=bk // g, QMAX=float(spec.qmax), EMIN=spec.emin, **_scale_consts(spec),
                HAS_SMOOTH=has_smooth, TWO=two, RANK=rank, XSPLIT=xsplit, UPCAST=interpreting(),
                HW_ROUND=cfg.hw_round and not interpreting(), BM=bm, BK=bk, num_warps=cfg.given_warps), cols


def check_row_amax(row_amax, m: int, device) -> None:
    """row_amax must be a (M,) float32 tensor on X's device."""
    if not isinstance(row_amax, Tensor) or row_amax.shape != (m,) or row_amax.dtype != torch.float32:
        got = (tuple(row_amax.shape), row_amax.dtype) if isinstance(row_amax, Tensor) else type(row_amax).__name__
        raise ValueError(f"act_quant: row_amax must be a ({m},) float32 tensor, each row's max |X * smooth_recip| "
                         f"(one per row of x), got {got}")
    if row_amax.device != device:
        raise ValueError(f"act_quant: row_amax is on {row_amax.device}, x on {device}: give it on x's device")


def act_quant_given(x, spec, smooth_recip, kp, cfg, row_amax, down_folded=None, tail=None, extra=0) -> ActOperand:
    """Launch the pass over x (M, K1) [and ``tail`` (M, K - K1), X's second column block, read in place], the
    rows' max |X^| given: ``row_amax`` (M,) fp32. smooth_recip (Kp,) fp32 or None; down_folded (2, Kp, Rp) bf16
    (``fold_down``) or None (no branch); ``extra``: columns left free after the operand's Kp (``ActOperand.q_ext``).
    Row formats only (``given_supported``)."""
    if not given_supported(spec):
        raise ValueError(f"act_quant_given: mode {spec.mode} (outer scale {spec.outer}) has no row-maxima path: "
                         f"only int4p2, fp4p2, fp8 and int8 per token; use act_quant without row_amax")
    m, k1 = x.shape
    k = k1 + (0 if tail is None else tail.shape[1])
    dev = x.device
    check_row_amax(row_amax, m, dev)
    rank = 0 if down_folded is None else down_folded.shape[2]
    meta, cols = given_meta(spec, kp, cfg, tail is not None, smooth_recip is not None, rank,
                            x.dtype != torch.bfloat16)
    slices = ceil_div(kp, cols)
    q, q_ext = operand_buffer(m, kp, extra, spec.operand_dtype, dev)  # 16-byte-aligned rows for the GEMM's TMA
    rs = torch.empty((m,), device=dev, dtype=torch.float32)
    plr = torch.empty((slices, m, rank), device=dev, dtype=torch.float32) if rank else None
    _act_given_kernel[(ceil_div(m, meta["BM"]), slices)](
        x, x if tail is None else tail, q if smooth_recip is None else smooth_recip,
        q if down_folded is None else down_folded, row_amax.contiguous(), q, rs, q if plr is None else plr,
        m, k1, k, kp, x.stride(0), x.stride(0) if tail is None else tail.stride(0), q.stride(0), cols, **meta)
    lr: Optional[Tensor] = None
    if rank:
        lr = plr[0] if slices == 1 else plr.sum(0)  # (M, Rp): the slices' partials in a fixed order
    return ActOperand(q, rs, None, lr, q_ext)
