"""PTQD's statistics pass: the quantization noise of the predicted eps, step by step, on 16-bit trajectories.

The 16-bit model samples as usual; at every step a sampler hook evaluates the quantized model on the same x_t
(same classes, same guidance) under each candidate activation format, and streams the noise
Delta = eps_q - eps_fp into sums. Nothing of size (samples x image) is kept: per step and format we hold
six sums per channel, and the same six sums per sample and channel.

Per step t (one scalar unless said otherwise), with e = eps_fp and d = Delta over batch, channel and space:

- k_t: least-squares slope of d on e, with a free intercept per channel c (so that the per-channel bias below
  is part of the same fit), pooled over channels: k = sum_c cov_c(e, d) / sum_c var_c(e); clipped at 0.
  With one channel this is an ordinary linear regression over all elements.
- mu_{t,c}: the per-channel bias. ``bias="residual"`` (default, the paper): the mean of the residual
  d - k e, i.e. the intercept of the fit above; ``bias="total"`` (the authors' code): the mean of d itself.
  The two differ by k * mean_c(e), which is small because eps is close to zero-mean.
- sigma_q,t: the mean over samples of the standard deviation (over the sample's elements, n - 1 normalised)
  of the residual noise: d - k e - mu_c with ``bias="residual"`` (the noise the corrected eps still carries);
  d - k e with ``bias="total"`` (the spec's formula and the authors' code). With one channel the two are equal.
- SNR_Q(t) = ||e|| / ||d|| over all samples and elements (a ratio of norms, as in the spec).
- corr: the pooled correlation of e and d (a diagnostic: how much of the noise is "correlated").
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..formats import Format, format_from_spec, make_format
from ..nn import activation_format, quantized_layers
from .setting import PTQDSetting, make_setting

STATS_VERSION = 1
DEFAULT_STATS_SEED = 20_000  # far from the evaluation seeds (0..) and the harness's calibration seeds (10_000..)
BIAS_MODES = ("residual", "total")
SIXTEEN_BIT = "16bit"


def format_label(fmt: Optional[Format]) -> str:
    """The name PTQD files a format's statistics under: the format's registry name, "16bit" for None."""
    return SIXTEEN_BIT if fmt is None else fmt.name


def format_bits(fmt: Optional[Format]) -> int:
    return 16 if fmt is None else int(fmt.code_bits)


def model_act_format(q_model: nn.Module) -> Optional[Format]:
    """The activation format shared by all quantized layers of ``q_model``; ValueError if they differ."""
    layers = [layer for _, layer in quantized_layers(q_model)]
    if not layers:
        raise ValueError("the model has no fourbit quantized layers (quantize it with fourbit.quantize first)")
    specs = {json_key(None if l.act_format is None else l.act_format.spec()) for l in layers}
    if len(specs) > 1:
        raise ValueError(f"the quantized layers use {len(specs)} different activation formats; PTQD's per-format "
                         f"statistics need one format per run (pass act_formats explicitly)")
    return layers[0].act_format


def json_key(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)


# ---- streaming moments of one step and one format -------------------------------------------------------
class NoiseMoments:
    """Streaming sums of (e, d) = (eps_fp, eps_q - eps_fp) for one step; ``update`` per batch, ``finalize`` once."""

    def __init__(self) -> None:
        self.channel: Optional[torch.Tensor] = None  # (C, 6) float64: n, S_e, S_d, S_ee, S_ed, S_dd
        self.per_sample: list[torch.Tensor] = []  # (B, C, 6) float64 per batch: the same sums per sample
        self.per_batch: list[torch.Tensor] = []  # (C, 6) float64 per batch: what ``channel`` added, in order

    @staticmethod
    def _sums(e: torch.Tensor, d: torch.Tensor, dims: tuple) -> torch.Tensor:
        n = torch.full_like(e.sum(dims), math.prod(e.shape[i] for i in dims))
        return torch.stack([n, e.sum(dims), d.sum(dims), (e * e).sum(dims), (e * d).sum(dims), (d * d).sum(dims)], -1)

    @torch.no_grad()
    def update(self, eps_fp: torch.Tensor, eps_q: torch.Tensor) -> None:
        """eps_fp, eps_q: (B, C, ...) predictions for the same inputs."""
        if eps_fp.shape != eps_q.shape or eps_fp.dim() < 2:
            raise ValueError(f"eps_fp {tuple(eps_fp.shape)} and eps_q {tuple(eps_q.shape)} must be equal (B, C, ...)")
        e = eps_fp.detach().double()
        d = eps_q.detach().double() - e
        spatial = tuple(range(2, e.dim()))
        per_bc = self._sums(e, d, spatial) if spatial else self._sums(e[..., None], d[..., None], (2,))  # (B, C, 6)
        self.add_batch(per_bc.cpu(), per_bc.sum(0).cpu())

    def add_batch(self, per_sample: torch.Tensor, channel: torch.Tensor) -> None:
        """Add one batch's sums: ``per_sample`` (B, C, 6) and their sum over the batch ``channel`` (C, 6)."""
        self.channel = channel if self.channel is None else self.channel + channel
        self.per_sample.append(per_sample)
        self.per_batch.append(channel)

    @classmethod
    def from_batches(cls, batches: list) -> "NoiseMoments":
        """The moments of ``[(per_sample, channel), ...]`` in batch order: the same float64 sums, in the same
        order, as one ``update`` per batch (how moments measured on several processes are put together)."""
        out = cls()
        for per_sample, channel in batches:
            out.add_batch(per_sample, channel)
        return out

    def finalize(self, bias: str = "residual") -> dict:
        """{"k", "k_raw", "mu" (per channel), "sigma_q", "snr_q", "corr", "samples"} as Python floats."""
        if bias not in BIAS_MODES:
            raise ValueError(f"bias must be one of {BIAS_MODES}, got {bias!r}")
        if self.channel is None:
            raise ValueError("no predictions were recorded for this step")
        n, se, sd, see, sed, sdd = self.channel.unbind(-1)  # each (C,)
        var_e = (see - se * se / n).sum()
        var_d = (sdd - sd * sd / n).sum()
        cov = (sed - se * sd / n).sum()
        k_raw = float(cov / var_e) if var_e > 0 else 0.0
        k = max(k_raw, 0.0)
        mu = (sd - k * se) / n if bias == "residual" else sd / n
        corr = float(cov / (var_e * var_d).sqrt()) if var_e > 0 and var_d > 0 else 0.0

        ps = torch.cat(self.per_sample)  # (N, C, 6)
        ni, sei, sdi, seei, sedi, sddi = ps.unbind(-1)  # each (N, C)
        # residual per element: r = d - k e - m_c, with m_c = mu_c ("residual": the noise left after the full
        # correction) or 0 ("total": std(Delta - k eps) as in the authors' code; a constant per sample anyway
        # when C = 1, so both give the same sigma_q for one-channel models)
        m = (mu if bias == "residual" else torch.zeros_like(mu))[None]  # (1, C)
        s1 = sdi - k * sei - ni * m  # sum of r per sample and channel
        s2 = sddi - 2 * k * sedi + k * k * seei - 2 * m * (sdi - k * sei) + ni * m * m  # sum of r^2
        n_s, s1, s2 = ni.sum(1), s1.sum(1), s2.sum(1)  # per sample
        var_r = ((s2 - s1 * s1 / n_s) / (n_s - 1).clamp(min=1)).clamp(min=0)
        sigma_q = float(var_r.sqrt().mean())
        snr_q = math.sqrt(float(see.sum() / sdd.sum())) if sdd.sum() > 0 else math.inf
        return {"k": k, "k_raw": k_raw, "mu": mu.tolist(), "sigma_q": sigma_q, "snr_q": snr_q, "corr": corr,
                "samples": int(ps.shape[0])}


