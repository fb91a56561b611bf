"""Checkpoints: one safetensors file with every tensor of the quantized model and a JSON header.

Header (safetensors metadata key "fourbit"): format_version, library_version, config, architecture
fingerprint of the 16-bit model, per-layer specs (kind, shapes, formats, rank, kernel), extras added by
other components (e.g. PTQD statistics keyed by sampler setting), a SHA-256 over all tensor bytes and a
SHA-256 over the header itself (``header_sha256``, covering every other header field, the tensor checksum
included), so a damaged file is refused whether the damage is in the tensors or in the header. Writes are
atomic (temporary file + fsync + rename). No pickle anywhere.

Format versions: 2 adds ``header_sha256``. Version-1 files (header not covered by any checksum) are refused
with a sentence saying to re-create them; no version-1 checkpoint was ever committed or released.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save
from torch import nn

from . import __version__
from .api import architecture_fingerprint
from .nn import set_module
from .siblings import fuse_siblings
from .nn import QuantLinear, build_empty, quantized_layers

FORMAT_VERSION = 2
HEADER_KEY = "fourbit"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded onto this model: the message says why and what to do."""


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(list(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def header_digest(header: dict) -> str:
    """SHA-256 of the header's canonical JSON (sorted keys, no spaces), ``header_sha256`` itself left out."""
    body = {k: v for k, v in header.items() if k != "header_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def save(model: nn.Module, path: Union[str, Path], extra: Optional[dict] = None) -> Path:
    """Write ``model`` (quantized by ``fourbit.quantize``) to ``path`` atomically. Returns the path."""
    base = getattr(model, "fourbit_header", None)
    if base is None:
        raise ValueError("model is not quantized by fourbit (call fourbit.quantize first)")
    tensors = {n: t.detach().contiguous().cpu() for n, t in model.state_dict().items()}
    header = {
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "config": base["config"],
        "architecture": base["architecture"],
        "layers": {name: layer.layer_spec() for name, layer in quantized_layers(model)},
        "extra": {**base.get("extra", {}), **(extra or {})},
        "tensor_sha256": _digest(tensors),
    }
    if base.get("siblings"):
        header["siblings"] = base["siblings"]  # fused sibling linears (fourbit.siblings): load re-fuses
    header["header_sha256"] = header_digest(header)
    blob = st_save(tensors, metadata={HEADER_KEY: json.dumps(header)})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def read_header(path: Union[str, Path]) -> dict:
    """The JSON header of a fourbit checkpoint (no tensors are read)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path}: damaged or not a safetensors file ({e})") from None
    if HEADER_KEY not in meta:
        raise CheckpointError(f"{path}: a safetensors file but not a fourbit checkpoint (no '{HEADER_KEY}' header)")
    try:
        header = json.loads(meta[HEADER_KEY])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: damaged fourbit header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: damaged fourbit header (a JSON {type(header).__name__}, not an object)")
    version = header.get("format_version")
    if type(version) is not int or version < 1:
        raise CheckpointError(f"{path}: damaged fourbit header (format_version {version!r} is not a positive "
                              f"integer)")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version} is newer than this fourbit "
                              f"({__version__}) reads (<= {FORMAT_VERSION}); upgrade fourbit")
    if version < FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version} predates the header checksum and "
                              f"is no longer read; quantize the model again and save it with this fourbit")
    if header.get("header_sha256") != header_digest(header):
        raise CheckpointError(f"{path}: the header does not match its checksum: the file is damaged or was "
                              f"edited")
    return header


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"{path}: damaged checkpoint, tensors unreadable ({e})") from None


def load(model: nn.Module, path: Union[str, Path], strict: bool = True, device=None) -> nn.Module:
    """Load a checkpoint written by ``fourbit.save`` onto ``model``, a freshly built 16-bit model of the same
    architecture (on the meta device or a real one). Replaces its layers in place and returns it.

    Refuses, with a one-line reason: a different architecture, missing or extra layers/tensors, a newer
    format version, a damaged file.
    """
    path = Path(path)
    header = read_header(path)
    if getattr(model, "fourbit_header", None) is not None:
        raise CheckpointError("model is already quantized; load onto a freshly built 16-bit model")
    if header.get("siblings") and getattr(model, "fourbit_siblings", None) != header["siblings"]:
        if getattr(model, "fourbit_siblings", None):
            raise CheckpointError(f"{path}: the model's fused sibling layers differ from the checkpoint's; "
                                  f"load onto an unfused 16-bit model")
        try:
            fuse_siblings(model, header["siblings"])  # the checkpoint was quantized with these layers fused
        except ValueError as err:
            raise CheckpointError(f"{path}: cannot fuse the checkpoint's sibling layers on this model: {err}") from None
    fingerprint = architecture_fingerprint(model)
    layers = header["layers"]
    modules = dict(model.named_modules())
    missing = [n for n in layers if n not in modules]
    if missing:
        raise CheckpointError(f"{path}: checkpoint layer(s) missing from this model: {', '.join(missing[:5])}"
                              f"{' ...' if len(missing) > 5 else ''} - is it the same architecture?")
    for name, spec in layers.items():
        _check_layer(path, name, modules[name], spec)
    if fingerprint != header["architecture"] and strict:
        raise CheckpointError(f"{path}: architecture fingerprint {header['architecture']} differs from this "
                              f"model's {fingerprint}: the checkpoint was made from a different architecture "
                              f"or configuration")
    tensors = _read_tensors(path)
    if _digest(tensors) != header.get("tensor_sha256"):
        raise CheckpointError(f"{path}: tensor data does not match its checksum: the file is damaged")

    for name, spec in layers.items():
        prefix = name + "."
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
        set_module(model, name, build_empty(spec, _layer_tensors(own)))
    state_keys = set(model.state_dict().keys())
    extra = sorted(set(tensors) - state_keys)
    lacking = sorted(state_keys - set(tensors))
    if strict and (extra or lacking):
        raise CheckpointError(f"{path}: tensors do not match the model: "
                              + (f"missing from file: {', '.join(lacking[:5])}; " if lacking else "")
                              + (f"not in model: {', '.join(extra[:5])}" if extra else ""))
    model.load_state_dict({k: v for k, v in tensors.items() if k in state_keys}, strict=strict, assign=True)
    if device is not None:
        model.to(device)
    model.fourbit_header = {"config": header["config"], "architecture": header["architecture"],
                            "extra": header.get("extra", {})}
    if header.get("siblings"):
        model.fourbit_header["siblings"] = header["siblings"]
    return model


_LAYER_TENSORS = ("weight_packed", "weight_scales", "weight_row_scale", "smooth", "lr_down", "lr_up", "bias")


def _layer_tensors(own: dict) -> dict:
    return {n: own.get(n) for n in _LAYER_TENSORS}


def _check_layer(path: Path, name: str, module: nn.Module, spec: dict) -> None:
    if isinstance(module, QuantLinear):
        raise CheckpointError(f"{path}: layer {name} of the model is already quantized")
    kind = spec["kind"]
    if kind == "linear":
        ok = isinstance(module, nn.Linear) and (module.in_features, module.out_features) == (
            spec["in_features"], spec["out_features"])
    elif kind == "conv2d":
        ok = isinstance(module, nn.Conv2d) and module.out_channels == spec["out_features"] and (
            module.in_channels * module.kernel_size[0] * module.kernel_size[1] == spec["in_features"])
    else:
        raise CheckpointError(f"{path}: layer {name} has unknown kind {kind!r}")
    if not ok:
        raise CheckpointError(f"{path}: layer {name} is a {kind} {spec['in_features']}->{spec['out_features']} in "
                              f"the checkpoint but {module} in this model: different architecture")
