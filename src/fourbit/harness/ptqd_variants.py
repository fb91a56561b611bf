"""The ``+ptqd`` suffix of harness variants: ``svdquant:w4a8:r32+ptqd``, ``rtn:w4a4+ptqd``, and the mixed
``svdquant:w4a4-8:r32+ptqd`` (activation widths 4 and 8 sharing the 4-bit weights, chosen per step).

For each such variant ``fourbit compare`` quantizes as usual (mixed: with the lowest width), then this post:
measures PTQD statistics on 16-bit trajectories of exactly the evaluation setting (sampler, steps, eta,
guidance) but other seeds, files them in the model's header, prints the precision schedule for mixed variants,
and returns the PTQD hook plus a BOPs counter. Options (variant ``key=value`` tokens):
``ptqd_samples=N`` (default: the harness's ``calib_samples``), ``ptqd_bias=residual|total``,
``ptqd_components=validated|paper``: by default the components are validated on the statistics seeds
(``fourbit.ptqd.validate``: only those that measurably lower LPIPS vs the 16-bit samples are applied);
``paper`` applies all three as the paper does.
Facts go into the report under "ptqd": the setting key, sample count, per-step k / sigma_q / SNR_Q per format,
the schedule, and BOPs of the sampling run.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Any, Optional

from ..config import QuantConfig
from .variants import Variant, register_post
from ..ptqd.hooks import ptqd_hooks
from ..ptqd.mixed import BOPCounter, format_schedule
from ..ptqd.setting import attach_stats
from ..ptqd.stats import DEFAULT_STATS_SEED, PTQDStats, collect_stats
from ..ptqd.validate import format_validation, validate_components


def candidate_formats(variant: Variant, q_model) -> Optional[list]:
    """The activation formats of a mixed variant (``abits`` like "4-8"), built with the model's own config
    (group size etc.) and only the activation width changed; None for a single-width variant."""
    if "-" not in variant.abits:
        return None
    cfg = QuantConfig.from_dict(q_model.fourbit_header["config"])
    widths = [w for w in variant.abits.split("-") if w]
    if len(widths) < 2:
        raise ValueError(f"{variant.name}: a mixed variant needs two or more activation widths, e.g. w4a4-8")
    return [dataclasses.replace(cfg, activations=variant.activation_format(w)).activation_format() for w in widths]


def stats_info(stats: PTQDStats) -> dict:
    """The JSON facts about a statistics run that the reports carry."""
    return {
        "setting": stats.setting.key,
        "samples": stats.num_samples,
        "seed": stats.seed,
        "bias_mode": stats.bias,
        "base_format": stats.base,
        "timesteps": stats.timesteps,
        "snr_f": [None if x == float("inf") else x for x in stats.snr_f],
        "per_format": {lb: {"bits": fs.bits, "k": fs.k, "k_raw": fs.k_raw, "mu": fs.mu, "sigma_q": fs.sigma_q,
                            "snr_q": [None if x == float("inf") else x for x in fs.snr_q], "corr": fs.corr}
                       for lb, fs in stats.formats.items()},
        "schedule": stats.schedule,
        "schedule_text": format_schedule(stats) if stats.schedule else None,
        "validation": stats.meta.get("validation"),
    }


class PTQDPost:
    """The harness post-processor (see the module docstring)."""

    def hooks(self, ctx: Any) -> list:
        from ..models import get_spec

        v, st = ctx.variant, ctx.settings
        q = ctx.q_model
        formats = candidate_formats(v, q)
        n = int(v.options.get("ptqd_samples", st.calib_samples))
        seed = DEFAULT_STATS_SEED
        if seed < st.seed + st.samples and st.seed < seed + n:
            raise ValueError(f"PTQD statistics seeds {seed}..{seed + n - 1} overlap the evaluation seeds "
                             f"{st.seed}..{st.seed + st.samples - 1}; evaluate with other seeds")
        spec = get_spec(st.model)
        stats = collect_stats(ctx.fp_model, q, steps=st.steps, sampler=st.sampler, eta=st.eta,
                              guidance_scale=ctx.guidance_scale, num_samples=n, seed=seed,
                              num_classes=spec.num_classes, act_formats=formats,
                              bias=v.options.get("ptqd_bias", "residual"), model_name=st.model,
                              batch_size=st.batch_size, device=ctx.device, collective=ctx.ranks)
        components = v.options.get("ptqd_components", "validated")
        if components not in ("validated", "paper"):
            raise ValueError(f"{v.name}: ptqd_components must be 'validated' or 'paper', got {components!r}")
        schedule = "auto" if formats else None
        if components == "validated":
            decision = validate_components(ctx.fp_model, q, stats, schedule=schedule, num_classes=spec.num_classes,
                                           batch_size=st.batch_size, device=ctx.device)
            print(f"PTQD validation for {v.name}: {format_validation(decision)}", file=sys.stderr, flush=True)
        attach_stats(q, stats)
        ctx.info.update(stats_info(stats))
        ctx.info["components"] = components
        if stats.schedule:
            print(f"PTQD precision schedule for {v.name} ({st.sampler}, {st.steps} steps, eta {st.eta}):\n"
                  f"  {format_schedule(stats)}", file=sys.stderr, flush=True)
        if st.sampler == "ddim" and st.eta == 0:
            ctx.info["variance_calibration"] = "no-op: DDIM with eta = 0 injects no noise"
        bits = sorted({fs.bits for fs in stats.formats.values()} | {4, 8})
        ctx.info["bops"] = {}
        return ptqd_hooks(stats, mixed=bool(formats), q_model=q, components=components) + [
            BOPCounter(info=ctx.info["bops"], compare_bits=bits)]


register_post("ptqd", PTQDPost(), options=("ptqd_samples", "ptqd_bias", "ptqd_components"))

__all__ = ["PTQDPost", "candidate_formats", "stats_info"]
