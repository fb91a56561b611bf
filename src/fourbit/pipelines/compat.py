"""What diffusers users call next on a quantized component: its own ``save_pretrained`` writes a fourbit folder
(which ``fourbit.from_pretrained`` reloads and diffusers' own loader refuses), ``fuse_qkv_projections`` refuses in
one sentence (it would read 16-bit ``.weight`` that 4-bit layers do not have)."""
from __future__ import annotations

import weakref

from torch import nn


class _SavePretrained:
    """``component.save_pretrained(dir, ...)`` -> ``fourbit.save_pretrained(component, dir)``. It holds the
    component weakly (no reference cycle keeping GPU memory alive) and ``copy.deepcopy(component)`` gives the copy
    its own."""

    fourbit_guard = True

    def __init__(self, model: nn.Module):
        self.model = weakref.ref(model)

    def __deepcopy__(self, memo):
        original = self.model()
        return _SavePretrained(memo.get(id(original), original))  # the model's copy is in memo before its dict

    def __call__(self, save_directory, is_main_process: bool = True, max_shard_size="5GB", **_diffusers_kwargs):
        from .pretrained import save_pretrained

        if is_main_process:
            save_pretrained(self.model(), save_directory, max_shard_size=max_shard_size)


def _refuse_fuse(*_args, **_kwargs):
    raise ValueError("fuse_qkv_projections() cannot fuse 4-bit layers; call it before quantizing, or fuse "
                     "with fourbit.fuse_siblings(model, fourbit.find_siblings(model, loop)) before fourbit.quantize")


def install(model: nn.Module) -> nn.Module:
    """Set the instance methods above on a quantized diffusers component. Returns it."""
    model.save_pretrained = _SavePretrained(model)
    if hasattr(model, "fuse_qkv_projections"):
        model.fuse_qkv_projections = _refuse_fuse
    return model
