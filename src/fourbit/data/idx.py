"""Reader for the IDX format used by (Fashion-)MNIST, gzip-compressed or plain.

Layout: 2 zero bytes, one type byte (0x08 = uint8), one byte with the number of dimensions n, then n big-endian
uint32 sizes, then the data. Images files therefore have a 16-byte header, label files an 8-byte header.
"""

from __future__ import annotations

import gzip
import os

import numpy as np

_UINT8 = 0x08


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (``.gz`` or uncompressed) into a uint8 numpy array of the stored shape."""
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic {raw[:4]!r})")
    if raw[2] != _UINT8:
        raise ValueError(f"{path}: IDX element type 0x{raw[2]:02x} unsupported, only uint8 (0x08)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape)) if shape else 1
    if len(raw) - header != expected:
        raise ValueError(f"{path}: header says {shape} ({expected} bytes) but {len(raw) - header} data bytes follow")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (gzip-compressed when ``path`` ends in ``.gz``). Used by tests."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, _UINT8, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())
