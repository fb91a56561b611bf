"""PTQD at inference: one sampler hook for noise correction, variance-schedule calibration and per-step precision.

Correction (every sampler): eps~ = (eps_q - mu_t) / (1 + k_t), which undoes the correlated part
(eps_q ~ (1 + k_t) eps_fp) and the per-channel bias.

Variance-schedule calibration (VSC, only where the sampler injects noise: DDPM, DDIM with eta > 0): the
residual noise left in eps~ has std sigma_q,t / (1 + k_t); it reaches x_{t-1} through the eps coefficient of
the update, so the sampler's own injected noise is reduced by the same variance:

    DDPM: sigma'^2 = sigma^2 - beta_t^2 sigma_q^2 / (alpha_t (1 - alpha_bar_t) (1 + k_t)^2)
    DDIM: lambda  = |sqrt(1 - alpha_bar_prev - sigma^2) - sqrt(alpha_bar_prev (1 - alpha_bar_t) / alpha_bar_t)|
                    / (1 + k_t);   sigma'^2 = sigma^2 - lambda^2 sigma_q^2

floored at 0 (alpha_t = 1 - beta_t with beta_t the effective beta of the strided step). For DDIM the sampler
uses sigma' both for the noise and in the direction term. With sigma = 0 (DDIM, eta = 0) VSC changes nothing.

Step-aware mixed precision: with a schedule (one activation-format label per step), ``before_step`` switches
every quantized layer to that step's format and ``on_eps`` switches them back, and the correction uses that
format's statistics.
"""
from __future__ import annotations

import math
import weakref
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..nn import quantized_layers
from ..sampling.hooks import StepInfo
from .setting import PTQDSetting, PTQDStatsMismatch, check_setting, quant_digest
from .stats import PTQDStats, format_label, model_act_format


def vsc_sigma(step: StepInfo, sigma: float, k: float, sigma_q: float) -> float:
    """The calibrated injected-noise std sigma' of one step (see the module docstring); ``sigma`` unchanged
    (the same float) when nothing is to be absorbed: sigma = 0, sigma_q = 0."""
    if sigma <= 0 or sigma_q == 0:
        return sigma
    ab_t, ab_prev = step.alpha_bar_t, step.alpha_bar_prev
    if step.sampler == "ddpm":
        beta = step.beta_t
        absorbed = beta**2 * sigma_q**2 / ((1 - beta) * (1 - ab_t) * (1 + k) ** 2)
    elif step.sampler == "ddim":
        lam = abs(math.sqrt(max(1 - ab_prev - sigma**2, 0.0)) - math.sqrt(ab_prev * (1 - ab_t) / ab_t)) / (1 + k)
        absorbed = lam**2 * sigma_q**2
    else:
        raise ValueError(f"VSC: unknown sampler {step.sampler!r}")
    if absorbed == 0:
        return sigma
    s2 = sigma**2 - absorbed
    return math.sqrt(s2) if s2 > 0 else 0.0


def correct_eps(eps: torch.Tensor, k: float, mu: Optional[Sequence[float]]) -> torch.Tensor:
    """(eps - mu) / (1 + k) with mu per channel (dim 1) or None; returns ``eps`` itself when both are off."""
    if mu is not None:
        if len(mu) != eps.shape[1]:
            raise ValueError(f"PTQD bias has {len(mu)} channels but eps has {eps.shape[1]}")
        m = torch.tensor(mu, dtype=eps.dtype, device=eps.device).reshape(1, -1, *([1] * (eps.dim() - 2)))
        eps = eps - m
    if k != 0:
        eps = eps / (1 + k)
    return eps


