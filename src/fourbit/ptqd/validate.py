"""Validated PTQD: keep only the correction components that measurably help this quantized model.

PTQD's corrections are derived for eps_q = (1 + k) eps + mu + noise. Where a model's quantization error does not
have that shape, a component can make the samples worse (measured on the bundled W4A4 models, docs/ptqd.md:
eps / (1 + k) hurts LPIPS and FD although it lowers the per-step eps error). ``validate_components`` samples the
quantized model on the statistics trajectories' seeds (never the evaluation seeds) with each candidate set of
components and compares the final images with the 16-bit model's, pair by pair, with LPIPS:

    candidates: none | bias | correlated + bias (PTQD at eta = 0) | correlated + bias + VSC (eta > 0)

A candidate is kept only if it lowers the mean paired LPIPS against "none" by more than ``z`` standard errors of
the paired difference (default 1.96); among those, the lowest mean wins; otherwise no correction is applied.
The decision, with every candidate's numbers, is stored in ``stats.meta["validation"][mode]`` (mode: a format
label for single-width sampling, "auto" for the step-aware schedule), so it travels with the checkpoint, and
``ptqd_hooks(stats, components="auto")`` applies it.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from .stats import PTQDStats

COMPONENT_SETS = {
    "none": dict(correlated=False, bias=False, variance=False),
    "bias": dict(correlated=False, bias=True, variance=False),
    "correlated+bias": dict(correlated=True, bias=True, variance=False),
    "correlated+bias+vsc": dict(correlated=True, bias=True, variance=True),
}


def candidate_sets(stochastic: bool) -> list:
    """The component sets worth sampling: VSC only where the sampler injects noise (else it is a no-op)."""
    names = ["none", "bias", "correlated+bias"]
    return names + ["correlated+bias+vsc"] if stochastic else names


def validation_mode(schedule: Any, stats: PTQDStats) -> str:
    """The key a validation is filed under: "auto" for the stats' schedule, else the single format's label."""
    if schedule == "auto":
        return "auto"
    if schedule is None:
        return stats.base
    labels = set(schedule)
    if len(labels) != 1:
        raise ValueError("validation covers a single format or the statistics' own schedule ('auto')")
    return labels.pop()


@torch.no_grad()
def validate_components(
    fp_model: nn.Module,
    q_model: nn.Module,
    stats: PTQDStats,
    *,
    schedule: Any = None,
    num_samples: Optional[int] = None,
    num_classes: int = 10,
    z: float = 1.96,
    batch_size: int = 64,
    device: Any = None,
    progress: bool = False,
) -> dict:
    """Choose PTQD's components for ``q_model`` by sampling (see the module docstring).

    ``schedule``: None (the model's own format), a format label for every step, or "auto" (the step-aware
    schedule). ``num_samples`` trajectories (default: the statistics' count) on the statistics' seeds.
    Returns the decision ``{"chosen", "components", "candidates": {name: {lpips, diff, se}}, "samples", "seed",
    "z", "metric"}`` and files it in ``stats.meta["validation"]``.
    """
    from ..eval.lpips import lpips
    from ..sampling import sample, sample_plan
    from .hooks import PTQDHook

    s = stats.setting
    n = int(num_samples or stats.num_samples)
    if n < 2:
        raise ValueError(f"validation needs at least 2 samples, got {n}")
    mode = validation_mode(schedule, stats)
    hook_schedule = None if schedule is None else ("auto" if schedule == "auto" else [mode] * len(stats.timesteps))
    classes, seeds = sample_plan(n, stats.seed, num_classes)
    kw = dict(steps=s.steps, sampler=s.sampler, eta=s.eta, guidance_scale=s.guidance_scale, batch_size=batch_size,
              device=device, progress=progress, null_class=num_classes)
    reference = sample(fp_model, classes, seeds, **kw)
    stochastic = s.sampler == "ddpm" or s.eta > 0
    scores = {}
    for name in candidate_sets(stochastic):
        hook = PTQDHook(stats, schedule=hook_schedule, q_model=q_model, **COMPONENT_SETS[name])
        imgs = sample(q_model, classes, seeds, hooks=[hook], **kw)
        scores[name] = lpips(imgs, reference, device=device).double().cpu()  # (n,) per pair
    base = scores["none"]
    candidates, best, best_mean = {}, "none", float(base.mean())
    for name, v in scores.items():
        diff = v - base
        se = float(diff.std(unbiased=True) / math.sqrt(n))  # n >= 2 (checked above)
        mean = float(v.mean())
        candidates[name] = {"lpips": mean, "diff": float(diff.mean()), "se": se}
        if name != "none" and float(diff.mean()) + z * se < 0 and mean < best_mean:
            best, best_mean = name, mean
    decision = {"chosen": best, "components": dict(COMPONENT_SETS[best]), "candidates": candidates, "samples": n,
                "seed": stats.seed, "z": z, "metric": "LPIPS-Alex vs the 16-bit samples of the same seeds"}
    stats.meta.setdefault("validation", {})[mode] = decision
    return decision


def validated_components(stats: PTQDStats, mode: str) -> Optional[dict]:
    """The components ``validate_components`` chose for ``mode``, or None if it was not run for it."""
    v = stats.meta.get("validation", {}).get(mode)
    return None if v is None else dict(v["components"])


def format_validation(decision: dict) -> str:
    """One line: the chosen set and each candidate's paired LPIPS change."""
    parts = [f"{name} {c['diff']:+.4f} (se {c['se']:.4f})" for name, c in decision["candidates"].items()
             if name != "none"]
    return (f"kept: {decision['chosen']} (LPIPS vs 16-bit on {decision['samples']} validation trajectories, "
            f"change vs none: {', '.join(parts)})")
