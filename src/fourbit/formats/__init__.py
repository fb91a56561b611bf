"""Number formats. Each module holds one format's reference quantize / dequantize / pack / unpack.

``make_format("int4", group_size=64)`` builds a format by its registry name; ``FORMATS`` lists them.
docs/formats.md compares them (bits per element, where they run fast, which paper).

  int4    int4 codes, group 64, fp16 scales               (SVDQuant INT4)
  fp4     e2m1 codes, group 32, e4m3 scales               (SVDQuant FP4)
  nvfp4   e2m1 codes, group 16, e4m3 scales + fp32/tensor (NVIDIA NVFP4)
  mxfp4   e2m1 codes, group 32, E8M0 power-of-two scales  (OCP MX)
  int4p2  int4 codes, group 64, 2^e scales + fp32/row     (exact in FP8 e4m3: Hopper)
  fp4p2   e2m1 codes, group 32, 2^e scales + fp32/row     (exact in FP8 e4m3: Hopper)
  int8    int8 codes, per row, fp32 scales                (W8A8)
  fp8     e4m3 values, per row, fp32 scales               (W8A8 on FP8 hardware: Hopper, Ada, Blackwell)
  nf4     NormalFloat4 code book, group 64, fp32 absmax   (QLoRA; weight-only baseline)
"""
from __future__ import annotations

from typing import Optional

from .base import Format, QuantizedTensor, pack_nibbles, unpack_nibbles
from .floats import E2M1_MAX, E2M1_VALUES, E4M3_MAX, e2m1_decode, e2m1_encode, e2m1_round, to_e4m3
from .fp4 import Fp4
from .fp4p2 import Fp4P2
from .fp8 import Fp8
from .int4 import Int4
from .int4p2 import Int4P2
from .int8 import Int8
from .mxfp4 import MxFp4
from .nf4 import NF4_VALUES, Nf4
from .nvfp4 import NvFp4
from .pow2 import Pow2Format
from .quartz import VARIANTS as QUARTZ_VARIANTS, QuaRTZ

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
    try:
        return cls(group_size=group_size, **options)
    except TypeError as err:  # an option this format does not take
        raise ValueError(f"format {name!r}: {err}") from None


def format_from_spec(spec: Optional[dict]) -> Optional[Format]:
    """Inverse of ``Format.spec()`` (None stays None: a 16-bit operand)."""
    if spec is None:
        return None
    spec = dict(spec)
    return make_format(spec.pop("name"), **spec)


for _cls in (Int4, Fp4, NvFp4, MxFp4, Int4P2, Fp4P2, Int8, Fp8, Nf4):
    register_format(_cls)
for _cls in QUARTZ_VARIANTS.values():  # "quartz" and its named variants (quartz_s32, quartz_tok_round, ...)
    register_format(_cls)

__all__ = [
    "Format", "QuantizedTensor", "FORMATS", "make_format", "format_from_spec", "register_format",
    "pack_nibbles", "unpack_nibbles",
    "Int4", "Fp4", "NvFp4", "MxFp4", "Int4P2", "Fp4P2", "Int8", "Fp8", "Nf4", "Pow2Format",
    "E2M1_VALUES", "E2M1_MAX", "E4M3_MAX", "NF4_VALUES", "e2m1_round", "e2m1_encode", "e2m1_decode", "to_e4m3",
]
