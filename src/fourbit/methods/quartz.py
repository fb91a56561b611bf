"""QuaRTZ (arXiv 2509.26436): 4-bit weights and QuaRTZ activations (8-bit, leading-zero suppressed to 4 bits).

The method is plain once the format exists: weights are rounded (RTN, or GPTQ with
``weight_rounding="gptq"``) into the weight format, and the activations are quantized dynamically per token
by the QuaRTZ format at run time (``fourbit.formats.quartz``). Composition with SVDQuant is
``SVDQuantQuaRTZConfig`` (or ``SVDQuantConfig(activations="quartz")``), handled by the SVDQuant transform.

Harness names (``fourbit compare``): ``quartz:w4a4`` and ``svdquant+quartz:w4a4:r32``, with options
``lzs=16|32``, ``mode=trunc|round``, ``stage1=group|token`` (or ``afmt=NAME``) and ``rounding=rtn|gptq|gptq_static``;
e.g. ``quartz:w4a4:lzs=32:mode=round``.
"""
from __future__ import annotations

from ..config import QuaRTZConfig, SVDQuantQuaRTZConfig
from ..formats.quartz import alias_name
from ..utils import import_optional
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


# ---- harness variants ---------------------------------------------------------------------------
def _activation_name(v) -> str:
    if v.abits != "4":
        raise ValueError(f"{v.name!r}: QuaRTZ activations are 4-bit (a4); got a{v.abits}")
    if "afmt" in v.options:
        return v.options["afmt"]
    opts = v.options
    return alias_name(int(opts.get("lzs", 16)), opts.get("mode", "trunc"), opts.get("stage1", "group"))


def _variant_kwargs(v, exclude) -> dict:
    kw = {**v.common_kwargs(exclude), "activations": _activation_name(v)}
    if "rounding" in v.options:
        kw["weight_rounding"] = v.options["rounding"]
    return kw


def _register_harness_variants() -> None:
    """``quartz:...`` and ``svdquant+quartz:...`` in the harness, when the harness is installed."""
    if not import_optional("fourbit.harness.variants"):
        return
    from ..harness.variants import register_variant_method

    def alpha(v):
        return {"alpha": float(v.options["alpha"])} if "alpha" in v.options else {}

    register_variant_method("quartz", lambda v, ex: QuaRTZConfig(**_variant_kwargs(v, ex)))
    register_variant_method("svdquant+quartz", lambda v, ex: SVDQuantQuaRTZConfig(
        **_variant_kwargs(v, ex), rank=v.rank, **alpha(v)))


_register_harness_variants()
