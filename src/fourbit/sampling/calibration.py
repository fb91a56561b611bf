"""The seeding convention of the library and the sampler loop that quantizer calibration runs."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from fourbit.sampling.sample import DEFAULT_GUIDANCE_SCALE, sample


def sample_plan(num_samples: int, seed: int = 0, num_classes: int = 10) -> tuple[torch.Tensor, list[int]]:
    """The convention for N samples: seeds ``seed .. seed+N-1`` and class ``i % num_classes`` for sample i."""
    classes = torch.arange(num_samples, dtype=torch.long) % num_classes
    return classes, list(range(seed, seed + num_samples))


def calibration_forward_loop(
    num_samples: int,
    steps: int,
    sampler: str = "ddim",
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    seed: int = 0,
    num_classes: int = 10,
    eta: float = 0.0,
    batch_size: int = 64,
    hooks: Sequence[Any] = (),
    progress: bool = False,
) -> Callable[[nn.Module], None]:
    """A ``forward_loop(model)`` that samples ``num_samples`` images (classes spread evenly, see ``sample_plan``).

    With ``guidance_scale != 1`` every forward carries the conditional and the unconditional half, so a quantizer
    observing layer inputs sees ``steps`` timesteps, conditional and unconditional. The images are discarded.
    """
    classes, seeds = sample_plan(num_samples, seed, num_classes)

    def forward_loop(model: nn.Module) -> None:
        sample(
            model,
            classes,
            seeds,
            steps=steps,
            sampler=sampler,
            eta=eta,
            guidance_scale=guidance_scale,
            hooks=hooks,
            batch_size=batch_size,
            progress=progress,
        )

    return forward_loop
