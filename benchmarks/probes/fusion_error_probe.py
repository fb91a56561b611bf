"""Where the fused graph's fp32 error comes from (GPU): the block of ``test_fusion_under_inductor_gpu`` and two
variants of it (activations only: the concatenation kept out of the pass; concatenation only: no activations),
each compiled with ``inductor_options()`` (the fourbit pass) and with plain inductor, against eager.

    python benchmarks/probes/fusion_error_probe.py        # needs CUDA; prints relative Frobenius errors
    TRITON_INTERPRET=1 python benchmarks/probes/fusion_error_probe.py --device cpu --tokens 20   # smoke test

H200, 2026-12-04 (first version, whole block only): fused 9.09e-5 from eager, plain inductor 6.7e-7; the same
block through the Triton interpreter on the CPU: fused 4.6e-8, plain 4.5e-8.
"""
from __future__ import annotations

import os
import sys

import torch
import torch._dynamo

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # the repo root: tests/
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # benchmarks/linear.py
from linear import rel_err as rel  # noqa: E402


def variants():
    from tests.kernels.test_fusion import _MlpBlock

    class ActOnly(_MlpBlock):
        """Both activations; the concatenation feeds a multiply, so the pass leaves it alone."""

        def forward(self, x):
            n = self.norm(x)
            q, m = self.to_q(n), self.act(self.proj_mlp(n))
            y = x + self.proj_out(torch.cat([torch.tanh(q), m], dim=2) * 1.0)
            return y + self.fc2(torch.nn.functional.gelu(self.fc1(y)))

    class CatOnly(_MlpBlock):
        """No activation after a quantized layer; the concatenation read in place."""

        def forward(self, x):
            n = self.norm(x)
            q, m = self.to_q(n), self.proj_mlp(n)
            y = x + self.proj_out(torch.cat([torch.tanh(q), m], dim=2))
            return y + self.fc2(self.fc1(y))

    return {"block": _MlpBlock, "activations only": ActOnly, "concatenation only": CatOnly}


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda, or cpu with TRITON_INTERPRET=1 (a smoke test)")
    p.add_argument("--tokens", type=int, default=1100)
    args = p.parse_args(argv)
    from tests.kernels.test_fusion import _no_compile_caches, _quantized_block

    from fourbit.kernels.fusion import fusion_stats
    from fourbit.nn import inductor_options

    for label, cls in variants().items():
        torch.manual_seed(0)
        x = torch.randn(2, args.tokens, 256, device=args.device)  # (batch, tokens, width) as the test
        block = _quantized_block(cls(256, 1024).to(args.device), x)
        with torch.no_grad():
            eager = block(x)
            errs = {}
            for name, opts in (("fused", inductor_options()), ("plain inductor", None)):
                before = fusion_stats()
                torch._dynamo.reset()
                with _no_compile_caches():
                    out = torch.compile(block, options=opts, fullgraph=True)(x)
                after = fusion_stats()
                moved = {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}
                errs[name] = (rel(out, eager), moved)
        print(f"{label}: " + "; ".join(f"{k} vs eager {e:.3g} (fused {m})" for k, (e, m) in errs.items()), flush=True)
    torch._dynamo.reset()
    return 0


if __name__ == "__main__":
    sys.exit(main())
