"""What an activation call or a column slice is, read from its function and arguments: shared by the fusion pass
(``kernels/fusion.py``, on a traced graph's nodes) and the plan's ``nn/output_activations.py`` (on eager calls)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

# eager functions, and the aten ops a traced graph (``kernels/fusion.py``) holds
_GELUS = (F.gelu, torch._C._nn.gelu, torch.ops.aten.gelu.default)
_SILUS = (F.silu, torch._C._nn.silu, torch.ops.aten.silu.default)


def activation_kind(func, args: tuple, kwargs: dict) -> Optional[str]:
    """The epilogue kind ("gelu", "gelu_tanh", "silu") of one activation call on its first argument, or None (not an
    activation the epilogue has, or with other arguments, e.g. an in-place SiLU)."""
    kwargs = kwargs or {}
    if func in _GELUS:
        approx = kwargs.get("approximate", args[1] if len(args) > 1 else "none")
        if set(kwargs) - {"approximate"} or len(args) > 2 or approx not in ("none", "tanh"):
            return None
        return "gelu_tanh" if approx == "tanh" else "gelu"
    if func in _SILUS:
        if len(args) > 1 or kwargs.get("inplace", False):
            return None
        return "silu"
    return None


def last_dim_slice(index, ndim: int) -> Optional[slice]:
    """The slice of ``t[index]`` if it only slices the last of ``ndim`` dimensions (``[..., a:b]``), else None."""
    index = index if isinstance(index, tuple) else (index,)
    if len(index) == 2 and index[0] is Ellipsis:
        sl = index[1]
    elif len(index) == ndim and all(isinstance(i, slice) and i == slice(None) for i in index[:-1]):
        sl = index[-1]
    else:
        return None
    if not isinstance(sl, slice) or sl.step not in (None, 1):
        return None
    if not all(b is None or isinstance(b, int) for b in (sl.start, sl.stop)):
        return None
    return sl