class PTQDHook:
    """Sampler hook applying PTQD with ``stats`` (from ``collect_stats`` or ``find_stats``).

    correlated / bias / variance: the three corrections (the ablation switches them one by one);
    schedule: None - the model runs its own activation format and the statistics of ``stats.base`` apply;
    "auto" - ``stats.schedule`` (step-aware mixed precision); or a list with one format label per step.
    q_model: when given, refused unless ``stats`` were measured for it. Without it, the model the sampler hands
    to ``before_step`` is checked the same way at its first step (statistics of another model are never
    applied unchecked). Each step is checked against the statistics' setting (sampler, steps, guidance, eta, timestep):
    ``PTQDStatsMismatch`` on any difference.
    """

    def __init__(self, stats: PTQDStats, *, correlated: bool = True, bias: bool = True, variance: bool = True,
                 schedule: Union[None, str, Sequence[str]] = None, q_model: Optional[nn.Module] = None) -> None:
        self.stats = stats
        self.correlated, self.bias, self.variance = correlated, bias, variance
        self._checked_models = weakref.WeakSet()  # models found to match stats.setting.quant
        if q_model is not None:
            self._check_model(q_model)
        if schedule == "auto":
            if stats.schedule is None:
                raise ValueError("these statistics have no precision schedule (measure two or more activation "
                                 "formats with collect_stats(act_formats=...))")
            schedule = stats.schedule
        if schedule is not None:
            schedule = list(schedule)
            if len(schedule) != len(stats.timesteps):
                raise ValueError(f"schedule has {len(schedule)} entries for {len(stats.timesteps)} steps")
            for lb in set(schedule):
                stats.for_format(lb)  # KeyError naming the measured formats
        self.schedule = schedule
        self._formats = {lb: stats.formats[lb].format() for lb in set(schedule or ())}
        self._saved: list = []

    # ---- checks -------------------------------------------------------------------------------
    def _check_model(self, model: nn.Module) -> None:
        if model in self._checked_models:
            return
        digest = quant_digest(model)
        if digest != self.stats.setting.quant:
            raise PTQDStatsMismatch(f"these PTQD statistics were measured for quantized model "
                                    f"{self.stats.setting.quant}, not for this one ({digest}): another config or "
                                    f"architecture")
        self._checked_models.add(model)

    def _check(self, step: StepInfo) -> None:
        s = self.stats.setting
        check_setting(s, PTQDSetting(s.model, s.quant, step.sampler, step.num_steps, step.guidance_scale, step.eta))
        if self.stats.timesteps[step.index] != step.t:
            raise PTQDStatsMismatch(f"PTQD statistics are for timestep {self.stats.timesteps[step.index]} at step "
                                    f"{step.index}, the sampler is at {step.t}: another noise schedule")

    def label_at(self, index: int) -> str:
        return self.stats.base if self.schedule is None else self.schedule[index]

    # ---- hook methods -------------------------------------------------------------------------
    def before_step(self, step: StepInfo, model: nn.Module) -> None:
        self._check_model(model)
        self._check(step)
        if self.schedule is None:
            if step.index == 0 and format_label(model_act_format(model)) != self.stats.base:
                raise PTQDStatsMismatch(f"the model's activation format is {format_label(model_act_format(model))!r} "
                                        f"but these statistics are for {self.stats.base!r}")
            return
        fmt = self._formats[self.schedule[step.index]]
        self._saved = [(layer, layer.act_format) for _, layer in quantized_layers(model)]
        for layer, _ in self._saved:
            layer.act_format = fmt

    def restore(self) -> None:
        """Give the quantized layers back the activation formats they had before this step's switch."""
        for layer, old in self._saved:
            layer.act_format = old
        self._saved = []

    def on_eps(self, step: StepInfo, x_t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        self.restore()
        fs = self.stats.formats[self.label_at(step.index)]
        k = fs.k[step.index] if self.correlated else 0.0
        mu = fs.mu[step.index] if self.bias else None
        return correct_eps(eps, k, mu)

    def adjust_sigma(self, step: StepInfo, sigma: float) -> float:
        if not self.variance:
            return sigma
        fs = self.stats.formats[self.label_at(step.index)]
        k = fs.k[step.index] if self.correlated else 0.0
        return vsc_sigma(step, sigma, k, fs.sigma_q[step.index])


def ptqd_hooks(stats: PTQDStats, *, mixed: bool = False, q_model: Optional[nn.Module] = None,
               components: Union[str, dict] = "auto") -> list:
    """The sampler hooks of PTQD (``mixed``: with the step-aware precision schedule).

    components: "paper" - all three corrections (the paper's full PTQD); "validated" - the set that
    ``validate_components`` chose for this mode (ValueError if it was not run); "auto" - validated if a
    validation is stored in ``stats``, else "paper"; or a dict ``{correlated, bias, variance}``.
    """
    from .validate import COMPONENT_SETS, validated_components, validation_mode

    paper = COMPONENT_SETS["correlated+bias+vsc"]
    schedule = "auto" if mixed else None
    if isinstance(components, dict):
        flags = dict(components)
    elif components == "paper":
        flags = dict(paper)
    elif components in ("validated", "auto"):
        flags = validated_components(stats, validation_mode(schedule, stats))
        if flags is None:
            if components == "validated":
                raise ValueError("these PTQD statistics carry no validation for this mode; run "
                                 "fourbit.ptqd.validate_components(fp_model, q_model, stats) first")
            flags = dict(paper)
    else:
        raise ValueError(f"components must be 'auto', 'paper', 'validated' or a dict, got {components!r}")
    return [PTQDHook(stats, schedule=schedule, q_model=q_model, **flags)]
