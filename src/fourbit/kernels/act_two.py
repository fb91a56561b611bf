"""act_quant in two launches: a stats kernel over slices of K (row maxima of |X^| and the low-rank down-projection,
partials summed in a fixed order), then a quantize kernel over (rows, columns) tiles.

The path with the branch below ``ActConfig.lr_mm_rows`` rows (or off CUDA / for non-bf16 X), and for per-tensor
scales (nvfp4, fp4 with a tensor scale: the stats give the tensor maximum). The down-projection multiplies the raw X
by ``fold_down``'s factor (``act_tiles._down_dot``). Launcher: ``act_quant_two``; twin: ``act_quant.act_quant_torch``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..formats.base import div_scalar
from ._common import amax as _amax, ceil_div, interpreting, num_sms, operand_buffer
from .act_spec import _TINY, FP8_ROW, INT4_GROUP, INT8_ROW, ActOperand
from .act_tiles import _down_dot, _load_smoothed, _quant_tile, _row_scale, _scale_consts, _smooth


@triton.jit
def _act_stats_kernel(x_ptr, rsmooth_ptr, down_ptr, pmax_ptr, plr_ptr, M, K, Kp, stride_xm, cols_per_split,
                      NEED_AMAX: tl.constexpr, HAS_SMOOTH: tl.constexpr, RANK: tl.constexpr, XSPLIT: tl.constexpr,
                      UPCAST: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    """Partial row maxima of |X^| (SPLIT, M) and partial down-projections X @ D (SPLIT, M, RANK) over one K slice."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < M
    xrow = rows.to(tl.int64) * stride_xm
    k_lo = pid_s * cols_per_split
    amax = tl.full((BM,), 0, tl.float32)
    if RANK > 0:
        acc = tl.full((BM, RANK), 0, tl.float32)
        offs_r = tl.arange(0, RANK)
    for k0 in range(k_lo, tl.minimum(k_lo + cols_per_split, Kp), BK):
        cols = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + xrow[:, None] + cols[None, :], mask=rmask[:, None] & (cols[None, :] < K), other=0.0)
        if NEED_AMAX:
            xs = x.to(tl.float32)
            if HAS_SMOOTH:
                xs = _smooth(xs, rsmooth_ptr, cols[None, :], Kp)
            amax = tl.maximum(amax, _amax(tl.abs(xs), 1))
        if RANK > 0:
            acc = _down_dot(x, down_ptr, cols, Kp, acc, RANK, XSPLIT, UPCAST)
    if NEED_AMAX:
        tl.store(pmax_ptr + pid_s * M + rows, amax, mask=rmask)
    if RANK > 0:
        tl.store(plr_ptr + (pid_s * M + rows[:, None]).to(tl.int64) * RANK + offs_r[None, :], acc,
                 mask=rmask[:, None])


