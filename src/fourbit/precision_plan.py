"""``plan_precision``: keep 4 bits only where they pay, by timing each layer's shape on this GPU.

On Hopper a W4A4 layer runs its GEMM on the FP8 tensor cores after a separate activation pass; at small layers
(K, N ~ 1152, PixArt-Sigma's attention projections) that pass costs more than the FP8 GEMM saves and the layer is
slower than bf16 (``docs/kernels.md``). A plan records the rows every quantizable layer is called with (one run of
``forward_loop``), times each distinct layer shape in bf16 and in each candidate precision side by side (CUDA
graphs, interleaved medians, random weights: the kernels' speed does not depend on the values), and keeps, per
layer, the first candidate that is at least ``min_speedup`` times faster than bf16 at the layer's own row counts, or
16 bits if none is. The result is a config (``plan.config``) whose per-layer overrides say so; quantize with it::

    plan = fourbit.plan_precision(model, cfg, forward_loop, fallbacks=[{"weights": "fp8", "activations": "fp8"}])
    print(plan.summary())
    fourbit.quantize(model, plan.config, forward_loop)

With ``kernels=("triton", "triton-cublas")`` each precision is timed with its GEMM on Triton and on cuBLAS, and a
layer that pays keeps the faster kernel (a per-layer ``kernel`` override). Any model: the plan reads only module
types, the rows they are called with and the activation (GELU, SiLU) a linear's output, or a column slice of it
(a sibling group's member), goes straight into (``nn/output_activations.py``). Such a layer is timed with its
activation as a compiled model runs it: 16-bit and "triton-cublas" with the activation after the layer, "triton"
with it in the GEMM epilogue (the fusion pass's rewrite). Otherwise each layer is timed alone (other neighbours,
e.g. a concatenated input, are not), so the plan is a per-layer estimate; time the whole model to judge the mix.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import functools
import glob
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from .calibration.targets import select_targets
from .config import QuantConfig
from .nn.output_activations import OutputActivationSpy
from .nn.rows import output_rows, record_calls
from .utils.files import atomic_write, check_output_file, check_readable_file

SIXTEEN_BIT = "16-bit"
PLAN_VERSION = 1


def exact_pattern(name: str) -> str:
    """An fnmatch pattern matching exactly ``name`` (``*``, ``?`` and ``[`` escaped; fnmatch's syntax is glob's)."""
    return glob.escape(name)


def describe_changes(changes: dict) -> str:
    """A candidate's label: 'config' for the config itself, else its field changes ('weights=fp8, ...')."""
    return ", ".join(f"{k}={v}" for k, v in changes.items()) or "config"


@dataclass
class LayerPlan:
    """One layer: its shape, the rows it was called with, the measured times and the choice."""

    name: str
    in_features: int
    out_features: int
    rows: dict  # rows per call -> number of calls seen
    ms: dict = field(default_factory=dict)  # candidate label -> ms over all recorded calls (16-bit included)
    errors: dict = field(default_factory=dict)  # candidate label -> why it could not be timed
    choice: str = SIXTEEN_BIT
    activation: Optional[list] = None  # [kind, lo, hi]: the activation on output columns [lo, hi), timed with it

    def speedup(self, label: str) -> float:
        """bf16 time / ``label``'s time over the recorded calls (nan if either is missing)."""
        base, t = self.ms.get(SIXTEEN_BIT), self.ms.get(label)
        return base / t if base and t else float("nan")


@dataclass
class PrecisionPlan:
    """What ``plan_precision`` measured and chose; ``config`` is the input config with the choices as overrides."""

    config: QuantConfig
    candidates: list  # labels, in order of preference (16-bit last); with kernels "<precision> @ <kernel>"
    layers: list  # LayerPlan
    untimed: dict  # name -> why the layer was not timed (it keeps the config's choice)
    min_speedup: float
    environment: dict
    prefer: str = "first"  # "first": the first precision that pays; "fastest": the fastest that pays

    def counts(self) -> dict:
        """{label: number of layers that chose it}."""
        out: dict = {}
        for layer in self.layers:
            out[layer.choice] = out.get(layer.choice, 0) + 1
        return out

    def estimated_speedup(self) -> float:
        """bf16 time of the timed layers / their time with the chosen precisions (per-layer sums)."""
        base = sum(layer.ms.get(SIXTEEN_BIT, 0.0) for layer in self.layers)
        chosen = sum(layer.ms.get(layer.choice, 0.0) for layer in self.layers)
        return base / chosen if chosen else float("nan")

    def summary(self) -> str:
        env = self.environment
        lines = [f"fourbit precision plan on {env.get('device')} (torch {env.get('torch')}, {env.get('date')}): "
                 f"{len(self.layers)} layers timed, min speedup {self.min_speedup:g}x over bf16, "
                 f"{'the fastest' if self.prefer == 'fastest' else 'the first'} precision that pays kept"]
        head = ["layer", "rows x K x N"] + [f"{c} ms" for c in [SIXTEEN_BIT] + self.candidates[:-1]] + ["choice"]
        lines.append(" | ".join(head))
        for layer in self.layers:
            rows = " + ".join(f"{m}" if n == 1 else f"{m} ({n} calls)" for m, n in sorted(layer.rows.items()))
            act = ""
            if layer.activation:
                kind, lo, hi = layer.activation
                act = f" + {kind}" + ("" if (lo, hi) == (0, layer.out_features) else f" on columns {lo}:{hi}")
            cells = [layer.name, f"{rows} x {layer.in_features} x {layer.out_features}{act}"]
            for label in [SIXTEEN_BIT] + self.candidates[:-1]:
                t = layer.ms.get(label)
                cells.append("-" if t is None else f"{t:.4f}" + ("" if label == SIXTEEN_BIT
                                                                 else f" ({layer.speedup(label):.2f}x)"))
            cells.append(layer.choice)
            lines.append(" | ".join(cells))
        counts = ", ".join(f"{label}: {n}" for label, n in self.counts().items())
        lines.append(f"chosen: {counts}; timed layers together {self.estimated_speedup():.2f}x bf16 (sum of "
                     f"per-layer times, not a model measurement)")
        failed: dict = {}  # (candidate, reason) -> layers
        for layer in self.layers:
            for label, why in layer.errors.items():
                failed.setdefault((label, why), []).append(layer.name)
        for (label, why), names in failed.items():
            lines.append(f"{label} could not be timed on {len(names)} layer(s) (e.g. {names[0]}): {why}")
        for name, why in self.untimed.items():
            lines.append(f"not timed (keeps the config's choice): {name}: {why}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"version": PLAN_VERSION, "config": self.config.to_dict(), "candidates": self.candidates,
                "min_speedup": self.min_speedup, "prefer": self.prefer, "environment": self.environment,
                "untimed": self.untimed,
                "layers": [dict(dataclasses.asdict(layer), rows={str(m): n for m, n in layer.rows.items()})
                           for layer in self.layers]}

    def save(self, path: Union[str, Path]) -> Path:
        """Write the plan as JSON (atomic)."""
        path = check_output_file(path)
        return atomic_write(path, (json.dumps(self.to_dict(), indent=1) + "\n").encode())

    @classmethod
    def load(cls, path: Union[str, Path]) -> "PrecisionPlan":
        path = check_readable_file(path)
        try:
            d = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not a fourbit precision plan (not JSON: {err})") from None
        if not isinstance(d, dict) or d.get("version") != PLAN_VERSION or "layers" not in d:
            raise ValueError(f"{path}: not a fourbit precision plan of version {PLAN_VERSION} "
                             f"(write one with fourbit.plan_precision(...).save(path))")
        return cls.from_dict(d)

    @classmethod
    def from_dict(cls, d: dict) -> "PrecisionPlan":
        """The plan ``to_dict`` describes (e.g. sent from another process)."""
        layers = [LayerPlan(**dict(layer, rows={int(m): n for m, n in layer["rows"].items()}))
                  for layer in d["layers"]]
        return cls(QuantConfig.from_dict(d["config"]), list(d["candidates"]), layers, dict(d["untimed"]),
                   float(d["min_speedup"]), dict(d["environment"]), d.get("prefer", "first"))


def _environment(device) -> dict:
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"device": name, "date": _dt.date.today().isoformat(), "torch": torch.__version__,
            "triton": triton_version, "cuda": torch.version.cuda}


