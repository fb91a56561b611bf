"""Small helpers with no dependencies beyond the standard library."""
from __future__ import annotations

import importlib


def import_optional(module: str) -> bool:
    """Import ``module`` if it exists (a component that registers itself); True if imported.

    A missing ``module`` (or missing parent package) is fine; an ImportError raised *inside* it is not hidden.
    """
    try:
        importlib.import_module(module)
        return True
    except ModuleNotFoundError as e:
        if e.name and (module == e.name or module.startswith(e.name + ".")):
            return False
        raise
