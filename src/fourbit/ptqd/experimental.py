"""Experimental: PTQD's noise correction for any denoiser and any sampler loop (a diffusers scheduler, your own).

The bundled sampler (``fourbit.sampling``) runs PTQD with every component (correction, variance-schedule
calibration, step-aware precision). This module needs no sampler of ours: like ``fourbit.quantize`` takes a
``forward_loop``, it takes the loop that calls your denoiser, and it works on the denoiser's output alone.

    from fourbit.ptqd import experimental as ptqd
    stats = ptqd.collect_output_stats(fp_denoiser, q_denoiser, lambda m: pipe(prompts, num_inference_steps=20))
    handle = ptqd.apply_correction(q_denoiser, stats)   # out~ = (out_q - mu_t) / (1 + k_t), per timestep
    images = pipe(prompts, num_inference_steps=20).images
    handle.remove()

Statistics are keyed by the timestep value the denoiser is called with (``timestep=`` keyword or the second
positional argument), so the correction is tied to one scheduler and step count: a call at a timestep that was
not seen is refused. What is left out here: variance-schedule calibration (it needs the sampler's injected noise,
which only DDPM/DDIM with eta > 0 have) and step-aware precision. Experimental because PTQD's own numbers on
fourbit's W4A4 models show the correction hurting as often as helping (docs/ptqd.md): validate on your model.

The decomposition of the paper applies to any prediction (eps, v, flow velocity): out_q = (1 + k_t) out_fp +
mu_t + residual, with k_t the regression coefficient of (out_q - out_fp) on out_fp over all elements, and mu_t the
per-channel mean of what is left.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from .stats import NoiseMoments


def timestep_key(args: tuple, kwargs: dict) -> float:
    """The timestep of one denoiser call as a float key (first element when it is a batch of equal values)."""
    t = kwargs.get("timestep", kwargs.get("t"))
    if t is None and len(args) > 1:
        t = args[1]
    if t is None:
        raise ValueError("PTQD (experimental) needs the denoiser's timestep: call it with timestep=... or as the "
                         "second positional argument")
    t = torch.as_tensor(t).detach().float().reshape(-1)
    if t.numel() > 1 and not bool((t == t[0]).all()):
        raise ValueError("PTQD (experimental) keys statistics by timestep; this call mixes timesteps "
                         f"{sorted(set(t.tolist()))[:4]}: call the denoiser with one timestep per batch")
    return round(float(t[0]), 4)


def _sample_of(output: Any) -> torch.Tensor:
    """The prediction tensor of a denoiser's output (a tensor, a tuple, or an object with ``.sample``)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if isinstance(getattr(output, "sample", None), torch.Tensor):
        return output.sample
    raise TypeError(f"cannot find the prediction in a denoiser output of type {type(output).__name__}")


def _with_sample(output: Any, sample: torch.Tensor) -> Any:
    if isinstance(output, torch.Tensor):
        return sample
    if isinstance(output, tuple):
        return (sample, *output[1:])
    if isinstance(output, list):
        return [sample, *output[1:]]
    output.sample = sample
    return output


