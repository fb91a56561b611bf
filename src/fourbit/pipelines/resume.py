"""``WorkFolder``: the store that makes ``fourbit.quantize`` resumable (its ``store=`` argument).

Layout: ``manifest.json`` (what the run is: config, architecture, calibration settings; a folder started for
another run is refused), ``stats.safetensors`` (the calibration statistics, written once calibration ends) and
``layers/<name>.safetensors`` (each converted layer, written atomically as it finishes). A killed run started
again with the same folder reuses the statistics and the finished layers, so its result is bit-identical to an
uninterrupted run.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import save as st_save
from torch import nn

from ..calibration import LayerStats
from ..checkpoint import write_atomic
from ..nn import build_empty
from ..utils.safetensors_io import read_safetensors

_LAYER_TENSORS = ("weight_packed", "weight_scales", "weight_row_scale", "smooth", "lr_down", "lr_up", "bias")


class WorkFolder:
    """A resumable run's folder; ``key`` (JSON-able) identifies the run."""

    def __init__(self, directory: Union[str, Path], key: dict):
        self.dir = Path(directory)
        (self.dir / "layers").mkdir(parents=True, exist_ok=True)
        manifest = self.dir / "manifest.json"
        key = json.loads(json.dumps(key, sort_keys=True))
        if manifest.is_file():
            old = json.loads(manifest.read_text())
            if old != key:
                diff = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
                raise ValueError(f"work folder {self.dir} was started for a different run (differs in "
                                 f"{', '.join(diff)}); delete it or choose another work folder")
        else:
            write_atomic(manifest, json.dumps(key, sort_keys=True, indent=1).encode())
        self.layers_loaded, self.stats_loaded = 0, False

    # ---- calibration statistics -------------------------------------------------------------------
    def load_stats(self) -> Optional[dict]:
        path = self.dir / "stats.safetensors"
        if not path.is_file():
            return None
        self.stats_loaded = True
        tensors, meta = read_safetensors(path)
        return {name: LayerStats(tensors[f"{name}/absmax"], tensors[f"{name}/rows"], n, calls)
                for name, (n, calls) in json.loads(meta["counts"]).items()}

    def save_stats(self, stats: dict) -> None:
        tensors, counts = {}, {}
        for name, s in stats.items():
            tensors[f"{name}/absmax"] = s.absmax.contiguous().cpu()
            tensors[f"{name}/rows"] = s.rows.contiguous().cpu()
            counts[name] = [s.rows_seen, s.calls]
        write_atomic(self.dir / "stats.safetensors", st_save(tensors, metadata={"counts": json.dumps(counts)}))

    # ---- converted layers --------------------------------------------------------------------------
    def _layer_path(self, name: str) -> Path:
        return self.dir / "layers" / f"{name}.safetensors"

    def load_layer(self, name: str) -> Optional[nn.Module]:
        path = self._layer_path(name)
        if not path.is_file():
            return None
        tensors, meta = read_safetensors(path)
        layer = build_empty(json.loads(meta["spec"]), {n: tensors.get(n) for n in _LAYER_TENSORS})
        layer.compute_dtype = getattr(torch, meta["compute_dtype"])
        layer.quant_info = json.loads(meta["info"])
        self.layers_loaded += 1
        return layer

    def save_layer(self, name: str, layer: nn.Module) -> None:
        tensors = {k: v.detach().contiguous().cpu() for k, v in layer.state_dict().items()}
        info = {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in layer.quant_info.items()}
        meta = {"spec": json.dumps(layer.layer_spec()), "info": json.dumps(info),
                "compute_dtype": str(layer.compute_dtype).removeprefix("torch.")}
        write_atomic(self._layer_path(name), st_save(tensors, metadata=meta))
