"""act_quant's single pass: one program per ``rows`` rows reads whole rows of X, without the low-rank branch.

Row formats walk each row twice in chunks: the row maximum of |X^|, then quantize and store (the second walk hits
L1/L2, so X is read from memory once); formats without a row scale walk once. X may be two column blocks read in
place (a concatenation that was never written). Launcher: ``act_quant_single``; twin: ``act_quant.act_quant_torch``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import amax as _amax, ceil_div, interpreting, next_pow2, operand_buffer, to_e4m3
from .act_spec import FP8_ROW, INT4_GROUP, INT8_ROW, ActOperand
from .act_tiles import _load_blocks, _quant_tile, _row_scale, _scale_consts, _smooth, p2_values_given_max


@triton.jit
def _load_tile(x_ptr, x2_ptr, rsmooth_ptr, xrow, x2row, cols3, rmask, K1, K, Kp, TWO: tl.constexpr,
               HAS_SMOOTH: tl.constexpr):
    """X^ at (BM, NG, G) columns ``cols3`` of the program's rows, fp32 (zeros past K)."""
    xs3 = _load_blocks(x_ptr, x2_ptr, xrow[:, None, None], x2row[:, None, None], cols3, rmask[:, None, None],
                       K1, K, TWO).to(tl.float32)
    if HAS_SMOOTH:
        xs3 = _smooth(xs3, rsmooth_ptr, cols3, Kp)
    return xs3


@triton.jit
def _quant_store(xs, gx, cols, k0, qrow, div, t_one, gs_ptr, rows, rmask, stride_gs, Kp, MODE: tl.constexpr,
                 G: tl.constexpr, NG: tl.constexpr, QMAX: tl.constexpr, EMIN: tl.constexpr, MANT_T: tl.constexpr,
                 S_DROP: tl.constexpr, S_MAX: tl.constexpr, S_SUBQ: tl.constexpr, S_MINN: tl.constexpr,
                 OUTER: tl.constexpr, HW_ROUND: tl.constexpr):
    """Quantize a loaded (BM, NG, G) piece of the rows at columns ``cols`` (from ``k0``) and store its operand;
    gx: its groups' max |X^| (int4p2 / fp4p2 use it; row formats reduced it for the row maximum)."""
    if MODE == 0 or MODE == 1:
        out = to_e4m3(p2_values_given_max(xs, gx, div, MODE, EMIN, MANT_T), HW_ROUND)
    else:
        out = _quant_tile(xs, div, t_one, gs_ptr, rows, rmask, k0, stride_gs, Kp, MODE, G, NG, QMAX, EMIN,
                          MANT_T, S_DROP, S_MAX, S_SUBQ, S_MINN, OUTER, HW_ROUND)
    tl.store(qrow + cols, out, mask=rmask[:, None, None] & (cols < Kp))


@triton.jit
def _act_fused_kernel(
    x_ptr, x2_ptr, rsmooth_ptr, q_ptr, rs_ptr, gs_ptr, t_ptr,
    M, K1, K, Kp, stride_xm, stride_x2m, stride_qm, stride_gs,
    MODE: tl.constexpr, G: tl.constexpr, NG: tl.constexpr, QMAX: tl.constexpr, EMIN: tl.constexpr,
    MANT_T: tl.constexpr, S_DROP: tl.constexpr, S_MAX: tl.constexpr, S_SUBQ: tl.constexpr, S_MINN: tl.constexpr,
    OUTER: tl.constexpr, ROW_PASS: tl.constexpr, HAS_SMOOTH: tl.constexpr, HW_ROUND: tl.constexpr,
    TWO: tl.constexpr, ONE_LOAD: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
):
    """One program per BM whole rows; TWO: X is two column blocks (``_load_blocks``). Row formats: loop 1 over K
    (row maxima of |X^|), loop 2 over K (quantize and store). Other formats: loop 2 only. ONE_LOAD (Kp <= BK): the
    row's one chunk is loaded once, for its maximum and its codes."""
    pid = tl.program_id(0)
    rows = pid * BM + tl.arange(0, BM)
    rmask = rows < M
    xrow = rows.to(tl.int64) * stride_xm
    x2row = rows.to(tl.int64) * stride_x2m
    grp = tl.arange(0, NG)
    el = tl.arange(0, G)
    div = tl.full((BM,), 1.0, tl.float32)
    gx1 = div  # the groups' maxima below (row formats); unused otherwise
    if ONE_LOAD:
        cols1 = grp[None, :, None] * G + el[None, None, :]  # (1, NG, G): the whole padded row
        xs1 = _load_tile(x_ptr, x2_ptr, rsmooth_ptr, xrow, x2row, cols1, rmask, K1, K, Kp, TWO, HAS_SMOOTH)
    if ROW_PASS:
        if ONE_LOAD:
            gx1 = _amax(tl.abs(xs1), 2)  # (BM, NG): the groups' max |X^|, reused by the int4p2 / fp4p2 codes
            amax = _amax(gx1, 1)
        else:
            run = tl.full((BM, BK), 0.0, tl.float32)  # running max |X^| per lane; reduced across the row once
            for k0 in range(0, Kp, BK):
                cols = k0 + tl.arange(0, BK)
                x = _load_blocks(x_ptr, x2_ptr, xrow[:, None], x2row[:, None], cols[None, :], rmask[:, None], K1, K,
                                 TWO)
                xs = x.to(tl.float32)
                if HAS_SMOOTH:
                    xs = _smooth(xs, rsmooth_ptr, cols[None, :], Kp)
                run = tl.maximum(run, tl.abs(xs))
            amax = _amax(run, 1)
        rsc, div = _row_scale(amax, MODE, QMAX, OUTER)
        tl.store(rs_ptr + rows, rsc, mask=rmask)
    t_one = 1.0
    if OUTER == 1:
        t_one = tl.load(t_ptr)
    qrow = q_ptr + rows[:, None, None].to(tl.int64) * stride_qm
    if ONE_LOAD:  # quantized and stored once (no loop to set up)
        _quant_store(xs1, gx1, cols1, 0, qrow, div, t_one, gs_ptr, rows, rmask, stride_gs, Kp, MODE, G, NG, QMAX,
                     EMIN, MANT_T, S_DROP, S_MAX, S_SUBQ, S_MINN, OUTER, HW_ROUND)
    else:
        for k0 in range(0, Kp, BK):
            cols3 = k0 + grp[None, :, None] * G + el[None, None, :]  # (1, NG, G)
            xs3 = _load_tile(x_ptr, x2_ptr, rsmooth_ptr, xrow, x2row, cols3, rmask, K1, K, Kp, TWO, HAS_SMOOTH)
            out = _quant_tile(xs3, div, t_one, gs_ptr, rows, rmask, k0, stride_gs, Kp, MODE, G, NG, QMAX, EMIN,
                              MANT_T, S_DROP, S_MAX, S_SUBQ, S_MINN, OUTER, HW_ROUND)
            tl.store(qrow + cols3, out, mask=rmask[:, None, None] & (cols3 < Kp))