def _channels_at_1(x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """(B, ..., C, ...) -> (B, C, ...): the layout ``NoiseMoments`` reads."""
    return x.movedim(channel_dim, 1) if channel_dim % x.dim() != 1 else x


@dataclass
class OutputNoiseStats:
    """Per-timestep correction of one denoiser: ``k[t]`` (float), ``mu[t]`` (one float per channel)."""

    channel_dim: int
    k: dict = field(default_factory=dict)
    mu: dict = field(default_factory=dict)
    sigma_q: dict = field(default_factory=dict)
    corr: dict = field(default_factory=dict)
    calls: dict = field(default_factory=dict)

    def summary(self) -> str:
        rows = [f"{'timestep':>10} {'calls':>5} {'k_t':>8} {'corr':>6} {'sigma_q':>8}"]
        for t in sorted(self.k, reverse=True):
            rows.append(f"{t:>10.4g} {self.calls[t]:>5} {self.k[t]:>8.4f} {self.corr[t]:>6.3f} {self.sigma_q[t]:>8.4f}")
        return "\n".join(rows)


@torch.no_grad()
def collect_output_stats(fp_model: nn.Module, q_model: nn.Module, forward_loop: Callable[[nn.Module], Any], *,
                         channel_dim: int = 1, bias: str = "residual") -> OutputNoiseStats:
    """Run ``forward_loop(q_model)``; at every call of ``q_model`` run ``fp_model`` on the same inputs and gather,
    per timestep, the moments of (out_fp, out_q - out_fp). ``channel_dim``: where the output's channels are
    (1 for (B, C, H, W) latents; -1 for FLUX/SD3-style packed (B, tokens, C) outputs)."""
    if fp_model is q_model:
        raise ValueError("fp_model and q_model are the same module: pass the 16-bit denoiser and the quantized one")
    moments: dict[float, NoiseMoments] = {}
    calls: dict[float, int] = {}

    def record(module, args, kwargs, output):
        key = timestep_key(args, kwargs)
        out_q = _sample_of(output)
        out_fp = _sample_of(fp_model(*args, **kwargs))
        moments.setdefault(key, NoiseMoments()).update(_channels_at_1(out_fp.float(), channel_dim),
                                                      _channels_at_1(out_q.float(), channel_dim))
        calls[key] = calls.get(key, 0) + 1

    handle = q_model.register_forward_hook(record, with_kwargs=True)
    try:
        forward_loop(q_model)
    finally:
        handle.remove()
    if not moments:
        raise ValueError("forward_loop never called the quantized denoiser: it must run q_model (e.g. a pipeline "
                         "whose transformer/unet is q_model)")
    stats = OutputNoiseStats(channel_dim=channel_dim, calls=calls)
    for key, m in moments.items():
        r = m.finalize(bias)
        stats.k[key], stats.mu[key], stats.sigma_q[key], stats.corr[key] = r["k"], r["mu"], r["sigma_q"], r["corr"]
    return stats


def correct_output(out: torch.Tensor, k: float, mu: list, channel_dim: int) -> torch.Tensor:
    """(out - mu) / (1 + k), mu broadcast along ``channel_dim``; in ``out``'s dtype."""
    if len(mu) != out.shape[channel_dim]:
        raise ValueError(f"PTQD statistics have {len(mu)} channels but the output has {out.shape[channel_dim]} "
                         f"along dim {channel_dim}")
    shape = [1] * out.dim()
    shape[channel_dim] = len(mu)
    m = torch.tensor(mu, dtype=torch.float32, device=out.device).reshape(shape)
    return ((out.float() - m) / (1.0 + k)).to(out.dtype)


def apply_correction(q_model: nn.Module, stats: OutputNoiseStats, *, correlated: bool = True,
                     bias: bool = True) -> torch.utils.hooks.RemovableHandle:
    """Correct every output of ``q_model`` with the statistics of its timestep; ``.remove()`` the returned handle
    to stop. A call at a timestep the statistics do not have is refused (other scheduler or step count)."""
    if not (correlated or bias):
        raise ValueError("nothing to apply: correlated=False and bias=False")

    def correct(module, args, kwargs, output):
        key = timestep_key(args, kwargs)
        if key not in stats.k:
            near = ", ".join(f"{t:g}" for t in sorted(stats.k)[:6])
            raise ValueError(f"PTQD statistics have no timestep {key:g} (have {near}, ...): collect them with the "
                             f"same scheduler and number of steps as this run")
        k = stats.k[key] if correlated else 0.0
        mu = stats.mu[key] if bias else [0.0] * len(stats.mu[key])
        return _with_sample(output, correct_output(_sample_of(output), k, mu, stats.channel_dim))

    return q_model.register_forward_hook(correct, with_kwargs=True)


__all__ = ["OutputNoiseStats", "collect_output_stats", "apply_correction", "correct_output", "timestep_key"]
