"""``compile_model``: a quantized model on its fast path in one call.

The speed ``benchmarks/models.py`` measures needs four steps that are easy to get wrong by hand: the GPU kernels
chosen (a config's default "reference" kernel is the plain-torch emulation, slower than 16 bits), their per-layer
state built before compiling (``prepare_kernels``; else the compiled graphs break at every layer), the model's
repeated blocks compiled on their own (regional compilation: one graph serves every block, minutes instead of
tens of minutes for FLUX.1), and the fusion pass installed (``inductor_options``). ``compile_model`` does them, for
any model; ``fourbit.compile_pipeline`` does it for a diffusers pipeline's denoiser.
"""
from __future__ import annotations

import importlib.util
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from .linear import QuantLinear
from .prepare import prepare_kernels, quantized_layers

#: layers whose presence makes a module a block worth compiling on its own
_LAYER_TYPES = (nn.Linear, nn.Conv2d, QuantLinear)
#: the GPU family fourbit's Triton kernels are tuned and measured on (H100, H200: compute capability 9.0)
SPEED_CAPABILITY = 9


@dataclass
class CompileReport:
    """What ``compile_model`` / ``compile_pipeline`` did."""

    kernels: dict  # kernel name -> number of quantized layers running it
    blocks: list  # the block classes compiled (or the model's own class when it has no repeated blocks)
    compiled: int  # how many modules were compiled
    fusion: bool  # whether the fusion pass (``inductor_options``) was installed
    notes: list = field(default_factory=list)  # why the kernels are what they are
    seconds: Optional[float] = None  # compile + first call, where a warm-up call ran
    cuda_graphs: bool = False  # whether calls replay CUDA graphs (``graph_forward``)

    def summary(self) -> str:
        kernels = ", ".join(f"{n} x {k}" for k, n in sorted(self.kernels.items())) or "no quantized layers"
        lines = [f"compiled {self.compiled} modules ({', '.join(self.blocks)}); quantized layers: {kernels}; "
                 f"fusion pass {'on' if self.fusion else 'off'}{'; CUDA graphs' if self.cuda_graphs else ''}"]
        if self.seconds is not None:
            lines.append(f"compile + first call: {self.seconds:.1f} s")
        return "\n".join(lines + self.notes)


def _holds_a_layer(module: nn.Module) -> bool:
    return any(isinstance(m, _LAYER_TYPES) for m in module.modules() if m is not module)


def repeated_blocks(model: nn.Module) -> list:
    """Class names of ``model``'s repeated blocks: diffusers' ``_repeated_blocks`` where the class sets it, else
    every class seen at least twice as the items of one ``nn.ModuleList`` and holding a linear or convolution, the
    innermost kept (a stage of blocks is left out when it contains such blocks: its instances differ in shape, and
    each would compile a graph of its own). Empty when the model has none."""
    declared = list(getattr(model, "_repeated_blocks", None) or ())
    if declared and any(type(m).__name__ in declared for m in model.modules()):
        return declared
    candidates: dict = {}  # class name -> instances
    for lst in model.modules():
        if not isinstance(lst, nn.ModuleList):
            continue
        counts = Counter(type(m).__name__ for m in lst)
        for m in lst:
            if counts[type(m).__name__] >= 2 and _holds_a_layer(m):
                candidates.setdefault(type(m).__name__, []).append(m)
    names = set(candidates)
    outer = {name for name, mods in candidates.items()
             if any(type(sub).__name__ in names - {name} for m in mods for sub in m.modules())}
    return sorted(names - outer)


def raise_compile_cache_limits(per_code: int = 256, total: int = 8192) -> None:
    """Let dynamo keep more graphs per code object: blocks compiled one by one share code, and a model with
    sibling groups or several resolutions needs more than the default 8 entries before it falls back to eager."""
    import torch._dynamo

    cfg = torch._dynamo.config
    cfg.cache_size_limit = max(cfg.cache_size_limit, per_code)
    if hasattr(cfg, "accumulated_cache_size_limit"):
        cfg.accumulated_cache_size_limit = max(cfg.accumulated_cache_size_limit, total)


