"""Host (Python + launch) time per quantized-layer call at tiny M, where the GPU work is negligible.

    python benchmarks/host_overhead.py [TAG]      # a 3072x3072 int4p2 layer with a rank-32 branch, M = 16

Compare commits by running it with PYTHONPATH pointing at each one's ``src`` (``git archive <commit> src``).
"""
import sys
import time

import torch
from torch import nn
import fourbit
from fourbit.nn import quantized_layers
tag = sys.argv[1] if len(sys.argv) > 1 else "this tree"
torch.manual_seed(0)
lin = nn.Sequential(nn.Linear(3072, 3072)).cuda().bfloat16()
fourbit.quantize(lin, fourbit.RTNConfig(weights="int4p2", activations="int4p2", kernel="triton"), progress=False, verbose=False)
for _, l in quantized_layers(lin):
    kp, n = l.padded_in, l.out_features
    l.smooth = torch.rand(kp, device="cuda") + 0.5
    l.lr_down = (torch.randn(32, kp, device="cuda") / kp ** 0.5).bfloat16()
    l.lr_up = (torch.randn(n, 32, device="cuda") * 0.01).bfloat16()
    l._cache = {}
x = torch.randn(16, 3072, device="cuda", dtype=torch.bfloat16)
with torch.inference_mode():
    for mode in ("triton", "triton-memory"):
        fourbit.nn.set_kernel(lin, mode)
        for _ in range(50): lin(x)
        torch.cuda.synchronize()
        res = []
        for rep in range(5):
            t0 = time.perf_counter()
            for _ in range(500): lin(x)
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            res.append((t1 - t0) / 500 * 1e6)
        print(f"{tag} {mode}: host us/call median {sorted(res)[2]:.1f} (all {[round(r) for r in res]})", flush=True)