class _FollowedBy:
    """``layer`` then ``act``: in its GEMM epilogue (``fused``: as the fusion pass runs a "triton" layer) or after
    it."""

    def __init__(self, layer: nn.Module, act, fused: bool):
        self.layer, self.act, self.fused = layer, act, fused

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            from .kernels.compiled import forward_with_activation

            return forward_with_activation(self.layer, x, self.act)
        from .kernels.activation import apply_rounded

        return apply_rounded(self.layer(x), self.act)


class _ShapeTimer:
    """Times one layer shape in bf16 and in each candidate config, for each call key asked (a linear's rows, a
    convolution's input shape), by quantizing a random layer of that shape once per candidate."""

    def __init__(self, module: nn.Module, device, dtype, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.module = module.to(dtype)  # nn.Linear or nn.Conv2d, 16-bit, random weights
        with torch.no_grad():
            w = self.module.weight
            w.copy_(torch.randn(w.shape, generator=gen) / math.sqrt(w[0].numel()))
            if self.module.bias is not None:
                self.module.bias.copy_(torch.randn(self.module.bias.shape, generator=gen) * 0.1)
        self.module.to(device)
        self.conv = isinstance(module, nn.Conv2d)
        self.device, self.dtype, self.gen = device, dtype, gen
        self.layers: dict = {}

    def inputs(self, call, count: int) -> list:
        """``count`` random inputs of one call: ``call`` is a linear's rows or a convolution's input shape."""
        shape = tuple(call) if self.conv else (call, self.module.in_features)
        return [torch.randn(shape, generator=self.gen).to(self.dtype).to(self.device) for _ in range(count)]

    def _calibration_call(self, calls: Sequence):
        if self.conv:
            return min(calls, key=math.prod)
        return min(256, max(calls))

    def run(self, layer: nn.Module, activation: Optional[tuple]) -> Callable:
        """What is timed for a module (the 16-bit one or a quantized twin), called as ``fn(x)``: the module, with
        ``activation`` after it, or in its GEMM epilogue where the fusion pass puts it there (``kernels.EPILOGUE_KERNELS``)."""
        if activation is None or self.conv:
            return layer
        from .kernels import EPILOGUE_KERNELS
        from .kernels.activation import OutputActivation

        return _FollowedBy(layer, OutputActivation(*activation), getattr(layer, "kernel", None) in EPILOGUE_KERNELS)

    def layer(self, label: str, cfg: QuantConfig, calls: Sequence) -> nn.Module:
        """The quantized twin of ``self.module`` for ``cfg`` (built once), kernels prepared for ``calls``."""
        if label not in self.layers:
            from .api import quantize
            from .nn.prepare import prepare_kernels

            holder = nn.Sequential(copy.deepcopy(self.module))
            calib = self.inputs(self._calibration_call(calls), 1)[0]
            single = dataclasses.replace(cfg, include=("*",), exclude=(), overrides={})
            quantize(holder, single, forward_loop=lambda m: m(calib), progress=False, verbose=False)
            widest = self.inputs(max(calls, key=lambda c: math.prod(c) if self.conv else c), 1)[0]
            prepare_kernels(holder, forward_loop=lambda m: m(widest))
            self.layers[label] = holder[0]
        return self.layers[label]


def _check_kernels(kernel: Optional[str], kernels: Sequence[str]) -> list:
    """``kernels`` as a list of known, distinct kernel names (refused together with ``kernel``)."""
    from .kernels import available_kernels

    if isinstance(kernels, str):
        raise TypeError(f"kernels is a sequence of kernel names, e.g. ('triton', 'triton-cublas'); got {kernels!r}")
    kernels = list(kernels)
    if kernels and kernel is not None:
        raise ValueError("give kernel (one kernel timed) or kernels (each timed, the fastest kept per layer), not both")
    unknown = [k for k in kernels if k not in available_kernels()]
    if unknown or len(set(kernels)) != len(kernels):
        raise ValueError(f"kernels must be distinct kernel names ({', '.join(available_kernels())}); got {kernels}")
    return kernels


def _choose(lp: "LayerPlan", options: dict, tiers: list, min_speedup: float, prefer: str = "first") -> str:
    """The first precision (tier) whose fastest kernel is ``min_speedup`` x faster than bf16 (``prefer="fastest"``:
    the fastest of all that are): that label; else 16 bits."""
    if prefer == "fastest":
        paying = [label for label in options if label in lp.ms and lp.speedup(label) >= min_speedup]
        return min(paying, key=lambda label: lp.ms[label]) if paying else SIXTEEN_BIT
    for tier in tiers:
        timed = [label for label, (t, _, _) in options.items() if t == tier and label in lp.ms]
        if timed:
            best = min(timed, key=lambda label: lp.ms[label])
            if lp.speedup(best) >= min_speedup:
                return best
    return SIXTEEN_BIT


def _timed_targets(model: nn.Module, config: QuantConfig) -> dict:
    """{name: Target} for the layers ``config`` quantizes."""
    targets, _ = select_targets(model, config)
    if not targets:
        raise ValueError("no layer matched the config's include/exclude patterns; nothing to plan")
    return {t.name: t for t in targets}


def _spatial(m: nn.Module) -> bool:
    """A convolution: timed as one, at its input shapes (fourbit's layer runs im2col on its NCHW input, even at 1x1)."""
    return isinstance(m, nn.Conv2d)


def _call_key(mod: nn.Module, args: tuple, out: torch.Tensor):
    """What one call's timing depends on: a convolution's input shape, else the rows (``output_rows``)."""
    return tuple(args[0].shape) if _spatial(mod) else output_rows(mod, args, out)


def _rows_of(mod: nn.Module, call) -> int:
    """The rows (batch x output positions) of a call key."""
    if not _spatial(mod):
        return call
    b, _, h, w = call
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = mod.kernel_size, mod.stride, mod.padding, mod.dilation
    return b * ((h + 2 * ph - dh * (kh - 1) - 1) // sh + 1) * ((w + 2 * pw - dw * (kw - 1) - 1) // sw + 1)


def _shape_key(t, activation: Optional[tuple] = None) -> tuple:
    """(K, N, geometry, bias, weight dtype, per-layer config as JSON, activation after it): what a layer's timings
    depend on (K: the input features a row has, Cin x kh x kw for a convolution)."""
    m = t.module
    if isinstance(m, nn.Linear):
        k, n, geometry = m.in_features, m.out_features, None
    else:
        k, n = m.in_channels * m.kernel_size[0] * m.kernel_size[1], m.out_channels
        geometry = (m.in_channels, m.kernel_size, m.stride, m.padding, m.dilation) if _spatial(m) else None
    return (k, n, geometry, m.bias is not None, m.weight.dtype,
            json.dumps(t.config.to_dict(), sort_keys=True, default=str), activation)


def _twin_module(key: tuple) -> nn.Module:
    """A 16-bit module of ``_shape_key``'s shape: an ``nn.Linear``, or an ``nn.Conv2d`` of its geometry."""
    k, n, geometry, bias = key[:4]
    if geometry is None:
        return nn.Linear(k, n, bias=bias)
    cin, ks, stride, padding, dilation = geometry
    return nn.Conv2d(cin, n, ks, stride=stride, padding=padding, dilation=dilation, bias=bias)


def _reason(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"[:300]


def _time(timer, variants: dict, errors: dict) -> dict:
    """``timer(variants)`` without gradients; if it fails, bf16 alone, then each candidate beside bf16, so that one
    candidate that cannot be timed (e.g. not capturable in a CUDA graph) is recorded in ``errors`` instead of ending
    the plan (bf16 itself failing does end it: there is nothing to compare with)."""
    errs = (RuntimeError, ValueError, NotImplementedError)
    with torch.no_grad():
        try:
            return timer(variants)
        except errs:
            pass
        out = timer({SIXTEEN_BIT: variants[SIXTEEN_BIT]})
        for label, calls in variants.items():
            if label != SIXTEEN_BIT:
                try:
                    out[label] = timer({SIXTEEN_BIT: variants[SIXTEEN_BIT], label: calls})[label]
                except errs as err:
                    errors[label] = _reason(err)
        return out


def plan_precision(model: nn.Module, config: QuantConfig, forward_loop: Callable[[nn.Module], None], *,
                   fallbacks: Sequence[dict] = (), min_speedup: float = 1.0, kernel: Optional[str] = None,
                   kernels: Sequence[str] = (), device=None, rounds: int = 20, inputs_per_shape: int = 3,
                   timer: Optional[Callable[[dict], dict]] = None, progress: bool = True,
                   prefer: str = "first") -> PrecisionPlan:
    """Time every layer ``config`` would quantize, at the rows ``forward_loop`` calls it with, in bf16, in
    ``config`` and in each of ``fallbacks`` (field changes, e.g. ``{"weights": "fp8", "activations": "fp8"}``);
    keep per layer the first of config, fallbacks... that is ``min_speedup`` x faster than bf16, else 16 bits
    (``prefer="fastest"``: the fastest of those that are, e.g. fp8 over a slower 4-bit layer; "first" puts bits
    before speed).

    kernel: the kernel timed (default ``config.kernel``; "triton" for the GPU kernels); the planned config keeps
    ``config.kernel``. Set the GEMM backend (``fourbit.nn.set_gemm_backend``) as the model will run. kernels:
    instead of one kernel, several (e.g. ``("triton", "triton-cublas")``: the GEMM on Triton or on cuBLAS): each
    precision is timed under each, a precision pays if its fastest kernel does, and a planned layer gets that
    kernel (an override where it is not the layer's ``config.kernel``). device: where
    to time (default: the model's). timer: {label: [calls]} -> {label: ms per call}, each call a
    ``functools.partial(layer, x)`` (default: CUDA graphs replayed in alternation, medians of ``rounds``; wall
    clock on a CPU, where the reference kernels are timed). The model is not changed; the layers are timed as
    plain linears of their shape, convolutions as a convolution of their geometry at each input shape seen (fourbit's
    im2col layer against the 16-bit ``nn.Conv2d``)."""
    from .utils.progress import Progress
    from .utils.timing import time_side_by_side

    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a fourbit config (e.g. fourbit.SVDQuantConfig()), got {type(config).__name__}")
    if getattr(model, "fourbit_header", None) is not None:
        raise ValueError("this model is already quantized by fourbit; plan on the 16-bit model, then quantize it")
    if not min_speedup > 0:
        raise ValueError(f"min_speedup must be > 0 (1.0: at least as fast as bf16), got {min_speedup}")
    if prefer not in ("first", "fastest"):
        raise ValueError(f"prefer must be 'first' (the first precision that pays) or 'fastest', got {prefer!r}")
    candidates = [{}] + [dict(f) for f in fallbacks]
    for changes in candidates[1:]:
        if not changes or "keep" in changes:
            raise ValueError(f"a fallback is a dict of config field changes (e.g. {{'weights': 'fp8', "
                             f"'activations': 'fp8'}}); 16 bits is always the last resort; got {changes!r}")
        dataclasses.replace(config, **changes)  # an invalid fallback fails here, with the config's message
    kernels = _check_kernels(kernel, kernels)
    tiers = [describe_changes(c) for c in candidates]  # precisions, in order of preference
    # what is timed: each precision under each kernel (label -> (its tier, field changes, kernel or None))
    options = {(t if not kernels else f"{t} @ {kern}"): (t, c, kern)
               for t, c in zip(tiers, candidates) for kern in (kernels or [None])}
    labels = list(options)
    device = torch.device(device) if device is not None else next(iter(model.parameters())).device
    timed_kernels = kernels or [kernel or config.kernel]
    if timer is None and device.type != "cuda" and any(k.startswith("triton") for k in timed_kernels):
        raise ValueError(f"the Triton kernels ({', '.join(timed_kernels)}) run on CUDA GPUs and this plan would time "
                         f"them on {device}: move the model to the GPU (or pass device='cuda'), or time "
                         f"kernel='reference' here")
    timed, untimed = _timed_targets(model, config), {}
    spy = OutputActivationSpy({n: t.module for n, t in timed.items() if isinstance(t.module, nn.Linear)})

    def watched(m):
        with spy:
            forward_loop(m)
    calls = record_calls(model, {n: t.module for n, t in timed.items()}, watched, _call_key)
    activations = spy.kinds()
    for name in [n for n, c in calls.items() if not c]:
        untimed[name] = "not called by forward_loop"
        del timed[name]
    timer = timer or (lambda variants: time_side_by_side(variants, rounds=rounds, device=device))

    # layers of one shape (``_shape_key``) share one quantized twin and its measurements
    groups: dict = {}
    for name, t in timed.items():
        groups.setdefault(_shape_key(t, activations.get(name)), []).append(name)
    results: dict = {}  # (shape key, call key) -> {label: ms per call}
    errors: dict = {}  # shape key -> {label: why}
    work = sum(len({c for n in names for c in calls[n]}) for names in groups.values())
    with Progress(work, "fourbit precision plan", enabled=progress) as bar:
        for i, (key, names) in enumerate(groups.items()):
            k, n, dtype = key[0], key[1], key[4]
            layer_cfg = timed[names[0]].config
            if kernel is not None:
                layer_cfg = dataclasses.replace(layer_cfg, kernel=kernel)
            seen = sorted({c for name in names for c in calls[name]})
            st = _ShapeTimer(_twin_module(key), device, dtype, seed=layer_cfg.seed + i)
            layers, errors[key] = {}, {}
            for label, (_, changes, kern) in options.items():
                try:
                    changes = changes if kern is None else {**changes, "kernel": kern}
                    layers[label] = st.layer(label, dataclasses.replace(layer_cfg, **changes), seen)
                except (ValueError, RuntimeError, NotImplementedError) as err:
                    errors[key][label] = _reason(err)
            for c in seen:
                xs = st.inputs(c, inputs_per_shape)
                runs = {SIXTEEN_BIT: st.run(st.module, key[-1])}
                runs.update({label: st.run(layer, key[-1]) for label, layer in layers.items()})
                variants = {label: [functools.partial(fn, x) for x in xs] for label, fn in runs.items()}  # .args: (x,)
                results[key, c] = _time(timer, variants, errors[key])
                bar.update(1, note=f"{'x'.join(map(str, c)) if isinstance(c, tuple) else c} x {k} x {n}")
            del st, layers

    plan_layers = []
    overrides = {}
    for key, names in groups.items():
        for name in names:
            module = timed[name].module
            rows: dict = {}
            for c, count in calls[name].items():
                r = _rows_of(module, c)
                rows[r] = rows.get(r, 0) + count
            lp = LayerPlan(name, key[0], key[1], dict(sorted(rows.items())), errors=dict(errors[key]),
                           activation=None if key[-1] is None else list(key[-1]))
            for label in [SIXTEEN_BIT] + labels:
                per_call = [results[key, c].get(label) for c in calls[name]]
                if all(t is not None for t in per_call):
                    lp.ms[label] = sum(t * count for t, count in zip(per_call, calls[name].values()))
            lp.choice = _choose(lp, options, tiers, min_speedup, prefer)
            if lp.choice == SIXTEEN_BIT:
                overrides[exact_pattern(name)] = {"keep": True}
            else:
                _, changes, kern = options[lp.choice]
                if kern is not None and kern != timed[name].config.kernel:
                    changes = {**changes, "kernel": kern}
                if changes:
                    overrides[exact_pattern(name)] = dict(changes)
            plan_layers.append(lp)
    order = {name: i for i, name in enumerate(timed)}
    plan_layers.sort(key=lambda lp: order[lp.name])
    merged = dict(config.overrides)
    for pattern, changes in overrides.items():  # after the config's own (later overrides win), merged with an equal key
        merged[pattern] = {**merged.get(pattern, {}), **changes}
    planned = dataclasses.replace(config, overrides=merged)
    return PrecisionPlan(planned, labels + [SIXTEEN_BIT], plan_layers, untimed, float(min_speedup),
                         _environment(device), prefer)

