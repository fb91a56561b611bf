"""The update rules of the samplers: from x_t and the predicted eps to x_{t_prev}.

Both work in the x0-parameterisation: x0_hat = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t), optionally clipped to
[-1, 1] (then eps is recomputed from the clipped x0_hat so that the two stay consistent).
"""

from __future__ import annotations

import math

import torch

SAMPLERS = ("ddim", "ddpm")


def ddim_sigma(alpha_bar_t: float, alpha_bar_prev: float, eta: float) -> float:
    """DDIM's sigma (Song et al. 2021, eq. 16): eta * sqrt((1-ab_prev)/(1-ab_t)) * sqrt(1 - ab_t/ab_prev)."""
    return (
        eta
        * math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t))
        * math.sqrt(max(1 - alpha_bar_t / alpha_bar_prev, 0.0))
    )


def step_sigma(sampler: str, alpha_bar_t: float, alpha_bar_prev: float, eta: float) -> float:
    """The injected-noise std of a step; DDPM's posterior std equals DDIM's at eta = 1."""
    if sampler == "ddpm":
        return ddim_sigma(alpha_bar_t, alpha_bar_prev, 1.0)
    if sampler == "ddim":
        return ddim_sigma(alpha_bar_t, alpha_bar_prev, eta)
    raise ValueError(f"unknown sampler {sampler!r}; known: {', '.join(SAMPLERS)}")


def predict_x0(
    x_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t: float, clip: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (x0_hat, eps), both consistent with x_t; clipping x0_hat to [-1, 1] when ``clip``."""
    x0 = (x_t - math.sqrt(1 - alpha_bar_t) * eps) / math.sqrt(alpha_bar_t)
    if clip:
        x0 = x0.clamp(-1, 1)
        eps = (x_t - math.sqrt(alpha_bar_t) * x0) / math.sqrt(1 - alpha_bar_t)
    return x0, eps


def ddim_update(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    noise: torch.Tensor | None,
    alpha_bar_t: float,
    alpha_bar_prev: float,
    sigma: float,
    clip: bool,
) -> torch.Tensor:
    """x_prev = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - sigma^2) eps + sigma * noise."""
    x0, eps = predict_x0(x_t, eps, alpha_bar_t, clip)
    direction = math.sqrt(max(1 - alpha_bar_prev - sigma**2, 0.0))
    x_prev = math.sqrt(alpha_bar_prev) * x0 + direction * eps
    if sigma > 0:
        x_prev = x_prev + sigma * noise
    return x_prev


def ddpm_update(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    noise: torch.Tensor | None,
    alpha_bar_t: float,
    alpha_bar_prev: float,
    sigma: float,
    clip: bool,
) -> torch.Tensor:
    """Ancestral step: x_prev = mean of q(x_prev | x_t, x0_hat) + sigma * noise (Ho et al. 2020, eq. 7)."""
    x0, _ = predict_x0(x_t, eps, alpha_bar_t, clip)
    beta = 1 - alpha_bar_t / alpha_bar_prev
    c_x0 = math.sqrt(alpha_bar_prev) * beta / (1 - alpha_bar_t)
    c_xt = math.sqrt(1 - beta) * (1 - alpha_bar_prev) / (1 - alpha_bar_t)
    x_prev = c_x0 * x0 + c_xt * x_t
    if sigma > 0:
        x_prev = x_prev + sigma * noise
    return x_prev


UPDATES = {"ddim": ddim_update, "ddpm": ddpm_update}
