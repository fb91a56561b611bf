"""``prepare_kernels``: build the Triton kernels' per-layer state before ``torch.compile``."""
from __future__ import annotations

from torch import nn

from .linear import QuantLinear
from .rows import record_rows


def quantized_layers(model: nn.Module):
    """(name, layer) for every quantized layer of ``model``."""
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            yield name, mod


def prepare_kernels(model: nn.Module, forward_loop=None) -> nn.Module:
    """Build every quantized layer's kernel state now (on the layers' current device): speed-mode weight
    operands, folded factors, reciprocals. Call after moving the model to the GPU and before ``torch.compile``,
    so that the compiled graphs contain the layers instead of breaking at them.

    ``forward_loop(model)`` (optional): calls the model as it will be used (e.g. one step); layers that it calls only
    with rows for the single-row GEMV (FLUX's modulation linears at batch 1) then get no speed-mode operand, as in
    eager use (their GEMV reads the 4-bit weight: ~3 GiB less for FLUX.1). Called later with more rows, such a layer
    expands its weight per call (memory-mode speed) until it is prepared again."""
    from ..kernels import SPEED_KERNELS
    from ..kernels.linear import few_rows, kernel_gemm, layer_state, weight_operand  # imports triton: when asked

    layers = [layer for _, layer in quantized_layers(model) if layer.kernel in SPEED_KERNELS + ("triton-memory",)]
    rows: dict = {}
    if forward_loop is not None:
        rows = record_rows(model, dict(enumerate(layers)), forward_loop)  # {index: {rows: calls}}
    for i, layer in enumerate(layers):
        st = layer_state(layer)
        if layer.kernel not in SPEED_KERNELS or st.plan not in ("scaled", "grouped"):
            continue
        seen = max(rows[i]) if rows.get(i) else None
        if st.gemv and seen is not None and few_rows(seen):
            st.weight = None  # the GEMV reads the packed weight
        else:
            weight_operand(layer, st, memory=False, gemm=kernel_gemm(layer.kernel))
    return model
