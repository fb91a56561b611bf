"""``fourbit inspect``: print a checkpoint's header."""
from __future__ import annotations

from . import command


# ---- inspect ------------------------------------------------------------------------------------
@command("inspect", "print the header of a fourbit checkpoint")
def _inspect(p):
    p.add_argument("path")


def _run_inspect(args) -> int:
    import json

    from ..checkpoint import read_header

    h = read_header(args.path)
    layers = h.pop("layers")
    h.pop("tensor_sha256", None)
    print(json.dumps(h, indent=2))
    print(f"{len(layers)} quantized layers:")
    for name, spec in layers.items():
        a = spec["act_format"]["name"] if spec["act_format"] else "16-bit"
        print(f"  {name:<40} {spec['kind']:<7} {spec['in_features']:>6}->{spec['out_features']:<6} "
              f"W={spec['weight_format']['name']} A={a} rank={spec['rank']}")
    return 0


_inspect.run = _run_inspect
