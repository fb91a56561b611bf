"""Swapping one submodule of a model for another by its dotted name."""
from __future__ import annotations

from torch import nn


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace ``model``'s submodule ``name`` ("blocks.3.attn.to_q") with ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
