"""SmoothQuant: migrate activation outliers into the weights with per-channel factors, then RTN.

alpha is fixed or searched per layer over ``cfg.alpha_grid`` to minimise the layer's relative output
error on the calibration rows.
"""
from __future__ import annotations

from ..config import SmoothQuantConfig
from . import register_method
from .common import (best_of, calibration_rows, output_error, padded_absmax, quantize_state, rounding_kwargs,
                     smoothing_factors)


@register_method(SmoothQuantConfig)
def smoothquant(weight, stats, cfg):
    x = calibration_rows(stats, weight)
    y_ref = x @ weight.t()
    absmax = padded_absmax(stats, weight)
    wf, af = cfg.weight_format(), cfg.activation_format()
    candidates = []
    for alpha in ([cfg.alpha] if cfg.alpha is not None else cfg.alpha_grid):
        lam = smoothing_factors(absmax, weight, alpha)
        state = quantize_state(weight * lam, wf, af, smooth=lam, alpha=alpha)  # alpha searched with RTN
        candidates.append((output_error(state, x, y_ref), state))
    err, state = best_of(candidates)
    rounding = rounding_kwargs(cfg, stats, weight, state.smooth)
    if rounding:  # GPTQ re-rounds the chosen alpha's weight on the smoothed rows x / lambda
        state = quantize_state(weight * state.smooth, wf, af, smooth=state.smooth, **rounding, **state.info)
        err = output_error(state, x, y_ref)
    state.info["calib_rel_error"] = err
    return state
