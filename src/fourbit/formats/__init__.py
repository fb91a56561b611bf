"""Number formats. Each module holds one format's reference quantize / dequantize / pack / unpack.

``make_format("int4", group_size=64)`` builds a format by its registry name; ``FORMATS`` lists them.
"""
from __future__ import annotations

from typing import Optional

from .base import Format, QuantizedTensor, pack_nibbles, unpack_nibbles
from .int4 import Int4

FORMATS: dict[str, type[Format]] = {}


def register_format(cls: type[Format]) -> type[Format]:
    """Class decorator / call: make ``cls`` available to ``make_format`` under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    FORMATS[cls.name] = cls
    return cls


def make_format(name: str, group_size: Optional[int] = None, **options) -> Format:
    """Build a format by name. Raises ValueError listing the known names for an unknown one."""
    try:
        cls = FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown format {name!r}; known formats: {', '.join(sorted(FORMATS))}") from None
    return cls(group_size=group_size, **options)


def format_from_spec(spec: Optional[dict]) -> Optional[Format]:
    """Inverse of ``Format.spec()`` (None stays None: a 16-bit operand)."""
    if spec is None:
        return None
    spec = dict(spec)
    return make_format(spec.pop("name"), **spec)


register_format(Int4)

__all__ = ["Format", "QuantizedTensor", "FORMATS", "make_format", "format_from_spec", "register_format",
           "pack_nibbles", "unpack_nibbles"]
