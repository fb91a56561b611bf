"""``fourbit.quantize``: prepare observers -> run the user's forward loop -> convert layer by layer."""
from __future__ import annotations

import hashlib
import json
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from .calibration import LayerStats, calibrate, select_targets
from .calibration.targets import KEPT_BY_OVERRIDE, Target
from .config import QuantConfig
from .methods import get_transform
from .nn import QuantConv2d, QuantLinear, set_module
from .utils.foreign import guard_foreign_save
from .utils.progress import Progress


@dataclass
class QuantizationReport:
    """What ``quantize`` did: per-layer facts, skipped layers with reasons, timings."""

    config: dict
    layers: dict = field(default_factory=dict)  # name -> {"padded_from": K, "alpha": ..., "calib_rel_error": ...}
    skipped: dict = field(default_factory=dict)  # name -> reason
    calibration_seconds: float = 0.0
    convert_seconds: float = 0.0

    def summary(self) -> str:
        padded = [n for n, l in self.layers.items() if "padded_from" in l]
        lines = [f"fourbit: quantized {len(self.layers)} layers with {self.config['method']} "
                 f"(calibration {self.calibration_seconds:.1f}s, convert {self.convert_seconds:.1f}s)"]
        if padded:
            lines.append(f"  zero-padded input dimension of {len(padded)} layer(s): {', '.join(padded[:8])}"
                         + (" ..." if len(padded) > 8 else ""))
        clipped = [f"{n} ({l['rank_clipped_from']} -> its smaller dimension)" for n, l in self.layers.items()
                   if "rank_clipped_from" in l]
        if clipped:
            lines.append(f"  rank larger than the matrix, cut to min(N, K) in {len(clipped)} layer(s): "
                         + ", ".join(clipped[:8]) + (" ..." if len(clipped) > 8 else ""))
        for name, reason in self.skipped.items():
            lines.append(f"  kept 16-bit: {name}: {reason}")
        return "\n".join(lines)


def architecture_fingerprint(model: nn.Module) -> str:
    """A hash of every parameter/buffer name, shape and the module types: same architecture, same hash."""
    items = [(n, list(t.shape)) for n, t in model.state_dict().items()]
    items += [(n, type(m).__name__) for n, m in model.named_modules()]
    return hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()[:16]


def _layer_weight(target: Target) -> torch.Tensor:
    """The layer's weight as (N, Kp) fp32: convs flattened along Cin*kh*kw, zero-padded to Kp."""
    w = target.module.weight.detach().float().reshape(target.module.weight.shape[0], -1)
    if target.padded_in != target.in_features:
        w = torch.nn.functional.pad(w, (0, target.padded_in - target.in_features))
    return w


def convert_layer(target: Target, stats: Optional[LayerStats], device=None) -> QuantLinear:
    """Quantize one layer with its config's method and build the quantized module."""
    cfg = target.config
    weight = _layer_weight(target)
    if device is not None:
        weight = weight.to(device)
    state = get_transform(cfg)(weight, stats, cfg)
    module = target.module
    dtype = module.weight.dtype
    if isinstance(module, nn.Conv2d):
        new = QuantConv2d.from_conv_state(state, module, kernel=cfg.kernel, dtype=dtype)
    else:
        new = QuantLinear.from_state(state, module.in_features, module.bias, kernel=cfg.kernel, dtype=dtype)
    new.quant_info = state.info
    wanted = getattr(cfg, "rank", 0) or 0
    if 0 < state.rank < wanted:  # a rank beyond min(N, K) is cut to it: reported, not silent
        new.quant_info = {**state.info, "rank_clipped_from": wanted}
    return new.to(module.weight.device)


