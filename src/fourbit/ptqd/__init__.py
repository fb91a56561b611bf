"""PTQD (He et al., NeurIPS 2023) for any fourbit-quantized diffusion model: quantization-noise correction in the
sampler, variance-schedule calibration, and step-aware mixed precision.

    from fourbit.ptqd import collect_stats, ptqd_hooks
    stats = collect_stats(fp_model, q_model, steps=50, sampler="ddim", eta=1.0, guidance_scale=3.0,
                          num_samples=256, act_formats=["int4", "int8"], model_name="fashion-dit")
    print(stats.summary())                       # k_t, sigma_q,t, SNR_Q per format, SNR_F, the schedule
    imgs = sample(q_model, classes, seeds, steps=50, eta=1.0, hooks=ptqd_hooks(stats, mixed=True))
    attach_stats(q_model, stats); fourbit.save(q_model, "q.safetensors")   # stats travel in the header

The pieces: ``stats`` (the statistics pass), ``hooks`` (correction, VSC, per-step precision), ``mixed`` (the
schedule rule and BOPs), ``setting`` (what statistics are tied to, persistence, ``PTQDStatsMismatch``),
``validate`` (keeps only the components that help this model, on the statistics seeds),
The ``+ptqd`` variant suffix and ``fourbit ptqd-ablation`` live in the harness (``fourbit.harness.ptqd_*``).
See docs/ptqd.md.
"""
from .hooks import PTQDHook, correct_eps, ptqd_hooks, vsc_sigma
from .mixed import BOPCounter, choose_schedule, format_schedule
from .setting import (PTQDSetting, PTQDStatsMismatch, attach_stats, check_setting, find_stats, make_setting,
                      quant_digest, stored_settings)
from .stats import DEFAULT_STATS_SEED, FormatStats, NoiseMoments, PTQDStats, collect_stats, format_label
from .validate import COMPONENT_SETS, format_validation, validate_components, validated_components

__all__ = [
    "collect_stats", "PTQDStats", "FormatStats", "NoiseMoments", "DEFAULT_STATS_SEED", "format_label",
    "PTQDHook", "ptqd_hooks", "correct_eps", "vsc_sigma",
    "BOPCounter", "choose_schedule", "format_schedule",
    "PTQDSetting", "PTQDStatsMismatch", "make_setting", "quant_digest", "check_setting", "attach_stats",
    "find_stats", "stored_settings",
    "validate_components", "validated_components", "format_validation", "COMPONENT_SETS",
]
