"""Saving and loading bundled-model weights: one fp16 safetensors file whose metadata records the architecture.

Metadata keys (all strings): ``format`` = ``fourbit.model``, ``format_version``, ``model`` (registry name),
``arch``, ``config`` (JSON of the architecture config) and optionally ``training`` (JSON: steps, wall time,
loss, seed, versions, date, ...).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from fourbit.models.registry import ARCHITECTURES, build_from_config, config_from_dict, get_spec
from fourbit.utils.safetensors_io import read_safetensors

FORMAT = "fourbit.model"
FORMAT_VERSION = "1"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def weights_path(name: str) -> Path:
    """Where the bundled weights of ``name`` live (whether or not the file exists)."""
    return WEIGHTS_DIR / get_spec(name).weights_file


def pretrained_available(name: str) -> bool:
    """True when the bundled weights file of ``name`` exists."""
    return weights_path(name).is_file()


def _arch_of(model: nn.Module) -> str:
    for arch, (config_cls, _) in ARCHITECTURES.items():
        if type(getattr(model, "config", None)) is config_cls:
            return arch
    raise TypeError(f"{type(model).__name__} has no known architecture config")


def save_weights(
    model: nn.Module,
    path: str | os.PathLike,
    name: str,
    training: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float16,
) -> None:
    """Write ``model``'s state (parameters and persistent buffers) in ``dtype`` plus metadata to ``path``."""
    arch = _arch_of(model)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": name,
        "arch": arch,
        "config": json.dumps(model.config.to_dict(), sort_keys=True),
    }
    if training is not None:
        metadata["training"] = json.dumps(training, sort_keys=True)
    save_file(tensors, os.fspath(path), metadata=metadata)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a weights file, with ``config`` and ``training`` decoded from JSON."""
    with safe_open(os.fspath(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    for key in ("config", "training"):
        if key in meta:
            meta[key] = json.loads(meta[key])
    return meta


def load_weights(
    path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, dict[str, Any]]:
    """Build the architecture a weights file describes and load it. Returns ``(model in eval mode, metadata)``.

    Unlike ``load_pretrained`` this accepts any config (e.g. tiny test models or fresh training outputs).
    """
    path = Path(path)
    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file (format={meta.get('format')!r})")
    config = config_from_dict(meta["arch"], meta["config"])
    model = build_from_config(meta["arch"], config, device="meta", dtype=dtype)
    state = {k: t.to(device=device, dtype=dtype) for k, t in read_safetensors(path)[0].items()}
    expected = set(model.state_dict())
    if set(state) != expected:
        raise ValueError(
            f"{path}: tensor names differ; missing {sorted(expected - set(state))}, "
            f"unexpected {sorted(set(state) - expected)}"
        )
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval(), meta


def load_pretrained(
    name: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    path: str | os.PathLike | None = None,
) -> nn.Module:
    """Load trained weights of bundled model ``name`` (from the package, or ``path``) into a new eval-mode model.

    Refuses (ValueError) a file written for another model, another architecture or another config than the
    registry's, and any missing or unexpected tensor.
    """
    spec = get_spec(name)
    path = Path(path) if path is not None else weights_path(name)
    if not path.is_file():
        raise FileNotFoundError(
            f"no weights for {name!r} at {path}; train them with `python -m fourbit.training.train --model {name}`"
        )
    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file (format={meta.get('format')!r})")
    if meta.get("model") != name or meta.get("arch") != spec.arch:
        raise ValueError(
            f"{path}: holds model {meta.get('model')!r} (arch {meta.get('arch')!r}), not {name!r} (arch {spec.arch!r})"
        )
    stored = config_from_dict(spec.arch, meta["config"])
    if stored != spec.config:
        diff = {k: (v, getattr(spec.config, k)) for k, v in vars(stored).items() if v != getattr(spec.config, k)}
        raise ValueError(
            f"{path}: architecture config differs from the registry's for {name!r} (file, registry): {diff}"
        )
    model, _ = load_weights(path, device=device, dtype=dtype)
    return model