@triton.jit
def _act_quant_kernel(
    x_ptr, rsmooth_ptr, q_ptr, rs_ptr, gs_ptr, pmax_ptr, plr_ptr, lr_ptr, t_ptr,
    M, K, Kp, stride_xm, stride_qm, stride_gs, SPLIT,
    MODE: tl.constexpr, G: tl.constexpr, NG: tl.constexpr, QMAX: tl.constexpr, EMIN: tl.constexpr,
    MANT_T: tl.constexpr,  # pow2 modes: mantissa bits above which frexp's m exceeds QMAX / 8
    S_DROP: tl.constexpr, S_MAX: tl.constexpr, S_SUBQ: tl.constexpr, S_MINN: tl.constexpr,  # 16-bit scale grid
    OUTER: tl.constexpr, ROW_PASS: tl.constexpr, HAS_SMOOTH: tl.constexpr, RANK: tl.constexpr,
    HW_ROUND: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
):
    """Quantize one (BM, BK) tile, row scales from the stats partials (every program recomputes them)."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < M
    div = tl.full((BM,), 1.0, tl.float32)
    if ROW_PASS:
        amax = tl.full((BM,), 0, tl.float32)
        for s in range(SPLIT):
            amax = tl.maximum(amax, tl.load(pmax_ptr + s * M + rows, mask=rmask, other=0.0))
        rsc, div = _row_scale(amax, MODE, QMAX, OUTER)
        if pid_k == 0:
            tl.store(rs_ptr + rows, rsc, mask=rmask)
    t_one = 1.0
    if OUTER == 1:
        t_one = tl.load(t_ptr)
    if RANK > 0:  # the down-projection: sum of the partials, in a fixed order (deterministic)
        if pid_k == 0:
            offs_r = tl.arange(0, RANK)
            lr = tl.full((BM, RANK), 0, tl.float32)
            for s in range(SPLIT):
                lr += tl.load(plr_ptr + (s * M + rows[:, None]).to(tl.int64) * RANK + offs_r[None, :],
                              mask=rmask[:, None], other=0.0)
            tl.store(lr_ptr + rows[:, None].to(tl.int64) * RANK + offs_r[None, :], lr, mask=rmask[:, None])
    k0 = pid_k * BK
    grp = tl.arange(0, NG)
    el = tl.arange(0, G)
    cols = k0 + grp[None, :, None] * G + el[None, None, :]  # (1, NG, G)
    xs = _load_smoothed(x_ptr, rsmooth_ptr, rows[:, None, None].to(tl.int64) * stride_xm, cols,
                        rmask[:, None, None], K, Kp, HAS_SMOOTH)  # (BM, NG, G)
    out = _quant_tile(xs, div, t_one, gs_ptr, rows, rmask, k0, stride_gs, Kp, MODE, G, NG, QMAX, EMIN, MANT_T,
                      S_DROP, S_MAX, S_SUBQ, S_MINN, OUTER, HW_ROUND)
    tl.store(q_ptr + rows[:, None, None].to(tl.int64) * stride_qm + cols, out,
             mask=rmask[:, None, None] & (cols < Kp))


def _stats(x, smooth_recip, down_folded, kp, rank, need_amax, cfg, dummy):
    """Launch the stats kernel over slices of K: (split, pmax (split, M) or None, plr (split, M, R) or None)."""
    m, k = x.shape
    dev = x.device
    n_rb = ceil_div(m, cfg.stats_BM)
    k_steps = ceil_div(kp, cfg.stats_BK)
    split = cfg.split or ceil_div(4 * num_sms(dev), n_rb)
    split = max(1, min(split, k_steps))
    cols_per_split = ceil_div(k_steps, split) * cfg.stats_BK
    split = ceil_div(kp, cols_per_split)
    pmax = torch.empty((split, m), device=dev, dtype=torch.float32) if need_amax else None
    plr = torch.empty((split, m, rank), device=dev, dtype=torch.float32) if rank else None
    _act_stats_kernel[(n_rb, split)](
        x, dummy if smooth_recip is None else smooth_recip, dummy if down_folded is None else down_folded,
        dummy if pmax is None else pmax, dummy if plr is None else plr, m, k, kp, x.stride(0), cols_per_split,
        NEED_AMAX=need_amax, HAS_SMOOTH=smooth_recip is not None, RANK=rank, XSPLIT=x.dtype != torch.bfloat16,
        UPCAST=interpreting(), BM=cfg.stats_BM, BK=cfg.stats_BK, num_warps=cfg.stats_warps)
    return split, pmax, plr


def act_quant_two(x, spec, smooth_recip, kp, cfg, down_folded=None, extra=0) -> ActOperand:
    """Launch the two kernels over x (M, K); ``down_folded`` (2, Kp, Rp) bf16 (``fold_down``) or None; ``extra``:
    columns left free after the operand's Kp (``ActOperand.q_ext``)."""
    m, k = x.shape
    dev = x.device
    bk = max(cfg.BK, spec.group)
    g = bk if spec.mode in (INT8_ROW, FP8_ROW) else spec.group  # per-row modes: one "group" per tile
    q, q_ext = operand_buffer(m, kp, extra, spec.operand_dtype, dev)  # 16-byte-aligned rows for the GEMM's TMA
    rs = gs = lr = t = None
    dummy = q
    rank = 0 if down_folded is None else down_folded.shape[2]
    if rank:
        lr = torch.empty((m, rank), device=dev, dtype=torch.float32)
    need_amax = spec.row_pass or spec.outer == 1
    split, pmax, plr = 1, None, None
    if need_amax or rank:
        split, pmax, plr = _stats(x, smooth_recip, down_folded, kp, rank, need_amax, cfg, dummy)
    if spec.row_pass:
        rs = torch.empty((m,), device=dev, dtype=torch.float32)
    if spec.mode == INT4_GROUP:
        gs = torch.empty((kp // g, m), device=dev, dtype=torch.float32)
    if spec.outer == 1:  # nvfp4: t = max(max|X^| / (6 * 448), 2^-126) over the whole tensor
        # div_scalar: CUDA torch divides by a Python float as a product with its reciprocal (last bit differs)
        t = rs = torch.clamp(div_scalar(pmax.amax().reshape(1), 6.0 * 448.0), min=_TINY)
    _act_quant_kernel[(ceil_div(m, cfg.BM), ceil_div(kp, bk))](
        x, dummy if smooth_recip is None else smooth_recip, q,
        dummy if rs is None else rs, dummy if gs is None else gs,
        dummy if pmax is None else pmax, dummy if plr is None else plr, dummy if lr is None else lr,
        dummy if t is None else t,
        m, k, kp, x.stride(0), q.stride(0), 0 if gs is None else gs.stride(0), split,
        MODE=spec.mode, G=g, NG=bk // g, QMAX=float(spec.qmax), EMIN=spec.emin, **_scale_consts(spec),
        OUTER=spec.outer, ROW_PASS=spec.row_pass, HAS_SMOOTH=smooth_recip is not None, RANK=rank,
        HW_ROUND=cfg.hw_round and not interpreting(), BM=cfg.BM, BK=bk, num_warps=cfg.num_warps,
    )
    return ActOperand(q, rs, gs, lr, q_ext)
