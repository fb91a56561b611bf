"""The plain-torch reference of a quantized linear layer: the numerics every kernel must reproduce.

Steps (M tokens, K inputs, Kp padded, N outputs, r rank):
  1. pad x (M, K) with zeros to (M, Kp)
  2. smoothing: x^ = x * (1 / smooth)  (the reciprocal correctly rounded, then one multiply per element)
  3. low-rank branch (16-bit): y_lr = (x^ @ lr_down^T) @ lr_up^T           (M, r) -> (M, N)
  4. dynamic activation quantization per token and group: x~ = deq(Q_a(x^)) (bit-exact codes and scales)
  5. y = x~ @ deq(W)^T + y_lr + bias, accumulated in fp32, returned in x's dtype
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..formats.base import reciprocal, skip_finite_check


def prepare_activation(layer, x2: Tensor) -> Tensor:
    """(M, K) -> (M, Kp) fp32, padded and smoothed: the input both branches see."""
    x = x2.float()
    if layer.padded_in != layer.in_features:
        x = F.pad(x, (0, layer.padded_in - layer.in_features))
    if layer.smooth is not None:
        x = x * smooth_reciprocal(layer.smooth)
    return x


def smooth_reciprocal(smooth: Tensor) -> Tensor:
    """(Kp,) fp32 1 / smooth, correctly rounded: the factor every path multiplies activations by."""
    return reciprocal(smooth.float())


def low_rank_branch(layer, xs: Tensor) -> Tensor:
    """(M, Kp) -> (M, N): the 16-bit branch, evaluated in fp32 from the stored 16-bit factors."""
    return (xs @ layer.lr_down.float().t()) @ layer.lr_up.float().t()


def quant_linear_reference(layer, x2: Tensor) -> Tensor:
    """(M, K) -> (M, N) in x2's dtype. ``layer`` is a QuantLinear (duck-typed)."""
    xs = prepare_activation(layer, x2)
    if layer.act_format is None:
        xq = xs
    else:
        with skip_finite_check():  # a full extra pass per call; NaNs still propagate to the output
            xq = layer.act_format.fake_quantize(xs)
    y = xq @ layer.dequantized_weight(torch.float32).t()
    if layer.lr_down is not None:
        y = y + low_rank_branch(layer, xs)
    if layer.bias is not None:
        y = y + layer.bias.float()
    return y.to(x2.dtype)
