"""Rewrite a checkpoint's header the way a careless editor or a damaged disk would (tests only)."""
import json

from safetensors import safe_open
from safetensors.torch import save_file

from fourbit.checkpoint import HEADER_KEY, header_digest


def read_raw(path):
    """(tensors, header dict) of a fourbit checkpoint, read without any fourbit check."""
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()[HEADER_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, header


def write_raw(path, tensors, header, resign=False):
    """Write ``header`` (a dict, or a str written verbatim) with ``tensors``; ``resign`` recomputes header_sha256
    so that only the schema and the consistency checks stand between the edit and the model."""
    if resign and isinstance(header, dict):
        header = {**header, "header_sha256": header_digest(header)}
    text = header if isinstance(header, str) else json.dumps(header)
    save_file(tensors, str(path), metadata={HEADER_KEY: text})
    return path