def compile_blocks(model: nn.Module, blocks: Optional[Sequence[str]] = None, **compile_kwargs) -> tuple:
    """Compile every module whose class is in ``blocks`` (default: ``repeated_blocks(model)``) with
    ``module.compile(**compile_kwargs)``; the whole model when there are none. Returns (class names, count).
    Raises dynamo's process-wide cache limits (``raise_compile_cache_limits``)."""
    blocks = list(blocks) if blocks is not None else repeated_blocks(model)
    raise_compile_cache_limits()
    targets = [m for m in model.modules() if type(m).__name__ in blocks]
    if blocks and not targets:
        found = sorted({type(m).__name__ for m in model.modules()})
        raise ValueError(f"no module of class {blocks} in {type(model).__name__}; its classes are: "
                         f"{', '.join(found)}")
    if not targets:
        targets, blocks = [model], [type(model).__name__]
    for m in targets:
        m.compile(**compile_kwargs)
    return blocks, len(targets)


def speed_kernel(device: torch.device) -> tuple:
    """(kernel name or None, why): "triton" where fourbit's GPU kernels run and were measured (CUDA, compute
    capability 9.x, Triton installed)."""
    if device.type != "cuda":
        return None, f"the model is on {device.type}: quantized layers keep their kernels (the GPU kernels need CUDA)"
    major, minor = torch.cuda.get_device_capability(device)
    if importlib.util.find_spec("triton") is None:
        return None, "Triton is not installed (pip install 'fourbit[kernels]'): quantized layers keep their kernels"
    if major != SPEED_CAPABILITY:
        return None, (f"compute capability {major}.{minor}: fourbit's GPU kernels are tuned and measured on 9.x "
                      "(H100/H200); quantized layers keep their kernels (pass kernel='triton' to try them here)")
    return "triton", ""


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model without tensors)."""
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def choose_kernels(model: nn.Module, kernel: Optional[str] = "auto") -> list:
    """Set the quantized layers' kernels; returns notes. "auto": layers on the plain-torch "reference" kernel move to
    "triton" where ``speed_kernel`` allows (a precision plan's per-layer "triton" / "triton-cublas" choices stay);
    a kernel name: every quantized layer runs it; None: leave them."""
    from . import set_kernel

    layers = [layer for _, layer in quantized_layers(model)]
    if kernel is None or not layers:
        return []
    if kernel != "auto":
        set_kernel(model, kernel)
        return []
    name, why = speed_kernel(model_device(model))
    if name is None:
        return [why]
    for layer in layers:
        if layer.kernel == "reference":
            layer.kernel = name
    return []


def exact_casts_option(compile_kwargs: dict) -> bool:
    """Ask inductor to round where eager rounds (``emulate_precision_casts``), in place in ``compile_kwargs``; True
    if set. Inductor otherwise drops a downcast followed by an upcast inside a fused kernel: the reference kernel's
    fp16 group scales then stay fp32 and about one activation code in a thousand rounds the other way (measured on a
    tiny PixArt: 2.8e-5 relative error to eager without it, 3e-13 with it). No mode= (it excludes options)."""
    import torch._inductor.config as inductor_config

    if (compile_kwargs.get("backend", "inductor") != "inductor" or compile_kwargs.get("mode") is not None
            or not hasattr(inductor_config, "emulate_precision_casts")):
        return False
    compile_kwargs["options"] = {"emulate_precision_casts": True, **compile_kwargs.get("options", {})}
    return True


def format_notes(model: nn.Module) -> list:
    """What the GPU kernels do with the layers' formats, where that is not the fast path: the group-scaled GEMM of
    the paper's int4 / fp4 (correct, slower than 16 bits on Hopper) or no kernel at all (the plain-torch path)."""
    from ..kernels import EPILOGUE_KERNELS, SPEED_KERNELS
    from ..kernels.linear import plan_for  # imports triton: only where GPU kernels run

    plans = Counter(plan_for(layer) for _, layer in quantized_layers(model)
                    if layer.kernel in SPEED_KERNELS + EPILOGUE_KERNELS)
    notes = []
    if plans.get("grouped"):
        notes.append(f"{plans['grouped']} layers have group-scaled 4-bit formats (int4 / fp4 with group scales): "
                     "their GEMM is correct but slower than 16 bits on Hopper; weights= and activations='int4p2' "
                     "(or 'fp4p2') fold into the FP8 tensor cores (docs/formats.md; quality: the README's table)")
    if plans.get("reference"):
        notes.append(f"{plans['reference']} layers have formats without a GPU kernel: they run the plain-torch path")
    return notes


def compile_model(model: nn.Module, forward_loop: Optional[Callable[[nn.Module], None]] = None, *,
                  kernel: Optional[str] = "auto", blocks: Optional[Sequence[str]] = None, fusion: bool = True,
                  act_quant: str = "pass", cuda_graphs: Union[bool, str] = "auto", **compile_kwargs) -> CompileReport:
    """Put a (quantized or not) model on its fast path, in place: kernels chosen (``choose_kernels``), their state
    built (``prepare_kernels``, with ``forward_loop(model)`` calling the model as it will be used, so single-row layers
    keep the GEMV's 4-bit weight), the repeated blocks compiled (``compile_blocks``) with the fusion pass
    (``inductor_options(act_quant)``) where GPU kernels run. ``compile_kwargs`` go to ``torch.compile`` (``options`` are merged
    with the fusion pass's). Compilation happens at the first call after this.
    cuda_graphs: "auto" (default) replays the model's calls from CUDA graphs where it is on CUDA (``graph_forward``,
    one capture per input signature: without them a quantized model launches every kernel from Python and is
    host-bound, 0.37-0.88x bf16 on an H200 where it is 1.03-1.44x with them); True also notes when it can't; False
    leaves plain calls (e.g. to capture a graph of your own around the model)."""
    from ..kernels import EPILOGUE_KERNELS, SPEED_KERNELS
    from . import inductor_options

    if cuda_graphs not in (True, False, "auto"):
        raise ValueError(f"compile_model: cuda_graphs must be True, False or 'auto', got {cuda_graphs!r}")
    notes = choose_kernels(model, kernel)
    kernels = Counter(layer.kernel for _, layer in quantized_layers(model))
    gpu = any(k in SPEED_KERNELS + EPILOGUE_KERNELS for k in kernels)
    fused = fusion and gpu and compile_kwargs.get("backend", "inductor") == "inductor"
    if fused and compile_kwargs.get("mode") is not None:
        raise ValueError(f"mode={compile_kwargs['mode']!r} cannot go with the fusion pass's inductor options "
                         "(torch.compile takes one or the other): pass the mode's settings as options={...}, "
                         "or fusion=False")
    if gpu:
        notes += format_notes(model)
        with torch.no_grad():
            prepare_kernels(model, forward_loop=forward_loop)
    if fused:
        compile_kwargs["options"] = {**inductor_options(act_quant), **compile_kwargs.get("options", {})}
    if "reference" in kernels and exact_casts_option(compile_kwargs):
        notes.append("reference kernel under inductor: its 16-bit scale roundings are kept (emulate_precision_casts)")
    names, count = compile_blocks(model, blocks, **compile_kwargs)
    report = CompileReport(kernels=dict(kernels), blocks=names, compiled=count, fusion=fused, notes=notes)
    if cuda_graphs:
        device = model_device(model).type
        if device == "cuda":
            from .cuda_graph import graph_forward

            graph_forward(model)
            report.cuda_graphs = True
        elif cuda_graphs is True:
            report.notes.append(f"cuda_graphs: the model is on {device}, not CUDA: no graphs")
    return report
