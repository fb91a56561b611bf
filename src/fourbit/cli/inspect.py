"""``fourbit inspect``: verify a checkpoint (header and tensor checksums) and print its header, file size and
bits per weight."""
from __future__ import annotations

from . import command


# ---- inspect ------------------------------------------------------------------------------------
@command("inspect", "verify a fourbit checkpoint and print its header, size and bits per weight")
def _inspect(p):
    p.add_argument("path")
    p.add_argument("--header-only", action="store_true",
                   help="check and print the header only (skip reading the tensors: no size/bits, no tensor checksum)")


_WEIGHT = ("weight_packed", "weight_scales", "weight_row_scale")
_EXTRA = ("smooth", "lr_down", "lr_up")


def layer_bits(name: str, spec: dict, tensors: dict) -> tuple[float, float]:
    """(bits per weight of the quantized weight: codes + scales + row scale, the same plus the smoothing
    factors and the low-rank branch), both as stored, per original weight element N*K (K unpadded)."""
    def bits(keys):
        return sum(8 * t.numel() * t.element_size() for k in keys
                   if (t := tensors.get(f"{name}.{k}")) is not None)

    elems = spec["out_features"] * spec["in_features"]
    return bits(_WEIGHT) / elems, bits(_WEIGHT + _EXTRA) / elems


def _run_inspect(args) -> int:
    import json
    from pathlib import Path

    from ..checkpoint import read_checkpoint, read_header

    path = Path(args.path)
    if args.header_only:
        h, tensors = read_header(path), None
    else:
        h, tensors = read_checkpoint(path)
    layers = h.pop("layers")
    for key in ("tensor_sha256", "header_sha256"):
        h.pop(key, None)
    print(json.dumps(h, indent=2))
    checked = "header checksum OK" if tensors is None else "header and tensor checksums OK"
    size = path.stat().st_size
    print(f"file: {size / 2**20:.2f} MiB ({size} bytes), {checked}")
    print(f"{len(layers)} quantized layers:")
    total = {"w": 0.0, "all": 0.0, "n": 0}
    for name, spec in layers.items():
        a = spec["act_format"]["name"] if spec["act_format"] else "16-bit"
        line = (f"  {name:<40} {spec['kind']:<7} {spec['in_features']:>6}->{spec['out_features']:<6} "
                f"W={spec['weight_format']['name']} A={a} rank={spec['rank']} kernel={spec['kernel']}")
        if tensors is not None:
            w, full = layer_bits(name, spec, tensors)
            n = spec["out_features"] * spec["in_features"]
            total["w"], total["all"], total["n"] = total["w"] + w * n, total["all"] + full * n, total["n"] + n
            line += f"  {w:.2f} bits/w ({full:.2f} with low-rank/smoothing)"
        print(line)
    kernels: dict = {}
    for spec in layers.values():
        kernels[spec["kernel"]] = kernels.get(spec["kernel"], 0) + 1
    print("kernels: " + ", ".join(f"{k} {n}" for k, n in sorted(kernels.items())) + " (layers; a precision plan's "
          "choice per layer, or set them all with fourbit.nn.set_kernel)")
    if tensors is not None and total["n"]:
        print(f"bits per weight over the quantized layers: {total['w'] / total['n']:.3f} (codes + scales), "
              f"{total['all'] / total['n']:.3f} with the low-rank branches and smoothing factors as stored")
    return 0


_inspect.run = _run_inspect
