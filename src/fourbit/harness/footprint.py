"""Storage accounting: bits per weight element and model bytes as deployed."""
from __future__ import annotations

from torch import nn

from ..nn import quantized_layers


def _bytes(t, float_bytes: int = 2) -> int:
    """Deployed bytes of a tensor: floating tensors counted at 16 bits unless stored narrower/wider on purpose."""
    if t.is_floating_point():
        return t.numel() * min(t.element_size(), float_bytes) if t.element_size() > 1 else t.numel()
    return t.numel() * t.element_size()


def weight_bits_per_element(model: nn.Module) -> float:
    """Bits per original weight element over the quantized layers: codes + scales + row scales +
    smoothing factors + the 16-bit low-rank branch, divided by N*K (unpadded). 16.0 for an unquantized model."""
    bits, elems = 0, 0
    for _, layer in quantized_layers(model):
        elems += layer.out_features * layer.in_features
        bits += 8 * layer.weight_packed.numel()
        bits += 8 * layer.weight_scales.numel() * layer.weight_scales.element_size()
        for name in ("weight_row_scale", "smooth"):
            t = getattr(layer, name)
            if t is not None:
                bits += 8 * t.numel() * t.element_size()
        for name in ("lr_down", "lr_up"):
            t = getattr(layer, name)
            if t is not None:
                bits += 16 * t.numel()
    return bits / elems if elems else 16.0


def model_bytes(model: nn.Module) -> int:
    """Bytes of the whole model as deployed: quantized buffers as stored, every other float tensor at 16 bits
    (fp32 scales/smoothing of quantized layers are counted at their stored width)."""
    total = 0
    quant = {name for name, _ in quantized_layers(model)}
    for name, t in model.state_dict().items():
        owner = name.rpartition(".")[0]
        if owner in quant and t.is_floating_point() and not name.endswith(("lr_down", "lr_up", "bias")):
            total += t.numel() * t.element_size()
        else:
            total += _bytes(t)
    return total
