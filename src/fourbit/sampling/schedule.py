"""The DDPM noise schedule: q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I), t = 0..T-1."""

from __future__ import annotations

import torch


class NoiseSchedule:
    """Linear betas from ``beta_start`` to ``beta_end`` over ``num_train_timesteps`` steps (Ho et al. 2020).

    Tables are float64 on CPU; scalar helpers return Python floats. ``t = -1`` stands for "before any noise"
    (alpha_bar = 1), the target of the last sampling step.
    """

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> None:
        self.num_train_timesteps = num_train_timesteps
        self.beta_start, self.beta_end = beta_start, beta_end
        self.betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)

    def __repr__(self) -> str:
        return f"NoiseSchedule(T={self.num_train_timesteps}, linear {self.beta_start}..{self.beta_end})"

    def alpha_bar(self, t: int) -> float:
        """alpha_bar_t; 1.0 for t = -1."""
        if t == -1:
            return 1.0
        if not 0 <= t < self.num_train_timesteps:
            raise ValueError(f"timestep {t} outside -1..{self.num_train_timesteps - 1}")
        return float(self.alphas_cumprod[t])

    def timesteps(self, num_steps: int) -> list[int]:
        """``num_steps`` evenly spaced timesteps from T-1 down to 0 (both included when num_steps > 1)."""
        if not 1 <= num_steps <= self.num_train_timesteps:
            raise ValueError(f"num_steps must be in 1..{self.num_train_timesteps}, got {num_steps}")
        if num_steps == 1:
            return [self.num_train_timesteps - 1]
        return torch.linspace(self.num_train_timesteps - 1, 0, num_steps, dtype=torch.float64).round().long().tolist()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise, with ``t`` ``(B,)`` long and x0/noise ``(B, ...)``."""
        ab = self.alphas_cumprod.to(x0.device)[t].to(x0.dtype)  # (B,)
        ab = ab.reshape(-1, *([1] * (x0.ndim - 1)))
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise
