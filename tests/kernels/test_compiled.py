"""``kernels/compiled``: prepared layers run as custom ops under torch.compile (no graph break, eager's bits),
and the graph breaks (with or without a warning) where they cannot.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fourbit
from fourbit.nn import set_kernel

from .kernel_helpers import SQNR_FP32_REORDER_DB, sqnr_db

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("kernel", ["triton", "triton-memory"])
def test_compiled_model_runs_layers_as_custom_ops(kernel):
    """torch.compile traces through prepared layers (no graph break) and computes what eager computes."""
    import torch._dynamo

    from fourbit.nn import prepare_kernels

    lin1, lin2 = nn.Linear(200, 96), nn.Linear(96, 64)
    model = nn.Sequential(nn.LayerNorm(200), lin1, nn.GELU(), lin2)
    x = torch.randn(3, 17, 200)
    cfg = fourbit.SVDQuantConfig(weights="int4p2", activations="int4p2", rank=20, alpha=0.5, kernel=kernel)
    fourbit.quantize(model, cfg, forward_loop=lambda mm: mm(x), progress=False, verbose=False)
    prepare_kernels(model)
    with torch.no_grad():  # inference: the layers have no autograd formula
        eager = model(x)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model)(x)
        assert explained.graph_break_count == 0 and explained.graph_count == 1
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        assert torch.equal(compiled(x), eager)
    torch._dynamo.reset()


@pytest.mark.usefixtures("interpret")
def test_compiled_model_without_prepared_state_breaks_graphs_and_says_so():
    import torch._dynamo

    from fourbit.kernels import compiled as compiled_mod

    model = nn.Sequential(nn.Linear(200, 96))
    x = torch.randn(5, 200)
    fourbit.quantize(model, fourbit.RTNConfig(weights="int4p2", activations="int4p2", kernel="triton"),
                     progress=False, verbose=False)
    compiled_mod._WARNED[0] = False
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match="prepare_kernels"):
        explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count >= 1
    set_kernel(model, "reference")
    ref = model(x)
    set_kernel(model, "triton")
    assert sqnr_db(ref, model(x)) > SQNR_FP32_REORDER_DB
    torch._dynamo.reset()


@pytest.mark.usefixtures("interpret")
def test_compiled_w4a16_layers_break_quietly():
    """Plans without a custom op (16-bit activations) still compile, through a graph break, without the
    'prepare_kernels' warning (their state was prepared)."""
    import torch._dynamo

    from fourbit.nn import prepare_kernels

    model = nn.Sequential(nn.Linear(200, 96))
    x = torch.randn(5, 200)
    fourbit.quantize(model, fourbit.RTNConfig(weights="nf4", activations=None, kernel="triton"),
                     progress=False, verbose=False)
    prepare_kernels(model)
    with torch.no_grad():
        eager = model(x)
        torch._dynamo.reset()
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            compiled = torch.compile(model, backend="aot_eager")(x)
        assert torch.equal(compiled, eager)
    torch._dynamo.reset()


@pytest.mark.usefixtures("interpret")
def test_loaded_checkpoint_with_siblings_compiles_without_graph_breaks(tmp_path):
    """quantize (siblings fused, Triton kernel) -> save -> load into a fresh model -> prepare_kernels ->
    torch.compile: one graph, the eager result."""
    import torch._dynamo

    from fourbit.nn import prepare_kernels
    from fourbit.siblings import find_siblings, fuse_siblings

    class Attn(nn.Module):
        def __init__(self, d=64):
            super().__init__()
            self.norm = nn.LayerNorm(d)
            self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

        def forward(self, x):
            h = self.norm(x)
            q, k, v = self.q(h), self.k(h), self.v(h)
            return x + self.o(torch.softmax(q @ k.transpose(-1, -2) / 8, -1) @ v)

    torch.manual_seed(0)
    net, x = nn.Sequential(Attn(), Attn()), torch.randn(2, 9, 64)
    cfg = fourbit.SVDQuantConfig(weights="int4p2", activations="int4p2", rank=8, kernel="triton")
    fuse_siblings(net, find_siblings(net, lambda m: m(x), config=cfg))
    fourbit.quantize(net, cfg, forward_loop=lambda m: m(x), progress=False, verbose=False)
    path = fourbit.save(net, tmp_path / "q.safetensors")
    torch.manual_seed(1)
    fresh = fourbit.load(nn.Sequential(Attn(), Attn()), path)
    prepare_kernels(fresh)
    with torch.no_grad():
        eager = fresh(x)
        torch.testing.assert_close(eager, net(x), rtol=0, atol=0)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(fresh)(x)
        assert explained.graph_break_count == 0
        torch._dynamo.reset()
        assert torch.equal(torch.compile(fresh, backend="aot_eager")(x), eager)
    torch._dynamo.reset()


@pytest.mark.usefixtures("interpret")
def test_prepare_kernels_skips_operands_of_single_row_layers():
    """With a forward loop, a layer only ever called with one row (a modulation linear) keeps no speed-mode
    operand; the compiled model has no graph break and eager's result (its GEMV reads the packed weight)."""
    import torch._dynamo

    from fourbit.kernels.linear import _CACHE_KEY
    from fourbit.nn import prepare_kernels

    class Modulated(nn.Module):
        def __init__(self):
            super().__init__()
            self.mod, self.lin = nn.Linear(64, 128), nn.Linear(64, 64)

        def forward(self, x, t):  # x (B, S, 64), t (1, 64): one row
            shift, scale = self.mod(t).chunk(2, dim=-1)
            return self.lin(x * (1 + scale) + shift)

    torch.manual_seed(0)
    model, x, t = Modulated(), torch.randn(2, 9, 64), torch.randn(1, 64)
    cfg = fourbit.SVDQuantConfig(weights="int4p2", activations="int4p2", rank=8, kernel="triton")
    fourbit.quantize(model, cfg, forward_loop=lambda m: m(x, t), progress=False, verbose=False)
    prepare_kernels(model, forward_loop=lambda m: m(x, t))
    assert model.mod._cache[_CACHE_KEY].weight is None and model.lin._cache[_CACHE_KEY].weight is not None
    with torch.no_grad():
        eager = model(x, t)
        torch._dynamo.reset()
        assert torch._dynamo.explain(model)(x, t).graph_break_count == 0
        torch._dynamo.reset()
        assert torch.equal(torch.compile(model, backend="aot_eager", fullgraph=True)(x, t), eager)
    prepare_kernels(model)  # without a loop: every layer gets its operand again
    assert model.mod._cache[_CACHE_KEY].weight is not None
    torch._dynamo.reset()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kernel", ["triton", "triton-memory"])
def test_compiled_layers_gpu(kernel):
    """Under torch.compile (inductor) prepared layers run as custom ops: no graph break, the eager bits."""
    import torch._dynamo

    from fourbit.nn import prepare_kernels

    model = nn.Sequential(nn.Linear(512, 384), nn.Linear(384, 256)).cuda().bfloat16()
    x = torch.randn(300, 512, device="cuda", dtype=torch.bfloat16)
    cfg = fourbit.SVDQuantConfig(weights="int4p2", activations="int4p2", rank=32, kernel=kernel)
    fourbit.quantize(model, cfg, forward_loop=lambda m: m(x), progress=False, verbose=False)
    prepare_kernels(model)
    with torch.no_grad():
        eager = model(x)
        torch._dynamo.reset()
        assert torch._dynamo.explain(model)(x).graph_break_count == 0
        torch._dynamo.reset()
        with torch._inductor.config.patch(compile_threads=1):  # no worker pool left running at exit
            assert torch.equal(torch.compile(model, fullgraph=True)(x), eager)
    torch._dynamo.reset()

