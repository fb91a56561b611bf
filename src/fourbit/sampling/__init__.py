"""Samplers in plain torch: DDIM (eta) and DDPM ancestral, classifier-free guidance, per-sample seeds and per-step
hooks (``fourbit.sampling.hooks``)."""

from fourbit.sampling.calibration import calibration_forward_loop, sample_plan
from fourbit.sampling.hooks import SamplerHook, StepInfo
from fourbit.sampling.sample import DEFAULT_GUIDANCE_SCALE, NULL_CLASS, guided_eps, sample
from fourbit.sampling.samplers import SAMPLERS, ddim_sigma, step_sigma
from fourbit.sampling.schedule import NoiseSchedule

__all__ = [
    "DEFAULT_GUIDANCE_SCALE",
    "NULL_CLASS",
    "NoiseSchedule",
    "SAMPLERS",
    "SamplerHook",
    "StepInfo",
    "calibration_forward_loop",
    "ddim_sigma",
    "guided_eps",
    "sample",
    "sample_plan",
    "step_sigma",
]
