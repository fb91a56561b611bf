"""QuaRTZ (arXiv 2509.26436): 4-bit weights and QuaRTZ activations (8-bit, leading-zero suppressed to 4 bits).

The method is plain once the format exists: weights are rounded (RTN, or GPTQ with
``weight_rounding="gptq"``) into the weight format, and the activations are quantized dynamically per token
by the QuaRTZ format at run time (``fourbit.formats.quartz``). Composition with SVDQuant is
``SVDQuantQuaRTZConfig`` (or ``SVDQuantConfig(activations="quartz")``), handled by the SVDQuant transform.

Harness names (``fourbit compare``) are registered in ``fourbit.harness.variants``.
"""
from __future__ import annotations

from ..config import QuaRTZConfig, SVDQuantQuaRTZConfig
from . import register_method
from .common import calibration_rows, output_error, quantize_state, rounding_kwargs


@register_method(QuaRTZConfig)
def quartz(weight, stats, cfg):
    state = quantize_state(weight, cfg.weight_format(), cfg.activation_format(),
                           **rounding_kwargs(cfg, stats, weight))
    if stats is not None:  # calibration rows were recorded (GPTQ): report the layer's error on them
        x = calibration_rows(stats, weight)
        state.info["calib_rel_error"] = output_error(state, x, x @ weight.t())
    return state