# ---- the statistics of one run -----------------------------------------------------------------------------
@dataclass
class FormatStats:
    """Per-step statistics of the quantized model under one activation format (lists indexed by step)."""

    label: str
    spec: Optional[dict]  # Format.spec(); None for 16-bit activations
    bits: int
    k: list
    k_raw: list
    mu: list  # [step][channel]
    sigma_q: list
    snr_q: list
    corr: list

    def format(self) -> Optional[Format]:
        return format_from_spec(self.spec)

    def to_dict(self) -> dict:
        return {"label": self.label, "spec": self.spec, "bits": self.bits, "k": self.k, "k_raw": self.k_raw,
                "mu": self.mu, "sigma_q": self.sigma_q, "snr_q": [_finite(x) for x in self.snr_q], "corr": self.corr}

    @classmethod
    def from_dict(cls, d: dict) -> "FormatStats":
        d = dict(d)
        d["snr_q"] = [math.inf if x is None else x for x in d["snr_q"]]
        return cls(**d)


@dataclass
class PTQDStats:
    """Everything PTQD measured for one setting: per-step statistics for each activation format.

    ``base``: the label of the format the quantized model itself uses (what single-precision correction uses);
    ``schedule``: the step-aware precision schedule (one label per step), when more than one format was measured.
    """

    setting: PTQDSetting
    timesteps: list
    alpha_bar: list  # alpha_bar_t per step
    formats: dict  # label -> FormatStats
    base: str
    bias: str = "residual"
    num_samples: int = 0
    seed: int = DEFAULT_STATS_SEED
    schedule: Optional[list] = None
    version: int = STATS_VERSION
    meta: dict = field(default_factory=dict)

    @property
    def snr_f(self) -> list:
        """SNR_F(t) = alpha_t^2 / sigma_t^2 = alpha_bar_t / (1 - alpha_bar_t) of the noise schedule, per step."""
        return [ab / (1 - ab) if ab < 1 else math.inf for ab in self.alpha_bar]

    def for_format(self, label: str) -> FormatStats:
        try:
            return self.formats[label]
        except KeyError:
            raise KeyError(f"no PTQD statistics for activation format {label!r}; measured: "
                           f"{', '.join(self.formats)}") from None

    def to_dict(self) -> dict:
        return {"version": self.version, "setting": self.setting.to_dict(), "timesteps": self.timesteps,
                "alpha_bar": self.alpha_bar, "base": self.base, "bias": self.bias, "num_samples": self.num_samples,
                "seed": self.seed, "schedule": self.schedule, "meta": self.meta,
                "formats": {k: v.to_dict() for k, v in self.formats.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "PTQDStats":
        if d.get("version", 1) > STATS_VERSION:
            raise ValueError(f"PTQD statistics version {d['version']} is newer than this fourbit reads ({STATS_VERSION})")
        return cls(setting=PTQDSetting.from_dict(d["setting"]), timesteps=list(d["timesteps"]),
                   alpha_bar=list(d["alpha_bar"]), base=d["base"], bias=d.get("bias", "residual"),
                   num_samples=d.get("num_samples", 0), seed=d.get("seed", DEFAULT_STATS_SEED),
                   schedule=d.get("schedule"), version=d.get("version", 1), meta=dict(d.get("meta", {})),
                   formats={k: FormatStats.from_dict(v) for k, v in d["formats"].items()})

    def summary(self) -> str:
        """A per-step text table: t, SNR_F and, per format, k, sigma_q, SNR_Q (and the schedule's choice)."""
        labels = list(self.formats)
        head = f"{'step':>4} {'t':>4} {'SNR_F':>9}" + "".join(
            f" | {lb + ' k':>10} {'sigma_q':>8} {'SNR_Q':>7}" for lb in labels) + (" | use" if self.schedule else "")
        lines = [head, "-" * len(head)]
        for i, t in enumerate(self.timesteps):
            row = f"{i:>4} {t:>4} {self.snr_f[i]:>9.3g}"
            for lb in labels:
                fs = self.formats[lb]
                row += f" | {fs.k[i]:>10.4f} {fs.sigma_q[i]:>8.4f} {fs.snr_q[i]:>7.2f}"
            if self.schedule:
                row += f" | {self.schedule[i]}"
            lines.append(row)
        return "\n".join(lines)


def _finite(x: float) -> Optional[float]:
    return None if math.isinf(x) or math.isnan(x) else x


# ---- the pass ----------------------------------------------------------------------------------------------
class _Recorder:
    """Sampler hook on the 16-bit model: evaluates the quantized model on the same x_t under each format."""

    def __init__(self, q_model, classes, formats, moments, guidance_null_class):
        self.q_model, self.classes, self.formats, self.moments = q_model, classes, formats, moments
        self.null_class = guidance_null_class

    def on_eps(self, step, x_t, eps):
        from ..sampling import guided_eps

        classes = self.classes.to(x_t.device)
        for label, fmt in self.formats.items():
            if fmt is _AS_IS:
                eps_q = guided_eps(self.q_model, x_t, step.t, classes, step.guidance_scale, self.null_class)
            else:
                with activation_format(self.q_model, fmt):
                    eps_q = guided_eps(self.q_model, x_t, step.t, classes, step.guidance_scale, self.null_class)
            self.moments[label][step.index].update(eps, eps_q)
        return eps


_AS_IS = object()  # "the model's own activation formats, no switching"


def _as_format(f: Any) -> Optional[Format]:
    """A Format, a registry name, or None / "16bit" (unquantized activations) -> Format or None."""
    if f is None or f == SIXTEEN_BIT:
        return None
    if isinstance(f, str):
        return make_format(f)
    if not isinstance(f, Format):
        raise TypeError(f"expected a Format, a format name or None, got {type(f).__name__}")
    return f


@torch.no_grad()
def _merge_ranks(collective: Any, moments: dict, num_batches: int) -> dict:
    """Every rank's per-batch sums, back in batch order (batch b was sampled on rank b % world_size)."""
    mine = {label: [list(zip(m.per_sample, m.per_batch)) for m in ms] for label, ms in moments.items()}
    every = collective.gather(mine, "PTQD statistics")
    world = len(every)
    return {label: [NoiseMoments.from_batches([every[b % world][label][step][b // world] for b in range(num_batches)])
                    for step in range(len(ms))] for label, ms in moments.items()}


def collect_stats(
    fp_model: nn.Module,
    q_model: nn.Module,
    *,
    steps: int,
    sampler: str = "ddim",
    eta: float = 0.0,
    guidance_scale: float = 3.0,
    num_samples: int = 64,
    seed: int = DEFAULT_STATS_SEED,
    num_classes: int = 10,
    act_formats: Optional[Sequence[Any]] = None,
    bias: str = "residual",
    model_name: str = "model",
    batch_size: int = 64,
    device: Any = None,
    schedule: Any = None,
    progress: bool = False,
    collective: Any = None,
) -> PTQDStats:
    """Measure PTQD's per-step statistics of ``q_model`` against ``fp_model`` for one sampler setting.

    Samples ``num_samples`` 16-bit trajectories (classes ``i % num_classes``, seeds ``seed ..``: keep them apart
    from evaluation seeds) with exactly the sampler, steps, eta and guidance used at inference, and records the
    guided predictions of both models at every step. ``act_formats``: the activation formats to measure
    (``Format`` objects, registry names, or None for 16-bit); default: the model's own format only. With two or
    more, the step-aware precision schedule is computed too (``PTQDStats.schedule``). ``bias``: "residual"
    (the paper) or "total" (the authors' code), see the module docstring. ``schedule``: a ``NoiseSchedule``
    (default: the library's). Returns ``PTQDStats``; attach them to the model with ``attach_stats``.
    ``collective`` (e.g. ``fourbit.distributed.Ranks``): each process samples its share of the batches (batch
    ``b`` on rank ``b % world_size``) and every process gets the statistics of one process sampling them all,
    bit for bit (the sums are added in batch order).
    """
    from ..sampling import NoiseSchedule, sample, sample_plan

    if bias not in BIAS_MODES:
        raise ValueError(f"bias must be one of {BIAS_MODES}, got {bias!r}")
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2, got {num_samples}")
    base_fmt = model_act_format(q_model)
    base = format_label(base_fmt)
    if act_formats is None:
        formats: dict = {base: _AS_IS}
        specs = {base: None if base_fmt is None else base_fmt.spec()}
    else:
        formats, specs = {}, {}
        for f in act_formats:
            fmt = _as_format(f)
            label = format_label(fmt)
            if label in formats:
                raise ValueError(f"activation format {label!r} given twice")
            formats[label], specs[label] = fmt, (None if fmt is None else fmt.spec())
        if base not in formats:
            base = min(formats, key=lambda lb: format_bits(formats[lb]))
    schedule = schedule or NoiseSchedule()
    timesteps = schedule.timesteps(steps)
    moments = {label: [NoiseMoments() for _ in timesteps] for label in formats}

    classes, seeds = sample_plan(num_samples, seed, num_classes)
    fp_model.eval()
    q_model.eval()
    rank, world = (0, 1) if collective is None else (collective.rank, collective.world_size)
    starts = list(range(0, num_samples, batch_size))
    for i in starts[rank::world]:
        c, s = classes[i : i + batch_size], seeds[i : i + batch_size]
        rec = _Recorder(q_model, c, formats, moments, num_classes)
        sample(fp_model, c, s, steps=steps, sampler=sampler, eta=eta, guidance_scale=guidance_scale, hooks=[rec],
               batch_size=len(s), device=device, progress=progress, schedule=schedule, null_class=num_classes)
    if world > 1:
        moments = _merge_ranks(collective, moments, len(starts))

    per_format = {}
    for label, ms in moments.items():
        rows = [m.finalize(bias) for m in ms]
        fmt = formats[label]
        bits = format_bits(base_fmt if fmt is _AS_IS else fmt)
        per_format[label] = FormatStats(label=label, spec=specs[label], bits=bits,
                                        k=[r["k"] for r in rows], k_raw=[r["k_raw"] for r in rows],
                                        mu=[r["mu"] for r in rows], sigma_q=[r["sigma_q"] for r in rows],
                                        snr_q=[r["snr_q"] for r in rows], corr=[r["corr"] for r in rows])
    stats = PTQDStats(setting=make_setting(model_name, q_model, sampler, steps, guidance_scale, eta),
                      timesteps=list(timesteps), alpha_bar=[schedule.alpha_bar(t) for t in timesteps],
                      formats=per_format, base=base, bias=bias, num_samples=num_samples, seed=seed)
    if len(per_format) > 1:
        from .mixed import choose_schedule

        stats.schedule = choose_schedule(stats)
    return stats
