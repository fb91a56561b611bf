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
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save
from torch import nn

from . import __version__
from .api import architecture_fingerprint
from .checkpoint_header import HeaderError, check_header, header_digest
from .config import QuantConfig
from .formats import format_from_spec
from .kernels import available_kernels
from .nn import QuantLinear, build_empty, quantized_layers, set_module
from .siblings import fuse_siblings
from .utils.files import atomic_write, check_output_file, check_readable_file, error_text
from .utils.foreign import guard_foreign_save
from .utils.safetensors_io import read_safetensors

FORMAT_VERSION = 2
HEADER_KEY = "fourbit"
BUFFER_PREFIX = "@buffer."  # non-persistent buffers (no module name starts with "@")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded onto this model: the message (always one line) says why and what to do."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # causes quoted from other libraries may span lines


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
    """Write ``model`` (quantized by ``fourbit.quantize``) to ``path`` atomically (``write_atomic``). Returns the
    path."""
    if getattr(model, "fourbit_header", None) is None:
        raise ValueError("model is not quantized by fourbit (call fourbit.quantize first)")
    check_output_file(path)  # a directory, an unwritable folder: said before the tensors are gathered
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
    """The JSON header describing ``model``'s checkpoint of ``tensors``, its own checksum last."""
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
    header["header_sha256"] = header_digest(header)
    return header


