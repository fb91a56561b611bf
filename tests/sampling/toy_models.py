"""Models with known exact answers for sampler tests."""

import math

import torch
from torch import nn

from fourbit.sampling import NoiseSchedule


class GaussianEps(nn.Module):
    """The exact eps-predictor E[eps | x_t] for data x_0 ~ N(mean, std^2), independently per pixel.

    x_t = sqrt(ab) x_0 + sqrt(1-ab) eps is Gaussian, so
    E[eps | x_t] = sqrt(1-ab) (x_t - sqrt(ab) mean) / (ab std^2 + 1-ab).
    Ignores the class.
    """

    def __init__(self, mean: float, std: float, schedule: NoiseSchedule | None = None) -> None:
        super().__init__()
        self.mean, self.std = mean, std
        self.register_buffer("ab", (schedule or NoiseSchedule()).alphas_cumprod.float())

    def forward(self, x, t, y):
        ab = self.ab[t].reshape(-1, 1, 1, 1)
        return (1 - ab).sqrt() * (x - ab.sqrt() * self.mean) / (ab * self.std**2 + 1 - ab)


class ClassConstant(nn.Module):
    """Returns the class index as a constant image (so cond/uncond halves are told apart); counts calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = []
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, y):
        self.calls.append((x.shape[0], t.clone(), y.clone()))
        return y.float().reshape(-1, 1, 1, 1).expand_as(x) * 0.01 + 0 * x


def exact_eps_for_point(x0: float, schedule: NoiseSchedule):
    """eps-predictor for the single data point x0 (a delta distribution)."""

    class Point(nn.Module):
        def forward(self, x, t, y):
            ab = schedule.alphas_cumprod.float()[t].reshape(-1, 1, 1, 1)
            return (x - ab.sqrt() * x0) / (1 - ab).sqrt()

    return Point()


def sqrt(v):
    return math.sqrt(v)
