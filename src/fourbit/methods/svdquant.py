"""SVDQuant (Li et al., 2025): smoothing + 16-bit low-rank branch + 4-bit residual.

For each alpha (fixed or searched over ``cfg.alpha_grid``):
    lambda = smoothing_factors(max|X|, W, alpha);  W^ = W diag(lambda)  (columns = input channels)
    W^ ~= lr_up @ lr_down (rank r, by SVD);  R = W^ - lr_up @ lr_down;  quantize R
and keep the alpha whose layer output error on the calibration rows is smallest (searched with RTN rounding and,
with ``search_split="randomized"``, a randomized rank-r split per candidate, the chosen alpha then split exactly; with
weight_rounding="gptq" the chosen residual is GPTQ-rounded on x / lambda). ``refine_iters`` re-decomposes
W^ - deq(Q(R)) and re-quantizes the new residual, keeping the best iterate.
"""
from __future__ import annotations

import torch

from ..config import SVDQuantConfig
from . import register_method
from .common import (best_of, calibration_rows, low_rank, low_rank_randomized, output_error, padded_absmax,
                     quantize_state, rounding_kwargs, smoothing_factors)


def _decompose(w_hat, lam, cfg, wf, af, rounding, split=low_rank, **info):
    lr_down, lr_up = split(w_hat, cfg.rank) if cfg.rank > 0 else (None, None)
    residual = w_hat if lr_down is None else w_hat - lr_up @ lr_down
    return quantize_state(residual, wf, af, smooth=lam, lr_down=lr_down, lr_up=lr_up, **rounding, **info)


def _refine(w_hat, state, cfg, x, y_ref, rounding):
    """Re-fit the low-rank branch to what the quantized residual misses; keep the best iterate."""
    best = (output_error(state, x, y_ref), state)
    for it in range(cfg.refine_iters):
        deq = state.weight_format.dequantize(state.weight)
        lr_down, lr_up = low_rank(w_hat - deq, cfg.rank)
        state = quantize_state(w_hat - lr_up @ lr_down, state.weight_format, state.act_format,
                               smooth=state.smooth, lr_down=lr_down, lr_up=lr_up, **rounding,
                               **{**state.info, "refine_iter": it + 1})
        best = best_of([best, (output_error(state, x, y_ref), state)])
    return best


@register_method(SVDQuantConfig)
def svdquant(weight, stats, cfg):
    wf, af = cfg.weight_format(), cfg.activation_format()
    x = calibration_rows(stats, weight)
    y_ref = x @ weight.t()
    if not cfg.smooth:
        alphas = [None]
    else:
        alphas = [cfg.alpha] if cfg.alpha is not None else list(cfg.alpha_grid)
    absmax = padded_absmax(stats, weight)
    search_split = low_rank_randomized if cfg.search_split == "randomized" and len(alphas) > 1 else low_rank
    candidates = []
    for alpha in alphas:
        lam = None if alpha is None else smoothing_factors(absmax, weight, alpha)
        w_hat = weight if lam is None else weight * lam
        state = _decompose(w_hat, lam, cfg, wf, af, {}, split=search_split, alpha=alpha)  # searched with RTN
        candidates.append((output_error(state, x, y_ref), state, w_hat))
    err, state, w_hat = min(candidates, key=lambda c: c[0])
    if search_split is not low_rank and cfg.rank > 0:  # the chosen alpha's exact split
        state = _decompose(w_hat, state.smooth, cfg, wf, af, {}, **state.info)
        err = output_error(state, x, y_ref)
    rounding = rounding_kwargs(cfg, stats, weight, state.smooth)  # GPTQ sees the smoothed rows x / lambda
    if rounding:  # GPTQ: re-round the chosen alpha's residual (one GPTQ per layer, not one per alpha)
        state = _decompose(w_hat, state.smooth, cfg, wf, af, rounding, **state.info)
        err = output_error(state, x, y_ref)
    if cfg.refine_iters and cfg.rank > 0:
        err, state = _refine(w_hat, state, cfg, x, y_ref, rounding)
    state.info["calib_rel_error"] = err
    return state