def write_atomic(path: Union[str, Path], blob: bytes) -> Path:
    """Write ``blob`` to ``path`` atomically (``fourbit.utils.files.atomic_write``: temporary file + fsync +
    rename; a symbolic link's target is written, the mode follows the replaced file or the umask, temporary
    files of killed saves are removed). Returns the path."""
    return atomic_write(path, blob)


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
    try:
        check_readable_file(path)
    except (ValueError, OSError) as err:  # absent, a directory, a FIFO, unreadable: said as what it is
        raise CheckpointError(error_text(err)) from None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path}: damaged or not a safetensors file ({e})") from None
    if HEADER_KEY not in meta:
        raise CheckpointError(f"{path}: a safetensors file but not a fourbit checkpoint (no '{HEADER_KEY}' header)")
    try:
        header = json.loads(meta[HEADER_KEY])
    except (json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: damaged fourbit header ({e or 'nested too deeply'})") from None
    return validate_header(header, path)


def validate_header(header, source) -> dict:
    """Check a parsed header (from a file or a sharded folder's index; ``source`` names it in messages): its
    format version, its checksum, its schema, and that its config, formats and kernels exist here. Returns it."""
    path = source
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
    try:
        check_header(header)
        _check_meaning(header)
    except HeaderError as err:
        raise CheckpointError(f"{path}: invalid fourbit header: {err}") from None
    return header


def _check_meaning(header: dict) -> None:
    """What the schema's types cannot say: the config, the formats and the kernels must exist here."""
    try:
        QuantConfig.from_dict(header["config"])
    except (ValueError, TypeError, KeyError) as err:
        raise HeaderError(f"its config is not valid here ({_first_line(err)})") from None
    kernels = available_kernels()
    for name, spec in header["layers"].items():
        for key in ("weight_format", "act_format"):
            try:
                format_from_spec(spec[key])
            except (ValueError, TypeError) as err:
                raise HeaderError(f"layer {name!r}: {key} is not valid here ({_first_line(err)})") from None
        if spec["kernel"] not in kernels:
            raise HeaderError(f"layer {name!r}: unknown kernel {spec['kernel']!r}; known: {', '.join(kernels)}")


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return read_safetensors(path)[0]
    except Exception as e:
        raise CheckpointError(f"{path}: damaged checkpoint, tensors unreadable ({e})") from None


def load(model: nn.Module, path: Union[str, Path], strict: bool = True, device=None) -> nn.Module:
    """Load a checkpoint written by ``fourbit.save`` onto ``model``, a freshly built 16-bit model of the same
    architecture (on the meta device or a real one). Replaces its layers in place and returns it.

    Refuses, with a one-line reason: a different architecture, missing or extra layers/tensors, a newer
    format version, a damaged file, a header that breaks its schema or disagrees with the tensors. Every
    layer is rebuilt and every check done before the first one is swapped in: a refused load leaves the
    model as it was.
    """
    if getattr(model, "fourbit_header", None) is not None:
        raise CheckpointError("model is already quantized; load onto a freshly built 16-bit model")
    path = Path(path)
    return load_tensors(model, read_header(path), lambda: _read_tensors(path), path, strict=strict, device=device)


def load_tensors(model: nn.Module, header: dict, read: Callable[[], dict], source, strict: bool = True,
                 device=None) -> nn.Module:
    """``load`` from a header and a function reading the tensors (one file, or the shards of a folder);
    ``source`` names the checkpoint in messages. The header is validated here (whatever its origin) and the
    tensors checked against its checksum before anything is built."""
    path = source
    if getattr(model, "fourbit_header", None) is not None:
        raise CheckpointError("model is already quantized; load onto a freshly built 16-bit model")
    header = validate_header(header, path)
    tensors = read()
    if _digest(tensors) != header["tensor_sha256"]:
        raise CheckpointError(f"{path}: tensor data does not match its checksum: the file is damaged")
    buffers = {k[len(BUFFER_PREFIX):]: tensors.pop(k) for k in [k for k in tensors if k.startswith(BUFFER_PREFIX)]}
    undo = _fuse_for_load(model, path, header.get("siblings"))
    fused = bool(undo)
    try:
        new_modules, rest = _build(model, path, header, tensors, strict)
        buffer_plan = _plan_buffers(model, buffers, path)
        for name, new in new_modules.items():
            undo.append((name, model.get_submodule(name)))
            set_module(model, name, new)
        model.load_state_dict(rest, strict=False, assign=True)
        for owner, b, t in buffer_plan:
            owner._buffers[b] = t
    except BaseException:
        for name, old in reversed(undo):  # put every replaced module back
            set_module(model, name, old)
        if fused:
            model.__dict__.pop("fourbit_siblings", None)
        raise
    if device is not None:
        model.to(device)
    model.fourbit_header = {"config": header["config"], "architecture": header["architecture"],
                            "extra": header["extra"]}
    if header.get("siblings"):
        model.fourbit_header["siblings"] = header["siblings"]
    guard_foreign_save(model)
    return model


def read_checkpoint(path: Union[str, Path]) -> tuple[dict, dict[str, torch.Tensor]]:
    """The header and every tensor of a checkpoint file, both checked against their checksums (nothing built)."""
    path = Path(path)
    header = read_header(path)
    tensors = _read_tensors(path)
    if _digest(tensors) != header["tensor_sha256"]:
        raise CheckpointError(f"{path}: tensor data does not match its checksum: the file is damaged")
    return header, tensors


def _plan_buffers(model: nn.Module, saved: dict, path) -> list:
    """[(module, buffer name, tensor)] giving non-persistent buffers left on the meta device (PixArt's
    ``pos_embed.pos_embed``) the checkpoint's values; refuses, before anything changes, if one is not saved."""
    plan = []
    for name, t in list(_nonpersistent_buffers(model)):
        if not t.is_meta:
            continue
        if name not in saved:
            raise CheckpointError(f"{path}: buffer {name} is on the meta device and the checkpoint does not hold "
                                  f"it; build the model on a real device (not meta) before loading")
        mod_name, _, b = name.rpartition(".")
        plan.append((model.get_submodule(mod_name) if mod_name else model, b, saved[name]))
    return plan


def _fuse_for_load(model: nn.Module, path: Path, groups: Optional[list]) -> list:
    """Fuse the checkpoint's sibling groups on ``model``; returns [(name, original module)] to undo it."""
    if not groups or getattr(model, "fourbit_siblings", None) == groups:
        return []
    if getattr(model, "fourbit_siblings", None):
        raise CheckpointError(f"{path}: the model's fused sibling layers differ from the checkpoint's; "
                              f"load onto an unfused 16-bit model")
    modules = dict(model.named_modules())
    undo = [(n, modules[n]) for g in groups for n in g if n in modules]
    try:
        fuse_siblings(model, groups)  # the checkpoint was quantized with these layers fused
    except ValueError as err:
        for name, old in reversed(undo):
            set_module(model, name, old)
        model.__dict__.pop("fourbit_siblings", None)
        raise CheckpointError(f"{path}: cannot fuse the checkpoint's sibling layers on this model: {err}") from None
    return undo


def _build(model: nn.Module, path: Path, header: dict, tensors: dict, strict: bool) -> tuple[dict, dict]:
    """Check the checkpoint against ``model`` and build every quantized layer, touching nothing.
    Returns ({layer name: new module}, {state key: tensor} of the rest of the model)."""
    layers = header["layers"]
    modules = dict(model.named_modules())
    missing = [n for n in layers if n not in modules]
    if missing:
        raise CheckpointError(f"{path}: checkpoint layer(s) missing from this model: {', '.join(missing[:5])}"
                              f"{' ...' if len(missing) > 5 else ''} - is it the same architecture?")
    fingerprint = architecture_fingerprint(model)
    if fingerprint != header["architecture"] and strict:
        for name, spec in layers.items():  # a layer-level difference names the layer
            _check_layer(path, name, modules[name], spec)
        raise CheckpointError(f"{path}: architecture fingerprint {header['architecture']} differs from this "
                              f"model's {fingerprint}: the checkpoint was made from a different architecture "
                              f"or configuration")
    new_modules, claimed = {}, set()
    for name, spec in layers.items():
        _check_layer(path, name, modules[name], spec)
        prefix = name + "."
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        claimed.update(prefix + k for k in own)
        new_modules[name] = _build_layer(path, name, spec, own)
    quantized_prefixes = tuple(n + "." for n in layers)
    model_rest = {k: v for k, v in model.state_dict().items() if not k.startswith(quantized_prefixes)}
    rest = {k: v for k, v in tensors.items() if k not in claimed}
    lacking = sorted(set(model_rest) - set(rest))
    extra = sorted(set(rest) - set(model_rest))
    if strict and (extra or lacking):
        raise CheckpointError(f"{path}: tensors do not match the model: "
                              + (f"missing from file: {', '.join(lacking[:5])}; " if lacking else "")
                              + (f"not in model: {', '.join(extra[:5])}" if extra else ""))
    for key in sorted(set(rest) & set(model_rest)):
        if rest[key].shape != model_rest[key].shape:
            raise CheckpointError(f"{path}: tensor {key} has shape {list(rest[key].shape)} in the checkpoint but "
                                  f"{list(model_rest[key].shape)} in this model: different architecture")
    return new_modules, {k: v for k, v in rest.items() if k in model_rest}


def _build_layer(path: Path, name: str, spec: dict, own: dict) -> QuantLinear:
    """A quantized layer from its (schema-checked) spec and its tensors, after checking they agree."""
    unknown = sorted(set(own) - set(_LAYER_TENSORS))
    if unknown:
        raise CheckpointError(f"{path}: layer {name} has unexpected tensor(s) {', '.join(unknown[:5])} in the "
                              f"checkpoint: the file is damaged or from another library")
    problem = _layer_tensor_problem(spec, own)
    if problem:
        raise CheckpointError(f"{path}: layer {name}: {problem}: the header and the tensors disagree")
    return build_empty(spec, _layer_tensors(own))


_LAYER_TENSORS = ("weight_packed", "weight_scales", "weight_row_scale", "smooth", "lr_down", "lr_up", "bias")


def _layer_tensors(own: dict) -> dict:
    return {n: own.get(n) for n in _LAYER_TENSORS}


def _layer_tensor_problem(spec: dict, own: dict) -> Optional[str]:
    """What is wrong between a layer's spec and its tensors (shapes, dtypes, presence), or None."""
    wf, af = format_from_spec(spec["weight_format"]), format_from_spec(spec["act_format"])
    n, kp, r = spec["out_features"], spec["padded_in"], spec["rank"]
    for fmt in (wf, af):
        if fmt is not None and kp % fmt.group_for(kp):
            return f"padded_in {kp} is not a multiple of {fmt.name}'s group size {fmt.group_for(kp)}"
    if kp * wf.code_bits % 8:
        return f"padded_in {kp} does not fill whole bytes of {wf.code_bits}-bit codes"
    storage = wf.storage_shapes(n, kp)
    expected = {"weight_packed": storage["codes"], "weight_scales": storage["scales"],
                "weight_row_scale": storage.get("row_scale")}
    floats = (torch.float32, torch.float16, torch.bfloat16)
    lr_dtype = own["lr_down"].dtype if own.get("lr_down") is not None else None
    expected.update(smooth=((kp,), torch.float32), bias=((n,), None),
                    lr_down=((r, kp), None) if r else None, lr_up=((n, r), lr_dtype) if r else None)
    optional = ("smooth", "bias")
    for key, want in expected.items():
        t = own.get(key)
        if want is None:
            if t is not None:
                return f"tensor {key} is present but the spec has none (rank {r}, format {wf.name})"
            continue
        if t is None:
            if key in optional:
                continue
            return f"tensor {key} is missing"
        shape, dtype = want
        if tuple(t.shape) != tuple(shape):
            return f"tensor {key} has shape {list(t.shape)}, the spec implies {list(shape)}"
        if dtype is not None and t.dtype != dtype:
            return f"tensor {key} is {t.dtype}, the spec implies {dtype}"
        if dtype is None and t.dtype not in floats:
            return f"tensor {key} is {t.dtype}, expected a 16- or 32-bit float"
    return None


def _check_layer(path: Path, name: str, module: nn.Module, spec: dict) -> None:
    if isinstance(module, QuantLinear):
        raise CheckpointError(f"{path}: layer {name} of the model is already quantized")
    kind = spec["kind"]
    if kind == "linear":
        ok = isinstance(module, nn.Linear) and (module.in_features, module.out_features) == (
            spec["in_features"], spec["out_features"])
    else:
        ok = isinstance(module, nn.Conv2d) and module.out_channels == spec["out_features"] and (
            module.in_channels * module.kernel_size[0] * module.kernel_size[1] == spec["in_features"]) and all(
            list(getattr(module, f)) == spec[f] for f in ("kernel_size", "stride", "padding", "dilation")
            if not isinstance(getattr(module, f), str))
    if not ok:
        raise CheckpointError(f"{path}: layer {name} is a {kind} {spec['in_features']}->{spec['out_features']} in "
                              f"the checkpoint but {module} in this model: different architecture")
