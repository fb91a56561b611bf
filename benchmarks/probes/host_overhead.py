"""Host (Python + launch) time per quantized-layer call at tiny M, where the GPU work is negligible.

    python benchmarks/probes/host_overhead.py [TAG]           # GPU: a 3072x3072 int4p2 layer, rank-32 branch, M = 16
    python benchmarks/probes/host_overhead.py --no-launch     # CPU: fourbit's own Python time, Triton launches
                                                       # replaced by no-ops (plus a cProfile of the call)

Compare commits by running it with PYTHONPATH pointing at each one's ``src`` (``git archive <commit> src``).
"""
import os
import sys

NO_LAUNCH = "--no-launch" in sys.argv
if NO_LAUNCH:  # kernels defined for the interpreter (CPU tensors accepted), then never launched
    os.environ["TRITON_INTERPRET"] = "1"

import cProfile  # noqa: E402
import io  # noqa: E402
import pstats  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402


def _disable_launches():
    import triton
    import triton.runtime.interpreter as interp

    def no_op(*args, **kwargs):
        return None

    triton.runtime.jit.JITFunction.__getitem__ = lambda self, grid: no_op
    interp.InterpretedFunction.__getitem__ = lambda self, grid: no_op


def main():
    import fourbit
    from fourbit.nn import quantized_layers

    tag = next((a for a in sys.argv[1:] if not a.startswith("--")), "this tree")
    device = "cpu" if NO_LAUNCH else "cuda"
    if NO_LAUNCH:
        _disable_launches()
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(3072, 3072)).to(device).bfloat16()
    fourbit.quantize(lin, fourbit.RTNConfig(weights="int4p2", activations="int4p2", kernel="triton"),
                     progress=False, verbose=False)
    for _, layer in quantized_layers(lin):  # what SVDQuant would add: smoothing and a rank-32 branch
        kp, n = layer.padded_in, layer.out_features
        layer.smooth = torch.rand(kp, device=device) + 0.5
        layer.lr_down = (torch.randn(32, kp, device=device) / kp ** 0.5).bfloat16()
        layer.lr_up = (torch.randn(n, 32, device=device) * 0.01).bfloat16()
        layer._cache = {}
    x = torch.randn(16, 3072, device=device, dtype=torch.bfloat16)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.inference_mode():
        for mode in ("triton", "triton-memory"):
            fourbit.nn.set_kernel(lin, mode)
            for _ in range(50):
                lin(x)
            sync()
            res = []
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(500):
                    lin(x)
                t1 = time.perf_counter()
                sync()
                res.append((t1 - t0) / 500 * 1e6)
            print(f"{tag} {mode}: host us/call median {sorted(res)[2]:.1f} (all {[round(r) for r in res]})",
                  flush=True)
        if NO_LAUNCH:
            fourbit.nn.set_kernel(lin, "triton")
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(500):
                lin(x)
            prof.disable()
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats(os.environ.get("SORT", "tottime")).print_stats(int(os.environ.get("TOP", 15)))
            print(out.getvalue())


if __name__ == "__main__":
    main()
