"""What a method produces for one layer: everything a quantized layer needs, independent of nn.Module."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import Tensor

from ..formats import Format, QuantizedTensor


@dataclass
class QuantizedLinearState:
    """The quantized form of y = x W^T + b with W (N, K):

        y = x^ @ lr_down^T @ lr_up^T  +  Q_a(x^) @ deq(weight)^T  +  bias,   x^ = x * (1 / smooth)

    weight:      QuantizedTensor of the (residual) weight, (N, Kp) with Kp = K padded to the group size
    smooth:      (Kp,) fp32 smoothing factors lambda, or None
    lr_down:     (r, Kp) down-projection of the 16-bit low-rank branch (SVDQuant's L1^T), or None
    lr_up:       (N, r) up-projection (SVDQuant's L2^T), or None
    info:        JSON-able facts about how it was chosen (alpha, errors, ...)
    """

    weight: QuantizedTensor
    weight_format: Format
    act_format: Optional[Format]
    smooth: Optional[Tensor] = None
    lr_down: Optional[Tensor] = None
    lr_up: Optional[Tensor] = None
    info: dict = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return 0 if self.lr_down is None else int(self.lr_down.shape[0])
