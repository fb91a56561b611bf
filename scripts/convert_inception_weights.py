"""Convert a local FID InceptionV3 state dict (.pth, e.g. pt_inception-2015-12-05-6726825d.pth) to safetensors.

Nothing is downloaded: bring the file yourself. The .pth is read with ``torch.load(weights_only=True)``
here, once; ``fourbit.eval.fid`` loads only the safetensors output. The keys are checked against our
network (``fc.*`` and ``num_batches_tracked`` are dropped).

    python scripts/convert_inception_weights.py pt_inception-2015-12-05-6726825d.pth ~/fid_inception.safetensors
    export FOURBIT_INCEPTION_WEIGHTS=~/fid_inception.safetensors
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from fourbit.eval.fid import FIDInceptionV3  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path, help="local .pth state dict")
    ap.add_argument("out", type=Path, help="output .safetensors")
    args = ap.parse_args(argv)
    raw = args.src.read_bytes()
    state = torch.load(args.src, weights_only=True, map_location="cpu")
    keep = [k for k in state if not k.startswith("fc.") and "num_batches_tracked" not in k]
    state = {k: state[k].float().contiguous() for k in keep}
    FIDInceptionV3().load_state_dict(state, strict=True)  # raises on any missing/unexpected key or shape
    meta = {"source_file": args.src.name, "source_sha256": hashlib.sha256(raw).hexdigest()}
    save_file(state, str(args.out), metadata=meta)
    print(f"wrote {args.out} ({len(state)} tensors), source sha256 {meta['source_sha256']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
