"""Checkpoints: one safetensors file with every tensor of the quantized model and a JSON header.

Header (safetensors metadata key "fourbit"): format_version, library_version, config, architecture
fingerprint of the 16-bit model, per-layer specs (kind, shapes, formats, rank, kernel), extras added by
other components (e.g. PTQD statistics keyed by sampler setting), and a SHA-256 over all tensor bytes so
damaged files are refused. Writes are atomic (temporary file + fsync + rename). No pickle anywhere.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save
from torch import nn

from . import __version__
from .api import architecture_fingerprint
from .nn import set_module
from .siblings import fuse_siblings
from .nn import QuantLinear, build_empty, quantized_layers
from .utils.foreign import guard_foreign_save

FORMAT_VERSION = 1
HEADER_KEY = "fourbit"
BUFFER_PREFIX = "@buffer."  # non-persistent buffers (no module name starts with "@")


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


def save(model: nn.Module, path: Union[str, Path], extra: Optional[dict] = None) -> Path:
    """Write ``model`` (quantized by ``fourbit.quantize``) to ``path`` atomically. Returns the path."""
    tensors = checkpoint_tensors(model)
    header = checkpoint_header(model, tensors, extra)
    return write_atomic(path, st_save(tensors, metadata={HEADER_KEY: json.dumps(header)}))


def checkpoint_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint holds: the state dict plus the non-persistent buffers (under ``BUFFER_PREFIX``),
    which a model built on the meta device cannot compute again."""
    if getattr(model, "fourbit_header", None) is None:
        raise ValueError("model is not quantized by fourbit (call fourbit.quantize first)")
    tensors = {n: t.detach().contiguous().cpu() for n, t in model.state_dict().items()}
    tensors.update({BUFFER_PREFIX + n: t.detach().contiguous().cpu() for n, t in _nonpersistent_buffers(model)})
    return tensors


def checkpoint_header(model: nn.Module, tensors: dict[str, torch.Tensor], extra: Optional[dict] = None) -> dict:
    """The JSON header describing ``model``'s checkpoint of ``tensors``."""
    base = model.fourbit_header
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
    return header


def write_atomic(path: Union[str, Path], blob: bytes) -> Path:
    """Write ``blob`` to ``path`` through a temporary file + fsync + rename. Returns the path."""
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


def _nonpersistent_buffers(model: nn.Module):
    """(name, tensor) of buffers registered with persistent=False (not in the state dict)."""
    for mod_name, mod in model.named_modules():
        for b in getattr(mod, "_non_persistent_buffers_set", ()):
            t = mod._buffers.get(b)
            if t is not None:
                yield (f"{mod_name}.{b}" if mod_name else b), t


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
    version = header.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version} is newer than this fourbit "
                              f"({__version__}) reads (<= {FORMAT_VERSION}); upgrade fourbit")
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
    return load_tensors(model, read_header(path), lambda: _read_tensors(path), path, strict=strict, device=device)


def load_tensors(model: nn.Module, header: dict, read: Callable[[], dict], source, strict: bool = True,
                 device=None) -> nn.Module:
    """``load`` from a header and a function reading the tensors (one file, or the shards of a folder);
    ``source`` names the checkpoint in messages."""
    path = source
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
    tensors = read()
    if _digest(tensors) != header.get("tensor_sha256"):
        raise CheckpointError(f"{path}: tensor data does not match its checksum: the file is damaged")

    for name, spec in layers.items():
        prefix = name + "."
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
        set_module(model, name, build_empty(spec, _layer_tensors(own)))
    buffers = {k[len(BUFFER_PREFIX):]: tensors.pop(k) for k in [k for k in tensors if k.startswith(BUFFER_PREFIX)]}
    state_keys = set(model.state_dict().keys())
    extra = sorted(set(tensors) - state_keys)
    lacking = sorted(state_keys - set(tensors))
    if strict and (extra or lacking):
        raise CheckpointError(f"{path}: tensors do not match the model: "
                              + (f"missing from file: {', '.join(lacking[:5])}; " if lacking else "")
                              + (f"not in model: {', '.join(extra[:5])}" if extra else ""))
    model.load_state_dict({k: v for k, v in tensors.items() if k in state_keys}, strict=strict, assign=True)
    _materialise_buffers(model, buffers, path)
    if device is not None:
        model.to(device)
    model.fourbit_header = {"config": header["config"], "architecture": header["architecture"],
                            "extra": header.get("extra", {})}
    if header.get("siblings"):
        model.fourbit_header["siblings"] = header["siblings"]
    guard_foreign_save(model)
    return model


def _materialise_buffers(model: nn.Module, saved: dict, path) -> None:
    """Give non-persistent buffers left on the meta device (PixArt's ``pos_embed.pos_embed``) the checkpoint's
    values; refuse if the checkpoint does not hold one."""
    for name, t in list(_nonpersistent_buffers(model)):
        if not t.is_meta:
            continue
        if name not in saved:
            raise CheckpointError(f"{path}: buffer {name} is on the meta device and the checkpoint does not hold "
                                  f"it; build the model on a real device (not meta) before loading")
        mod_name, _, b = name.rpartition(".")
        (model.get_submodule(mod_name) if mod_name else model)._buffers[b] = saved[name]


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