def quantize(model: nn.Module, config: QuantConfig, forward_loop: Optional[Callable[[nn.Module], None]] = None,
             *, progress: bool = True, verbose: bool = True, convert_device=None, store=None,
             collective=None) -> nn.Module:
    """Quantize ``model`` in place with ``config`` and return it.

    forward_loop(model) runs the model on calibration inputs (a sampler over timesteps and prompts, a loop
    over batches, ...). Methods that need activation statistics (SmoothQuant, SVDQuant) require it.
    On any error during calibration the model is left unchanged. The report is at ``model.fourbit_report``.

    convert_device: where each layer's conversion runs (e.g. "cuda" while the model stays in CPU memory); the
    converted layer returns to the layer's own device. store (optional, makes a run resumable): an object with
    ``load_stats() -> dict | None``, ``save_stats(stats)``, ``load_layer(name) -> module | None`` and
    ``save_layer(name, module)``; cached statistics and layers are used instead of being computed again
    (``fourbit.pipelines.resume.WorkFolder`` is one).
    collective (e.g. ``fourbit.distributed.Ranks``): each process runs its own share of the calibration data in
    ``forward_loop`` and the statistics are merged exactly across processes; every process then converts.
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a fourbit config (e.g. fourbit.SVDQuantConfig()), got {type(config).__name__}")
    if getattr(model, "fourbit_header", None) is not None:
        raise ValueError("this model is already quantized by fourbit; quantize a fresh 16-bit model")
    if store is not None and collective is not None and collective.world_size > 1:
        raise ValueError("a resumable work folder (store) is not shared between processes yet: run the resumable "
                         "quantization in one process, or several processes without store")
    targets, skipped = select_targets(model, config)
    if not targets and any(s.reason == KEPT_BY_OVERRIDE for s in skipped):
        raise ValueError(f"every layer the config selects is kept 16-bit by its overrides ({len(skipped)} layers; "
                         "a precision plan that found no layer faster in low precision does this); nothing to "
                         "quantize")
    if not targets:
        raise ValueError("no layer matched the config's include/exclude patterns; nothing to quantize "
                         f"(include={list(config.include)}, exclude={list(config.exclude)})")
    needs_stats = any(t.config.needs_calibration_data() for t in targets)
    report = QuantizationReport(config.to_dict(), skipped={s.name: s.reason for s in skipped})
    fingerprint = architecture_fingerprint(model)

    stats: dict[str, LayerStats] = {}
    if needs_stats:
        if forward_loop is None:
            raise ValueError(f"{type(config).__name__} needs calibration data: pass forward_loop=fn where "
                             f"fn(model) runs the model on a few representative inputs")
        t0 = time.perf_counter()
        cached = store.load_stats() if store is not None else None
        if cached is not None:
            stats = cached
        else:
            stats = calibrate(model, [t for t in targets if t.config.needs_calibration_data()], forward_loop,
                              max_rows=config.calib_rows, seed=config.seed, collective=collective, progress=progress)
            if store is not None:
                store.save_stats(stats)
        report.calibration_seconds = time.perf_counter() - t0
        _warn_zero_channels(stats, {t.name: t.config for t in targets})

    t0 = time.perf_counter()
    new_modules = {}
    with Progress(len(targets), f"fourbit {config.method}", enabled=progress) as bar:
        for target in targets:
            new = store.load_layer(target.name) if store is not None else None
            if new is not None:
                new = new.to(target.module.weight.device)
            else:
                new = convert_layer(target, stats.get(target.name), device=convert_device)
                if store is not None:
                    store.save_layer(target.name, new)
            new_modules[target.name] = new
            info = dict(new_modules[target.name].quant_info)
            if target.padded_in != target.in_features:
                info["padded_from"] = target.in_features
            report.layers[target.name] = _jsonable(info)
            bar.update(1, note=target.name)
    # swap only once every layer converted: a failure above leaves the model untouched
    for name, new in new_modules.items():
        set_module(model, name, new)
    report.convert_seconds = time.perf_counter() - t0

    model.fourbit_header = {"config": config.to_dict(), "architecture": fingerprint}
    if getattr(model, "fourbit_siblings", None):
        model.fourbit_header["siblings"] = [list(g) for g in model.fourbit_siblings]
    model.fourbit_report = report
    guard_foreign_save(model)
    if verbose:
        print(report.summary(), file=sys.stderr)
    return model


def _warn_zero_channels(stats: dict, configs: dict) -> None:
    """Warn about smoothed layers with input channels that calibration never saw non-zero (lambda set to 1)."""
    zero = {n: (s.zero_channels, s.absmax.numel()) for n, s in stats.items()
            if s.zero_channels and getattr(configs[n], "alpha_grid", None) is not None
            and getattr(configs[n], "smooth", True)}
    if zero:
        shown = ", ".join(f"{n} ({z} of {k})" for n, (z, k) in list(zero.items())[:5])
        warnings.warn(f"fourbit: {len(zero)} layer(s) have input channels that were zero in every calibration row: "
                      f"{shown}{' ...' if len(zero) > 5 else ''}; they are not smoothed (factor 1). If they carry "
                      f"signal at inference, calibrate on more representative inputs", stacklevel=3)


def _jsonable(info: dict) -> dict:
    out = {}
    for k, v in info.items():
        if isinstance(v, torch.Tensor):
            v = v.tolist()
        out[k] = v
    return out
