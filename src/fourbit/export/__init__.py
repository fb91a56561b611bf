"""Exporting fourbit models to other engines' checkpoint layouts (``docs/export.md``)."""
from .nunchaku import decode_layer, export as export_nunchaku, load_decoded

__all__ = ["export_nunchaku", "decode_layer", "load_decoded"]
