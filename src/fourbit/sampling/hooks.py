"""Per-step hook point of the samplers.

A hook is any object with some of these methods (all optional), called in the order the hooks are given:

- ``before_step(step, model)``: before the model is evaluated at this step (e.g. switch bit-widths per step);
- ``on_eps(step, x_t, eps) -> eps``: after classifier-free guidance; return the (possibly corrected) eps;
- ``adjust_sigma(step, sigma) -> sigma``: replace the std of the injected noise. For DDIM the new sigma also
  replaces sigma in the direction term sqrt(1 - alpha_bar_prev - sigma^2); for DDPM only the noise changes.

``SamplerHook`` is a no-op base class to subclass for convenience; subclassing is not required.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch


@dataclass(frozen=True)
class StepInfo:
    """One sampling step, going from timestep ``t`` to ``t_prev`` (-1 after the last step).

    ``beta_t`` is the effective beta of the (possibly strided) step, 1 - alpha_bar_t / alpha_bar_prev.
    ``sigma`` is the sampler's own injected-noise std at this step (before any ``adjust_sigma``); ``eta`` is
    DDIM's eta (1.0 for DDPM, whose sigma equals DDIM's at eta = 1).
    """

    index: int
    num_steps: int
    t: int
    t_prev: int
    alpha_bar_t: float
    alpha_bar_prev: float
    beta_t: float
    sigma: float
    eta: float
    sampler: str
    guidance_scale: float

    @property
    def is_last(self) -> bool:
        return self.index == self.num_steps - 1


class SamplerHook:
    """No-op hook; override the methods you need."""

    def before_step(self, step: StepInfo, model: torch.nn.Module) -> None:
        pass

    def on_eps(self, step: StepInfo, x_t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return eps

    def adjust_sigma(self, step: StepInfo, sigma: float) -> float:
        return sigma


def run_before_step(hooks: Iterable[Any], step: StepInfo, model: torch.nn.Module) -> None:
    for h in hooks:
        fn = getattr(h, "before_step", None)
        if fn is not None:
            fn(step, model)


def run_on_eps(hooks: Iterable[Any], step: StepInfo, x_t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    for h in hooks:
        fn = getattr(h, "on_eps", None)
        if fn is not None:
            eps = fn(step, x_t, eps)
            if not isinstance(eps, torch.Tensor):
                raise TypeError(f"{type(h).__name__}.on_eps must return a tensor, got {type(eps).__name__}")
    return eps


def run_adjust_sigma(hooks: Iterable[Any], step: StepInfo, sigma: float) -> float:
    for h in hooks:
        fn = getattr(h, "adjust_sigma", None)
        if fn is not None:
            sigma = float(fn(step, sigma))
            if sigma < 0:
                raise ValueError(f"{type(h).__name__}.adjust_sigma returned a negative sigma {sigma}")
    return sigma
