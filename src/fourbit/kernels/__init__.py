"""Kernel registry: the named implementations a quantized layer can run through.

A linear kernel is ``fn(layer, x2d (M, K)) -> (M, N)`` and must reproduce
``fourbit.kernels.reference.quant_linear_reference`` (bit-exact quantization, fp32-accumulated GEMM).
GPU kernels register themselves here (``register_linear_kernel``); "reference" always exists.
"""
from __future__ import annotations

from typing import Callable

from .reference import quant_linear_reference

LinearKernel = Callable

_LINEAR_KERNELS: dict[str, LinearKernel] = {"reference": quant_linear_reference}
_LAZY: dict[str, str] = {}  # name -> module that registers it when imported


def register_linear_kernel(name: str, fn: LinearKernel) -> None:
    _LINEAR_KERNELS[name] = fn


def register_lazy_kernel(name: str, module: str) -> None:
    """Declare that importing ``module`` registers kernel ``name`` (keeps GPU deps out of import time)."""
    _LAZY[name] = module


def get_linear_kernel(name: str) -> LinearKernel:
    if name not in _LINEAR_KERNELS and name in _LAZY:
        import importlib

        importlib.import_module(_LAZY[name])
    try:
        return _LINEAR_KERNELS[name]
    except KeyError:
        known = sorted(set(_LINEAR_KERNELS) | set(_LAZY))
        raise ValueError(f"unknown kernel {name!r}; known kernels: {', '.join(known)}") from None


def available_kernels() -> list[str]:
    return sorted(set(_LINEAR_KERNELS) | set(_LAZY))


# Triton kernels (GPU; imported on first use so that ``import fourbit`` never imports triton):
#   "triton"         speed mode: weight operands expanded once and cached on the layer
#   "triton-cublas"  speed mode with the GEMM through cuBLAS (torch._scaled_mm, the low-rank branch folded into K)
#   "triton-memory"  memory mode: 4-bit weights at rest, expanded per layer just before its GEMM
SPEED_KERNELS = ("triton", "triton-cublas")  # cache a weight operand per layer (``prepare_kernels`` builds it)
#: the fusion pass moves a following activation into these kernels' GEMM epilogue ("triton-cublas": cuBLAS has none)
EPILOGUE_KERNELS = ("triton", "triton-memory")
register_lazy_kernel("triton", "fourbit.kernels.linear")
register_lazy_kernel("triton-cublas", "fourbit.kernels.linear")
register_lazy_kernel("triton-memory", "fourbit.kernels.linear")
