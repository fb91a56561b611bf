"""``save_pretrained``/``from_pretrained``: a quantized diffusers component as a folder diffusers users know.

Folder layout: ``config.json`` (the component's diffusers config, as its own ``save_config`` writes it) and the
fourbit checkpoint, either one file ``fourbit_model.safetensors`` (the format of ``fourbit.save``, readable by
``fourbit.load``) or, above ``max_shard_size``, shards ``fourbit_model-0000i-of-0000n.safetensors`` with
``fourbit_model.safetensors.index.json`` (``weight_map`` as diffusers writes it, the fourbit header under
``metadata``). The weight names are deliberately not diffusers' (``diffusion_pytorch_model*``), so that
``SomeModel.from_pretrained(folder)`` fails loudly instead of re-initialising the 4-bit layers at random.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import save as st_save
from torch import nn

from ..checkpoint import (HEADER_KEY, CheckpointError, checkpoint_header, checkpoint_tensors, load_tensors,
                          read_header, write_atomic)
from ..utils.safetensors_io import read_safetensors
from . import compat

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "fourbit_model.safetensors"
INDEX_NAME = "fourbit_model.safetensors.index.json"
_DIFFUSERS_WEIGHTS = "diffusion_pytorch_model*"


def save_pretrained(component: nn.Module, directory: Union[str, Path], *, max_shard_size: Union[int, str] = "5GB",
                    extra: Optional[dict] = None) -> Path:
    """Write the quantized diffusers ``component`` to ``directory``: its ``config.json`` and the fourbit
    checkpoint, sharded above ``max_shard_size`` (bytes, or "5GB"/"500MB"). Tensors keep their dtypes (bf16 stays
    bf16). Returns the directory."""
    if getattr(component, "fourbit_header", None) is None:
        raise ValueError("component is not quantized by fourbit; call fourbit.quantize_pipeline (or fourbit.quantize) "
                         "first, or use the component's own save_pretrained for a 16-bit model")
    if not hasattr(component, "save_config"):
        raise ValueError(f"{type(component).__name__} is not a diffusers model (it has no save_config); "
                         f"save it with fourbit.save(model, path)")
    directory = Path(directory)
    stale = sorted(p.name for p in directory.glob(_DIFFUSERS_WEIGHTS)) if directory.is_dir() else []
    if stale:
        raise ValueError(f"{directory} already holds diffusers weights ({stale[0]}), which diffusers would load "
                         f"instead; save to an empty directory")
    directory.mkdir(parents=True, exist_ok=True)
    tensors = checkpoint_tensors(component)
    header = checkpoint_header(component, tensors, extra)
    for old in list(directory.glob("fourbit_model*.safetensors")) + list(directory.glob(INDEX_NAME)):
        old.unlink()
    component.save_config(directory)
    limit = parse_size(max_shard_size)
    shards = _shard(tensors, limit)
    if len(shards) == 1:
        write_atomic(directory / WEIGHTS_NAME, st_save(tensors, metadata={HEADER_KEY: json.dumps(header)}))
        return directory
    weight_map = {}
    for i, names in enumerate(shards, 1):
        fname = f"fourbit_model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_atomic(directory / fname, st_save({n: tensors[n] for n in names},
                                                metadata={"fourbit_shard": f"{i}/{len(shards)}"}))
        weight_map.update({n: fname for n in names})
    index = {"metadata": {"total_size": sum(_nbytes(t) for t in tensors.values()), HEADER_KEY: header},
             "weight_map": weight_map}
    write_atomic(directory / INDEX_NAME, json.dumps(index, indent=1).encode())  # last: a complete folder has it
    return directory


def from_pretrained(directory: Union[str, Path], device=None, *, strict: bool = True) -> nn.Module:
    """Rebuild a component saved by ``save_pretrained``: its diffusers class from ``config.json`` on the meta
    device, the checkpoint loaded onto it (every buffer materialised), then moved to ``device``. Ready for
    ``SomePipeline.from_pretrained(base, transformer=...)``."""
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory}: no {CONFIG_NAME}; is it a folder written by fourbit.save_pretrained?")
    config = json.loads(config_path.read_text())
    cls = _diffusers_class(config.get("_class_name"), directory)
    header, read = _checkpoint(directory)
    with torch.device("meta"):
        model = cls.from_config(config)
    load_tensors(model, header, read, directory, strict=strict)
    if device is not None:
        model.to(device)
    return compat.install(model.eval())


def load_pipeline(path, dtype: Optional[str] = None, device=None, **components):
    """``DiffusionPipeline.from_pretrained(path)`` (a local folder, or a model already in the local cache) in
    ``dtype`` ("bfloat16", ...), with ``components`` given instead of loaded (e.g. a quantized transformer)."""
    try:
        from diffusers import DiffusionPipeline
    except ImportError:
        raise ImportError("loading a pipeline needs diffusers: pip install fourbit[diffusers]") from None
    kw = {"torch_dtype": getattr(torch, dtype)} if dtype else {}
    pipe = DiffusionPipeline.from_pretrained(path, **kw, **components)
    if device:
        pipe.to(device)
    return pipe


def read_folder_header(directory: Union[str, Path]) -> dict:
    """The fourbit header of a folder written by ``save_pretrained`` (no tensors are read)."""
    return _checkpoint(Path(directory))[0]


# ---- helpers ------------------------------------------------------------------------------------
def parse_size(size: Union[int, str]) -> int:
    """Bytes from an int or "5GB" / "500MB" / "10KiB" (decimal and binary units)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size {size!r} is not a size; give bytes or e.g. '5GB', '500MB'")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " "))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _shard(tensors: dict, limit: int) -> list[list[str]]:
    """Names grouped into shards of at most ``limit`` bytes (a larger tensor gets a shard of its own), in
    sorted name order."""
    shards, current, size = [], [], 0
    for name in sorted(tensors):
        n = _nbytes(tensors[name])
        if current and size + n > limit:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += n
    return shards + [current] if current or not shards else shards


