"""What PTQD statistics are tied to, and how they travel with a checkpoint.

Statistics measured for one (model, quantization, sampler, steps, guidance scale, eta) do not transfer to
another: k_t, mu_t and sigma_q,t are per step of one timestep schedule, and the trajectories (hence the noise)
change with the sampler and the guidance. ``PTQDSetting`` is that key; ``PTQDStatsMismatch`` is raised, naming
every field that differs, whenever statistics meet a setting they were not measured for.

Persistence: ``attach_stats(q_model, stats)`` files the statistics under
``q_model.fourbit_header["extra"]["ptqd"][setting.key]``; ``fourbit.save`` writes that header into the
checkpoint and ``fourbit.load`` reads it back, after which ``find_stats(q_model, setting)`` returns them.
Everything stored is JSON (lists of floats).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from .stats import PTQDStats

EXTRA_KEY = "ptqd"


class PTQDStatsMismatch(ValueError):
    """PTQD statistics applied to a setting (or model) they were not measured for."""


@dataclass(frozen=True)
class PTQDSetting:
    """The key of a set of PTQD statistics.

    model: a name for the 16-bit model (e.g. "fashion-dit"); quant: ``quant_digest`` of the quantized model
    (its quantization config and 16-bit architecture); sampler "ddim" | "ddpm"; steps; guidance_scale;
    eta (DDPM is stored with eta = 1, as ``StepInfo`` reports it).
    """

    model: str
    quant: str
    sampler: str
    steps: int
    guidance_scale: float
    eta: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", int(self.steps))
        object.__setattr__(self, "guidance_scale", float(self.guidance_scale))
        object.__setattr__(self, "eta", 1.0 if self.sampler == "ddpm" else float(self.eta))

    @property
    def key(self) -> str:
        return (f"{self.model}|{self.quant}|{self.sampler}|steps={self.steps}|"
                f"guidance={self.guidance_scale:g}|eta={self.eta:g}")

    def differences(self, other: "PTQDSetting") -> list[str]:
        """``["steps: 20 (statistics) vs 50 (requested)", ...]``; empty when the settings are the same."""
        out = []
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if a != b:
                out.append(f"{f.name}: {a!r} (statistics) vs {b!r} (requested)")
        return out

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PTQDSetting":
        return cls(**{f.name: d[f.name] for f in fields(cls)})


def quant_digest(q_model: nn.Module) -> str:
    """12 hex digits identifying how ``q_model`` was quantized: its config and its 16-bit architecture.

    Any model without a fourbit header (e.g. a 16-bit model, or one quantized by other means) is "none".
    """
    header = getattr(q_model, "fourbit_header", None)
    if header is None:
        return "none"
    blob = json.dumps({"config": header.get("config"), "architecture": header.get("architecture")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def make_setting(model_name: str, q_model: nn.Module, sampler: str, steps: int, guidance_scale: float,
                 eta: float = 0.0) -> PTQDSetting:
    """The ``PTQDSetting`` of sampling ``q_model`` this way."""
    return PTQDSetting(model_name, quant_digest(q_model), sampler, steps, guidance_scale, eta)


def check_setting(stats_setting: PTQDSetting, requested: PTQDSetting) -> None:
    """Raise ``PTQDStatsMismatch`` naming every difference between the two settings."""
    diff = stats_setting.differences(requested)
    if diff:
        raise PTQDStatsMismatch(
            "PTQD statistics were measured for another setting and cannot be applied: " + "; ".join(diff)
            + ". Collect statistics for this setting (fourbit.ptqd.collect_stats) - they are tied to the model, "
            "its quantization, the sampler, the number of steps, the guidance scale and eta.")


# ---- persistence in the checkpoint header ----------------------------------------------------------------
def attach_stats(q_model: nn.Module, stats: "PTQDStats") -> None:
    """File ``stats`` in ``q_model``'s fourbit header so that ``fourbit.save`` writes them (replacing any
    statistics of the same setting). Refuses statistics of another quantized model."""
    header = getattr(q_model, "fourbit_header", None)
    if header is None:
        raise ValueError("the model has no fourbit header (quantize it with fourbit.quantize first)")
    digest = quant_digest(q_model)
    if stats.setting.quant != digest:
        raise PTQDStatsMismatch(f"these PTQD statistics belong to quantized model {stats.setting.quant}, "
                                f"not to this one ({digest})")
    extra = dict(header.get("extra", {}))
    store = dict(extra.get(EXTRA_KEY, {}))
    store[stats.setting.key] = stats.to_dict()
    extra[EXTRA_KEY] = store
    header["extra"] = extra


def stored_settings(q_model_or_header: Any) -> list[PTQDSetting]:
    """The settings a model (or a checkpoint header from ``fourbit.read_header``) has statistics for."""
    return [PTQDSetting.from_dict(d["setting"]) for d in _store(q_model_or_header).values()]


def find_stats(q_model_or_header: Any, setting: PTQDSetting) -> "PTQDStats":
    """The statistics stored for exactly ``setting``; ``PTQDStatsMismatch`` saying what differs otherwise."""
    from .stats import PTQDStats

    store = _store(q_model_or_header)
    if setting.key in store:
        stats = PTQDStats.from_dict(store[setting.key])
        check_setting(stats.setting, setting)
        return stats
    if not store:
        raise PTQDStatsMismatch("no PTQD statistics are stored with this model; collect them with "
                                "fourbit.ptqd.collect_stats and attach_stats before fourbit.save")
    candidates = [PTQDSetting.from_dict(d["setting"]) for d in store.values()]
    closest = min(candidates, key=lambda s: len(s.differences(setting)))
    raise PTQDStatsMismatch(
        f"no PTQD statistics for {setting.key}; {len(candidates)} stored setting(s), the closest differs in: "
        + "; ".join(closest.differences(setting)) + ". Statistics do not transfer between settings: collect them "
        "for this one.")


def _store(q_model_or_header: Any) -> dict:
    header = q_model_or_header if isinstance(q_model_or_header, dict) else getattr(q_model_or_header, "fourbit_header", None)
    if header is None:
        return {}
    return dict(header.get("extra", {}).get(EXTRA_KEY, {}))