def single_pass_meta(spec, kp, cfg, two=False, has_smooth=True, hw=None) -> dict:
    """The compile-time arguments of ``_act_fused_kernel`` for padded K ``kp`` (its constexprs, ``num_warps``,
    ``num_stages``): what ``act_quant_single`` launches, and what ``probes/act_sass_probe.py`` compiles.
    ``hw``: the GPU's own instructions (default: ``cfg.hw_round`` unless the interpreter runs)."""
    large = cfg.large_k and kp >= cfg.large_k
    bk = (cfg.large_chunk if large else cfg.chunk) or next_pow2(kp)
    if not large and cfg.whole_row_k and bk < kp <= cfg.whole_row_k:
        bk = next_pow2(kp)  # one chunk rather than a second, mostly masked one
    bk = max(bk, spec.group, 16)
    g = bk if spec.mode in (INT8_ROW, FP8_ROW) else spec.group  # per-row modes: one "group" per chunk
    return dict(MODE=spec.mode, G=g, NG=bk // g, QMAX=float(spec.qmax), EMIN=spec.emin, **_scale_consts(spec),
                OUTER=spec.outer, ROW_PASS=spec.row_pass, HAS_SMOOTH=has_smooth,
                HW_ROUND=(cfg.hw_round and not interpreting()) if hw is None else hw, TWO=two,
                ONE_LOAD=cfg.one_load and kp <= bk, BM=cfg.rows, BK=bk,
                num_warps=cfg.large_warps if large else cfg.warps, num_stages=cfg.stages)


def act_quant_single(x, spec, smooth, smooth_recip, kp, cfg, tail=None, extra=0) -> ActOperand:
    """Launch the single pass over x (M, K1) [and ``tail`` (M, K - K1), X's second column block, read in place];
    ``extra``: columns left free after the operand's Kp (``ActOperand.q_ext``)."""
    m, k1 = x.shape
    k = k1 + (0 if tail is None else tail.shape[1])
    dev = x.device
    meta = single_pass_meta(spec, kp, cfg, two=tail is not None, has_smooth=smooth is not None)
    g = meta["G"]
    q, q_ext = operand_buffer(m, kp, extra, spec.operand_dtype, dev)  # 16-byte-aligned rows for the GEMM's TMA
    rs = torch.empty((m,), device=dev, dtype=torch.float32) if spec.row_pass else None
    gs = torch.empty((kp // g, m), device=dev, dtype=torch.float32) if spec.mode == INT4_GROUP else None
    dummy = q
    _act_fused_kernel[(ceil_div(m, cfg.rows),)](
        x, x if tail is None else tail, dummy if smooth is None else smooth_recip, q,
        dummy if rs is None else rs, dummy if gs is None else gs, dummy,
        m, k1, k, kp, x.stride(0), x.stride(0) if tail is None else tail.stride(0), q.stride(0),
        0 if gs is None else gs.stride(0), **meta,
    )
    return ActOperand(q, rs, gs, None, q_ext)
