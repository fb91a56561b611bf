"""Where the fused graph's fp32 error comes from (GPU): the block of ``test_fusion_under_inductor_gpu`` compiled with
``inductor_options()`` (the fourbit pass) and with plain inductor, each against eager, and inductor's LayerNorm alone.

    python benchmarks/probes/fusion_error_probe.py        # needs CUDA; prints relative Frobenius errors
"""
from __future__ import annotations

import os
import sys

import torch
import torch._dynamo

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # the repo root: tests/


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> int:
    from tests.kernels.test_fusion import _MlpBlock, _no_compile_caches, _quantized_block

    from fourbit.nn import inductor_options

    torch.manual_seed(0)
    x = torch.randn(2, 1100, 256, device="cuda")  # (batch, tokens, width) as the test
    block = _quantized_block(_MlpBlock(256, 1024).cuda(), x)
    with torch.no_grad():
        eager = block(x)
        print("eager rerun vs eager", rel(block(x), eager))
        outs = {}
        for name, opts in (("fused (inductor_options)", inductor_options()), ("plain inductor", None)):
            torch._dynamo.reset()
            with _no_compile_caches():
                outs[name] = torch.compile(block, options=opts, fullgraph=True)(x)
        torch._dynamo.reset()
        ln_eager = block.norm(x)
        ln = torch.compile(lambda t: block.norm(t))(x)
        print(f"LayerNorm inductor vs eager: rel {rel(ln, ln_eager):.3g}, "
              f"{(ln != ln_eager).sum().item()} of {ln.numel()} elements differ")
        for name, out in outs.items():
            print(f"{name} vs eager: rel {rel(out, eager):.3g}")
        print(f"fused vs plain inductor: rel {rel(*outs.values()):.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
