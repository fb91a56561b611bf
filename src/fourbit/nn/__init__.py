"""Quantized modules and helpers that act on a quantized model."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

from torch import nn

from .linear import QuantConv2d, QuantLinear, build_empty, conv_rows
from ..kernels import get_linear_kernel
from .prepare import prepare_kernels, quantized_layers
from .compiling import CompileReport, compile_blocks, compile_model, repeated_blocks
from .cuda_graph import graph_forward, release_graphs
from .replace import set_module
from .state import QuantizedLinearState


def set_kernel(model: nn.Module, kernel: str) -> nn.Module:
    """Run every quantized layer through the named kernel ("reference", "triton", "triton-cublas", "triton-memory").
    Replaces per-layer choices too (a precision plan's "triton" / "triton-cublas" mix, kept by checkpoints): a
    planned model loaded with ``from_pretrained`` already runs its kernels."""
    get_linear_kernel(kernel)  # fail early on an unknown name
    for _, layer in quantized_layers(model):
        layer.kernel = kernel
    return model


def set_gemm_backend(name: str, min_rows: Optional[int] = None) -> None:
    """The GEMM of FP8-operand layers on the "triton" kernels (int4p2 / fp4p2 / fp8 activations): "triton" (default;
    fourbit's GEMM with the low-rank branch and an activation in its epilogue) or "cublas" (``torch._scaled_mm``, the
    branch folded into K as FP8 hi + lo parts, ~2^-8 relative on the branch; calls with an epilogue activation,
    fewer than ``min_rows`` rows (default 2048, where it was measured slower) or a branch outside e4m3's range keep
    Triton). Process-wide, read at each call; set it before ``prepare_kernels`` (which builds the folded weights)
    and before compiling. See docs/kernels.md."""
    from ..kernels.gemm_cublas import set_gemm_backend as set_backend  # imports triton: only when asked

    set_backend(name, min_rows)


def inductor_options(act_quant: str = "pass") -> dict:
    """Options for ``torch.compile(..., options=fourbit.nn.inductor_options())`` (or ``module.compile(...)``) that
    fuse the code around quantized layers into their kernels: an activation after a layer goes into its GEMM's
    epilogue, and a concatenation that only feeds a layer is read in place (``fourbit/kernels/fusion.py``).
    Use with the Triton kernels after ``prepare_kernels``; without them the options change nothing.

    ``act_quant``: the default "pass" runs fourbit's own quantization kernel inside each layer's op; "given"
    (opt-in) the same, and where another quantized layer's GEMM produces a layer's input (FLUX.1's MLP), that GEMM's
    epilogue also hands over the input's row maxima, so the quantization reads the input once (measured no faster
    on FLUX.1: docs/kernels.md); "inline" (opt-in): layers with int4p2 / fp4p2 / fp8 activations in speed mode quantize their input in torch ops
    that inductor generates inside the kernel producing it (norm, modulation, GELU, residual add), then run the GEMM
    alone."""
    from ..kernels.fusion import inductor_options as options

    return options(act_quant)


@contextmanager
def activation_format(model: nn.Module, fmt):
    """Temporarily quantize every quantized layer's activations with ``fmt`` (a Format or None = 16-bit).

    Weights are unchanged; this is the switch step-aware mixed precision uses.
    """
    saved = [(layer, layer.act_format) for _, layer in quantized_layers(model)]
    try:
        for layer, _ in saved:
            layer.act_format = fmt
        yield model
    finally:
        for layer, old in saved:
            layer.act_format = old


__all__ = ["QuantLinear", "QuantConv2d", "QuantizedLinearState", "build_empty", "conv_rows",
           "quantized_layers", "set_kernel", "prepare_kernels", "set_gemm_backend", "inductor_options",
           "activation_format", "set_module", "compile_model", "compile_blocks", "repeated_blocks", "CompileReport", "graph_forward",
           "release_graphs"]
