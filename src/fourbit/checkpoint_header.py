"""The checkpoint header's schema: every field, its type and range, checked before anything is built.

``check_header(header)`` returns nothing or raises ``HeaderError`` with one sentence naming the field; the
checks are tables (``TOP``, ``LAYER``, ``CONV``) of field -> (required, check), not code per field.
``header_digest`` is the header checksum (canonical JSON, so key order and spacing do not matter).
"""
from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Callable, Optional

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class HeaderError(ValueError):
    """A header field that is missing, of the wrong type or out of range (the message names it)."""


def header_digest(header: dict) -> str:
    """SHA-256 of the header's canonical JSON (sorted keys, no spaces), ``header_sha256`` itself left out."""
    body = {k: v for k, v in header.items() if k != "header_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


# ---- value checks: each returns None when fine, else what the value should be -----------------------
def _int(lo: int) -> Callable[[Any], Optional[str]]:
    return lambda v: None if type(v) is int and v >= lo else f"an integer >= {lo}"


def _str(v) -> Optional[str]:
    return None if isinstance(v, str) else "a string"


def _hex64(v) -> Optional[str]:
    return None if isinstance(v, str) and _HEX64.match(v) else "64 hexadecimal digits"


def _object(v) -> Optional[str]:
    return None if isinstance(v, dict) else "a JSON object"


def _format(v) -> Optional[str]:
    return None if isinstance(v, dict) and isinstance(v.get("name"), str) else 'an object with a "name"'


def _format_or_null(v) -> Optional[str]:
    return None if v is None else _format(v)


def _pair(lo: int) -> Callable[[Any], Optional[str]]:
    return lambda v: (None if isinstance(v, list) and len(v) == 2 and all(type(x) is int and x >= lo for x in v)
                      else f"a list of two integers >= {lo}")


def _groups(v) -> Optional[str]:
    ok = isinstance(v, list) and all(isinstance(g, list) and len(g) >= 2 and all(isinstance(n, str) for n in g)
                                     for g in v)
    return None if ok else "a list of groups of two or more layer names"


def _kind(v) -> Optional[str]:
    return None if v in ("linear", "conv2d") else '"linear" or "conv2d"'


#: top-level fields: name -> (required, check)
TOP = {
    "format_version": (True, _int(1)),
    "library_version": (True, _str),
    "config": (True, _object),
    "architecture": (True, _str),
    "layers": (True, _object),
    "extra": (True, _object),
    "siblings": (False, _groups),
    "tensor_sha256": (True, _hex64),
    "header_sha256": (True, _hex64),
}

#: fields of every entry of "layers"
LAYER = {
    "kind": (True, _kind),
    "in_features": (True, _int(1)),
    "out_features": (True, _int(1)),
    "padded_in": (True, _int(1)),
    "weight_format": (True, _format),
    "act_format": (True, _format_or_null),
    "rank": (True, _int(0)),
    "kernel": (True, _str),
}

#: extra fields of a "conv2d" layer
CONV = {
    "kernel_size": (True, _pair(1)),
    "stride": (True, _pair(1)),
    "padding": (True, _pair(0)),
    "dilation": (True, _pair(1)),
}


def _check_fields(obj: dict, table: dict, where: str) -> None:
    unknown = sorted(set(obj) - set(table))
    if unknown:
        raise HeaderError(f"{where} has unknown field(s) {', '.join(map(repr, unknown))}")
    for name, (required, check) in table.items():
        if name not in obj:
            if required:
                raise HeaderError(f"{where} lacks the field {name!r}")
            continue
        wanted = check(obj[name])
        if wanted is not None:
            raise HeaderError(f"{where}: field {name!r} must be {wanted}, got {_short(obj[name])}")


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_header(header: dict) -> None:
    """Check every field of a (format-version-current) header against the schema; raise HeaderError if one fails."""
    _check_fields(header, TOP, "the header")
    for name, spec in header["layers"].items():
        where = f"layer {name!r}"
        if not isinstance(spec, dict):
            raise HeaderError(f"{where}: its spec must be a JSON object, got {_short(spec)}")
        table = {**LAYER, **CONV} if spec.get("kind") == "conv2d" else LAYER
        _check_fields(spec, table, where)
        if spec["padded_in"] < spec["in_features"]:
            raise HeaderError(f"{where}: padded_in {spec['padded_in']} is smaller than in_features "
                              f"{spec['in_features']}")
        if spec["kind"] == "conv2d":
            kh, kw = spec["kernel_size"]
            if spec["in_features"] % (kh * kw):
                raise HeaderError(f"{where}: in_features {spec['in_features']} is not a multiple of the kernel "
                                  f"area {kh}x{kw}")