def _checkpoint(directory: Path):
    """(header, read) of the folder's single file or shards."""
    single, index_path = directory / WEIGHTS_NAME, directory / INDEX_NAME
    if single.is_file():
        return read_header(single), lambda: _read(single)
    if not index_path.is_file():
        diffusers_files = sorted(p.name for p in directory.glob(_DIFFUSERS_WEIGHTS))
        hint = (f" (it holds diffusers weights {diffusers_files[0]}: load a 16-bit model with diffusers and "
                f"quantize it)" if diffusers_files else "")
        raise CheckpointError(f"{directory}: no {WEIGHTS_NAME} or {INDEX_NAME}; not a fourbit folder{hint}")
    try:
        index = json.loads(index_path.read_text())
        header, weight_map = index["metadata"][HEADER_KEY], index["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: damaged index ({e!r}); save the component again") from None

    def read():
        out = {}
        for fname in sorted(set(weight_map.values())):
            part = _read(directory / fname)
            wrong = sorted(n for n in part if weight_map.get(n) != fname)
            if wrong:
                raise CheckpointError(f"{directory / fname}: holds {wrong[0]}, which the index places elsewhere")
            out.update(part)
        return out

    return header, read


def _read(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: shard missing; the folder is incomplete, save the component again")
    try:
        return read_safetensors(path)[0]
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: damaged checkpoint, tensors unreadable ({e})") from None


def _diffusers_class(name: Optional[str], directory: Path):
    try:
        import diffusers
    except ImportError:
        raise ImportError("fourbit.from_pretrained needs diffusers: pip install fourbit[diffusers]") from None
    cls = getattr(diffusers, name or "", None)
    if cls is None or not hasattr(cls, "from_config"):
        raise CheckpointError(f"{directory / CONFIG_NAME}: _class_name {name!r} is not a model class of the installed "
                              f"diffusers {diffusers.__version__}; install the diffusers version it was saved with")
    return cls
