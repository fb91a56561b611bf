"""``sample()``: DDIM / DDPM sampling with classifier-free guidance, per-sample seeds and per-step hooks."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from fourbit.sampling.hooks import StepInfo, run_adjust_sigma, run_before_step, run_on_eps
from fourbit.sampling.samplers import SAMPLERS, UPDATES, step_sigma
from fourbit.sampling.schedule import NoiseSchedule
from fourbit.utils.progress import Progress

DEFAULT_GUIDANCE_SCALE = 3.0
NULL_CLASS = 10
IMAGE_SHAPE = (1, 28, 28)


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device of the first parameter or buffer (CPU if none); dtype of the first floating one (float32 if none)."""
    tensors = list(model.parameters()) + list(model.buffers())
    device = tensors[0].device if tensors else torch.device("cpu")
    dtype = next((p.dtype for p in tensors if p.is_floating_point()), torch.float32)
    return device, dtype


def guided_eps(
    model: nn.Module,
    x: torch.Tensor,
    t: int,
    classes: torch.Tensor,
    guidance_scale: float,
    null_class: int = NULL_CLASS,
) -> torch.Tensor:
    """eps_uncond + g * (eps_cond - eps_uncond), cond and uncond in one batched forward; g = 1: cond only.

    ``x`` ``(B, C, H, W)`` is cast to the model's dtype for the call; the result is float32.
    """
    _, dtype = _model_device_dtype(model)
    b = x.shape[0]
    if guidance_scale == 1.0:
        tt = torch.full((b,), t, dtype=torch.long, device=x.device)
        return model(x.to(dtype), tt, classes).float()
    tt = torch.full((2 * b,), t, dtype=torch.long, device=x.device)
    y = torch.cat([classes, torch.full_like(classes, null_class)])  # (2B,): cond then uncond
    out = model(torch.cat([x, x]).to(dtype), tt, y).float()  # (2B, C, H, W)
    cond, uncond = out.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def _per_sample_noise(generators: list[torch.Generator], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """One standard-normal draw of ``shape`` from each sample's own CPU generator -> ``(B, *shape)`` on device."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)


def _sample_batch(
    model,
    classes,
    seeds,
    schedule,
    timesteps,
    sampler,
    eta,
    guidance_scale,
    hooks,
    device,
    clip_x0,
    null_class,
    shape,
    bar,
) -> torch.Tensor:
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    x = _per_sample_noise(generators, shape, device)  # (B, C, H, W) float32
    classes = classes.to(device)
    stochastic = sampler == "ddpm" or eta > 0
    update = UPDATES[sampler]
    n = len(timesteps)
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < n else -1
        ab_t, ab_prev = schedule.alpha_bar(t), schedule.alpha_bar(t_prev)
        sigma = step_sigma(sampler, ab_t, ab_prev, eta)
        step = StepInfo(
            index=i,
            num_steps=n,
            t=t,
            t_prev=t_prev,
            alpha_bar_t=ab_t,
            alpha_bar_prev=ab_prev,
            beta_t=1 - ab_t / ab_prev,
            sigma=sigma,
            eta=1.0 if sampler == "ddpm" else eta,
            sampler=sampler,
            guidance_scale=guidance_scale,
        )
        run_before_step(hooks, step, model)
        eps = guided_eps(model, x, t, classes, guidance_scale, null_class)
        eps = run_on_eps(hooks, step, x, eps)
        sigma = run_adjust_sigma(hooks, step, sigma)
        # A stochastic sampler draws noise at every step whatever the hooks return, so each sample's random
        # stream stays aligned across runs with and without hooks; a deterministic one draws only if a hook
        # asks for sigma > 0.
        noise = _per_sample_noise(generators, shape, device) if stochastic or sigma > 0 else None
        x = update(x, eps, noise, ab_t, ab_prev, sigma, clip_x0)
        bar.update()
    return x


@torch.no_grad()
def sample(
    model: nn.Module,
    classes: torch.Tensor | Sequence[int],
    seeds: Sequence[int],
    steps: int = 20,
    sampler: str = "ddim",
    eta: float = 0.0,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    hooks: Sequence[Any] = (),
    batch_size: int = 64,
    device: torch.device | str | None = None,
    progress: bool = False,
    schedule: NoiseSchedule | None = None,
    clip_x0: bool = True,
    null_class: int = NULL_CLASS,
    shape: tuple[int, ...] = IMAGE_SHAPE,
) -> torch.Tensor:
    """Generate one image per (class, seed) pair. Returns float32 ``(N, *shape)`` on CPU, clamped to [-1, 1].

    Sample k starts from noise drawn from ``torch.Generator().manual_seed(seeds[k])`` and draws its per-step
    noise from the same generator, so each image depends only on its own class and seed, never on
    ``batch_size`` or on the other samples. ``guidance_scale`` 1.0 evaluates the conditional model only;
    class ``null_class`` is the unconditional one. ``device`` defaults to the model's. Hooks: see
    ``fourbit.sampling.hooks``. ``progress`` draws a bar on stderr (``FOURBIT_PROGRESS=0`` turns all bars off).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; known: {', '.join(SAMPLERS)}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    classes = torch.as_tensor(classes, dtype=torch.long).reshape(-1)
    seeds = [int(s) for s in seeds]
    if len(seeds) != classes.numel():
        raise ValueError(f"{classes.numel()} classes but {len(seeds)} seeds")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    schedule = schedule or NoiseSchedule()
    device = torch.device(device) if device is not None else _model_device_dtype(model)[0]
    timesteps = schedule.timesteps(steps)
    chunks = [(classes[i : i + batch_size], seeds[i : i + batch_size]) for i in range(0, len(seeds), batch_size)]
    hooks = tuple(hooks)
    with Progress(len(chunks) * steps, desc=f"{sampler} {steps} steps", enabled=progress) as bar:
        out = [
            _sample_batch(model, c, s, schedule, timesteps, sampler, eta, guidance_scale, hooks, device, clip_x0,
                          null_class, tuple(shape), bar).cpu()
            for c, s in chunks
        ]
    if not out:
        return torch.empty(0, *shape)
    return torch.cat(out).clamp(-1, 1)
