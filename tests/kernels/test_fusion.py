"""``kernels/fusion``: the graph pass that moves activations into the GEMM epilogue and reads concatenations in
place; compiled results against eager (``SQNR_FUSED_FP32_DB``: only fp32 rounding differs).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fourbit

from .kernel_helpers import SQNR_FP32_REORDER_DB, SQNR_FUSED_FP32_DB, SQNR_INDUCTOR_FP32_DB, sqnr_db

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class _MlpBlock(nn.Module):
    """FLUX-like: a norm read by a query projection and an MLP input projection (siblings), tanh-GELU on the MLP
    columns, the two concatenated into an output projection; then a plain MLP with exact GELU."""

    def __init__(self, d=64, h=128):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.to_q, self.proj_mlp, self.proj_out = nn.Linear(d, d), nn.Linear(d, h), nn.Linear(d + h, d)
        self.act = nn.GELU(approximate="tanh")
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        n = self.norm(x)
        q, m = self.to_q(n), self.act(self.proj_mlp(n))
        y = x + self.proj_out(torch.cat([torch.tanh(q), m], dim=2))
        return y + self.fc2(torch.nn.functional.gelu(self.fc1(y)))


def _quantized_block(block, x, siblings=True):
    from fourbit.nn import prepare_kernels
    from fourbit.siblings import find_siblings, fuse_siblings

    cfg = fourbit.SVDQuantConfig(weights="int4p2", activations="int4p2", rank=8, kernel="triton")
    if siblings:
        fuse_siblings(block, find_siblings(block, lambda m: m(x), config=cfg))
    fourbit.quantize(block, cfg, forward_loop=lambda m: m(x), progress=False, verbose=False)
    return prepare_kernels(block)


def _compile_with_pass(model, graphs):
    """torch.compile whose backend runs the fusion pass on dynamo's graph (appended to ``graphs``), then the graph
    as is (no inductor)."""
    from fourbit.kernels.fusion import FuseAroundQuantLinear

    def backend(gm, example_inputs):
        FuseAroundQuantLinear()(gm.graph)
        gm.recompile()
        graphs.append(gm.graph)
        return gm

    return torch.compile(model, backend=backend, fullgraph=True)


def _eager_and_compiled(model, inputs: tuple, compile_fn):
    """(eager output, compiled output, how many activations / concatenations the pass rewrote meanwhile)."""
    import torch._dynamo

    from fourbit.kernels.fusion import fusion_stats

    before = fusion_stats()
    with torch.no_grad(), _no_compile_caches():  # a cached compile would not run the pass (nothing to count)
        eager = model(*inputs)
        torch._dynamo.reset()
        got = compile_fn(model)(*inputs)
    torch._dynamo.reset()
    after = fusion_stats()
    return eager, got, tuple(after.get(k, 0) - before.get(k, 0) for k in ("activations", "concatenations"))


def _no_compile_caches():
    import contextlib

    import torch._functorch.config
    import torch._inductor.config

    stack = contextlib.ExitStack()
    stack.enter_context(torch._inductor.config.patch(fx_graph_cache=False, compile_threads=1))
    stack.enter_context(torch._functorch.config.patch(enable_autograd_cache=False))
    return stack


@pytest.mark.usefixtures("interpret")
def test_fusion_pass_moves_activations_and_concatenations():
    """Both GELUs go into their GEMM epilogues (one on the sibling group's MLP columns only), the concatenation
    is read in place; the result is eager's up to fp32 rounding (same codes; the activation before, not after,
    the output's rounding, which for fp32 output is the same value)."""
    torch.manual_seed(0)
    x = torch.randn(2, 40, 64)
    graphs = []
    eager, got, fused = _eager_and_compiled(_quantized_block(_MlpBlock(), x), (x,),
                                            lambda m: _compile_with_pass(m, graphs))
    assert fused == (2, 1)
    targets = {n.target for n in graphs[0].nodes}
    assert torch.cat not in targets and torch._C._nn.gelu not in targets
    acts = sorted((n.args[9], n.args[10], n.args[11]) for n in graphs[0].nodes if "quant_linear" in str(n.target)
                  and n.args[9])
    assert acts == [("gelu", 0, 128), ("gelu_tanh", 64, 192)]
    assert sqnr_db(eager, got) > SQNR_FUSED_FP32_DB


class _Unsafe(nn.Module):
    """Three shapes the pass must leave alone: the pre-activation output read again (residual), an activated
    column slice read by a consumer that may not accept strides (an in-place op), a concatenation read twice."""

    def __init__(self, d=64):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        ya = self.a(x)
        h = torch.nn.functional.gelu(ya) + ya
        yb = self.b(h)
        g = torch.nn.functional.silu(yb[..., 32:])
        g.mul_(2.0)
        cat = torch.cat([yb[..., :32], g], dim=-1)
        return self.c(cat) + cat[..., :64]


@pytest.mark.usefixtures("interpret")
def test_fusion_pass_leaves_unsafe_graphs_alone():
    torch.manual_seed(0)
    x = torch.randn(3, 64)
    eager, got, fused = _eager_and_compiled(_quantized_block(_Unsafe(), x, siblings=False), (x,),
                                            lambda m: _compile_with_pass(m, []))
    assert fused == (0, 0)
    assert torch.equal(got, eager)


class _RowsThenGelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.mod, self.lin = nn.Linear(64, 64), nn.Linear(64, 96)

    def forward(self, x, t):  # t (1, 64): one row (the GEMV); x (B, 64) through lin
        return torch.nn.functional.gelu(self.lin(x)), torch.nn.functional.silu(self.mod(t))


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("weights,acts", [("int4", "int4"), ("int4p2", "int4p2")], ids=["grouped-plan", "gemv"])
def test_fused_activation_without_epilogue_is_eager_bitwise(weights, acts):
    """Paths without the epilogue activation (the paper's int4 on the grouped GEMM; the single-row GEMV) apply it
    after the output's rounding, as eager does: their compiled result is eager's, bit for bit (int4p2's 5-row layer
    has the epilogue: eager's to fp32 rounding)."""
    torch.manual_seed(0)
    x, t = torch.randn(5, 64), torch.randn(1, 64)
    model = _RowsThenGelu()
    cfg = fourbit.RTNConfig(weights=weights, activations=acts, kernel="triton")
    fourbit.quantize(model, cfg, forward_loop=lambda m: m(x, t), progress=False, verbose=False)
    from fourbit.nn import prepare_kernels

    prepare_kernels(model)
    eager, got, fused = _eager_and_compiled(model, (x, t), lambda m: _compile_with_pass(m, []))
    assert fused == (2, 0)
    assert torch.equal(got[1], eager[1])  # the GEMV (int4p2) / grouped GEMM (int4)
    if weights == "int4":
        assert torch.equal(got[0], eager[0])
    else:
        assert sqnr_db(eager[0], got[0]) > SQNR_FUSED_FP32_DB


def _tiny_diffusers(name):
    """(model, inputs, call) for a tiny random diffusers transformer of three families."""
    import diffusers

    if name == "flux":
        m = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                             attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
                                             pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
        ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
        inp = (torch.randn(1, 16, 16), torch.randn(1, 5, 64), torch.randn(1, 32), torch.tensor([0.5]),
               torch.tensor([3.5]), ids.reshape(-1, 3), torch.zeros(5, 3))
        call = lambda mm, a: mm(hidden_states=a[0], encoder_hidden_states=a[1], pooled_projections=a[2],  # noqa
                                timestep=a[3], guidance=a[4], img_ids=a[5], txt_ids=a[6], return_dict=False)[0]
    elif name == "sd3":
        m = diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
                                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                            caption_projection_dim=16, pooled_projection_dim=8, out_channels=4)
        inp = (torch.randn(1, 4, 8, 8), torch.randn(1, 6, 16), torch.randn(1, 8), torch.tensor([3.0]))
        call = lambda mm, a: mm(hidden_states=a[0], encoder_hidden_states=a[1], pooled_projections=a[2],  # noqa
                                timestep=a[3], return_dict=False)[0]
    else:
        m = diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                               out_channels=8, num_layers=2, cross_attention_dim=16, sample_size=8,
                                               patch_size=2, caption_channels=16, norm_type="ada_norm_single",
                                               use_additional_conditions=False)
        inp = (torch.randn(1, 4, 8, 8), torch.randn(1, 6, 16), torch.tensor([3.0]))
        call = lambda mm, a: mm(hidden_states=a[0], encoder_hidden_states=a[1], timestep=a[2],  # noqa
                                added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
    return m.eval(), inp, call


def _quantized_diffusers(name, cfg, batch2=False):
    """(a module calling the tiny diffusers transformer ``name`` with positional inputs, quantized by ``cfg`` with
    its siblings fused and its kernel state built; those inputs). batch2: FLUX's inputs at batch 2 (more rows than
    the GEMV takes)."""
    from fourbit.nn import prepare_kernels

    model, inp, call = _tiny_diffusers(name)
    if batch2:
        inp = (torch.randn(2, 16, 16),) + tuple(torch.cat([t, t]) if i in (1, 2, 3, 4) else t
                                                for i, t in enumerate(inp[1:], 1))

    class Call(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, *a):
            return call(self.m, a)

    wrapped = Call(model)
    with torch.no_grad():
        fourbit.fuse_siblings(wrapped, fourbit.find_siblings(wrapped, lambda m: m(*inp), config=cfg))
    fourbit.quantize(wrapped, cfg, forward_loop=lambda m: m(*inp), progress=False, verbose=False)
    return prepare_kernels(wrapped), inp


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("name", ["flux", "sd3", "pixart"])
def test_fusion_pass_on_diffusers_transformers(name):
    """No per-architecture code: on tiny FLUX, SD3 and PixArt transformers (siblings fused, int4p2, Triton kernels)
    the pass finds activations to fuse (FLUX also its concatenation) and the result is eager's to fp32 rounding."""
    pytest.importorskip("diffusers")
    torch.manual_seed(0)
    wrapped, inp = _quantized_diffusers(name, fourbit.RTNConfig(weights="int4p2", activations="int4p2",
                                                                kernel="triton"))
    eager, got, fused = _eager_and_compiled(wrapped, inp, lambda m: _compile_with_pass(m, []))
    assert fused[0] >= 2 and (fused[1] >= 1) == (name == "flux"), fused
    assert sqnr_db(eager, got) > SQNR_FUSED_FP32_DB


@pytest.mark.usefixtures("interpret")
def test_inductor_options_fuse_under_torch_compile():
    """The public way: ``torch.compile(..., options=fourbit.nn.inductor_options())`` with inductor (CPU here)."""
    from fourbit.nn import inductor_options

    torch.manual_seed(1)
    x = torch.randn(2, 24, 64)
    eager, got, fused = _eager_and_compiled(_quantized_block(_MlpBlock(), x), (x,), lambda m: torch.compile(
        m, options=inductor_options(), fullgraph=True))
    assert fused == (2, 1)
    assert sqnr_db(eager, got) > SQNR_INDUCTOR_FP32_DB


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fusion_under_inductor_gpu(dtype):
    """A FLUX-like block compiled with ``inductor_options``: both activations and the concatenation fused (counted),
    CUDA-graph replay gives the compiled bits. fp32: eager's result to 1e-5 (the GELU's input is the same fp32
    value). bf16: the fused GELU rounds once where eager rounds twice, which moves some 4-bit codes of the next
    layer's input (measured 3% here), so the bound is relative to what a missing GELU does: a third of it."""
    import torch._dynamo

    from fourbit.kernels.fusion import fusion_stats
    from fourbit.nn import inductor_options


    torch.manual_seed(0)
    x = torch.randn(2, 1100, 256, device="cuda", dtype=dtype)
    block = _quantized_block(_MlpBlock(256, 1024).cuda().to(dtype), x)
    before = fusion_stats()
    with torch.no_grad():
        eager = block(x)
        act, block.act = block.act, nn.Identity()
        skipped = block(x)  # the single blocks' MLP GELU left out
        block.act = act
        torch._dynamo.reset()
        with _no_compile_caches():  # a cached compile would not run the pass (nothing to count)
            compiled = torch.compile(block, options=inductor_options(), fullgraph=True)
            got = compiled(x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            replayed = compiled(x)
        graph.replay()
        torch.cuda.synchronize()
    after = fusion_stats()
    assert after.get("activations", 0) - before.get("activations", 0) == 2
    assert after.get("concatenations", 0) - before.get("concatenations", 0) == 1
    assert torch.equal(replayed, got)
    rel = lambda a: ((a.float() - eager.float()).norm() / eager.float().norm()).item()  # noqa: E731
    err, err_skipped = rel(got), rel(skipped)
    assert err < (1e-5 if dtype == torch.float32 else err_skipped / 3), (err, err_skipped)
    torch._dynamo.reset()



def _compiled_both_ways(model, inputs):
    """{"pass": out, "given": out, "eager": out} and the row maxima handed over under "given"."""
    import torch._dynamo

    from fourbit.kernels.fusion import FuseAroundQuantLinear, fusion_stats

    outs = {}
    with torch.no_grad(), _no_compile_caches():
        outs["eager"] = model(*inputs)
        for mode in ("pass", "given"):
            def backend(gm, example_inputs, mode=mode):
                FuseAroundQuantLinear(mode)(gm.graph)
                gm.recompile()
                return gm

            before = fusion_stats().get("row_maxima", 0)
            torch._dynamo.reset()
            outs[mode] = torch.compile(model, backend=backend, fullgraph=True)(*inputs)
            handed = fusion_stats().get("row_maxima", 0) - before
    torch._dynamo.reset()
    return outs, handed


@pytest.mark.usefixtures("interpret")
def test_row_maxima_handed_over_by_the_producing_gemm():
    """Rewrite 4 on the FLUX-like block: fc2 takes its input's row maxima from fc1's epilogue, proj_out from the
    sibling group's (its MLP columns) and a torch reduction (the tanh'd query columns). The same codes as each layer
    finding its own maxima, so the output is the "pass" lowering's up to the down-projection's summation order
    (a wrong maximum moves codes: quantization noise, tens of dB lower)."""
    torch.manual_seed(1)
    x = torch.randn(2, 24, 64)
    outs, handed = _compiled_both_ways(_quantized_block(_MlpBlock(), x), (x,))
    assert handed == 2
    assert sqnr_db(outs["pass"], outs["given"]) > SQNR_FP32_REORDER_DB
    assert sqnr_db(outs["eager"], outs["given"]) > SQNR_FUSED_FP32_DB


@pytest.mark.usefixtures("interpret")
def test_row_maxima_not_handed_over_where_unsafe():
    """No hand-over where the producer cannot give them (a layer on the cuBLAS kernel, or an activation the pass did
    not fuse between), nor into a layer without smoothing: the graph keeps plain quant_linear nodes."""
    from fourbit.nn import prepare_kernels

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(64, 128), nn.Linear(128, 64), nn.Linear(64, 64)

        def forward(self, x):
            return self.fc3(self.fc2(torch.tanh(self.fc1(x))))  # tanh: not an epilogue activation

    torch.manual_seed(0)
    x = torch.randn(2, 24, 64)
    block = Mlp()
    fourbit.quantize(block, fourbit.RTNConfig(weights="int4p2", activations="int4p2", kernel="triton"),
                     progress=False, verbose=False)  # RTN: no smoothing in fc3 (its producer fc2 is a GEMM)
    prepare_kernels(block)
    outs, handed = _compiled_both_ways(block, (x,))
    assert handed == 0 and torch.equal(outs["pass"], outs["given"])


@pytest.mark.usefixtures("interpret")
def test_quant_linear_amax_op_fake_and_values():
    """The producer's op: the layer's output and each row's max |y[:, lo:hi] * mult| of exactly that output."""
    from fourbit.kernels.linear import layer_state

    torch.manual_seed(0)
    x = torch.randn(2, 24, 64)
    block = _quantized_block(_MlpBlock(), x, siblings=False)
    layer, x2 = block.fc1, torch.randn(48, 64)
    st = layer_state(layer)
    weights = [st.weight.w, st.weight.col_scale, st.weight.group_scale, layer.weight_packed, layer.weight_scales,
               layer.weight_row_scale]
    mult = torch.rand(100) + 0.5
    args = (x2, weights, st.smooth_recip, st.down_folded, st.down_cat, st.up, st.bias, st.op_key + "|speed", None,
            "gelu", 0, 128, None, mult, 20, 120)
    y, amax = torch.ops.fourbit.quant_linear_amax(*args)
    plain = torch.ops.fourbit.quant_linear(*args[:13])
    assert torch.equal(y, plain)
    assert torch.equal(amax, (y[:, 20:120] * mult).abs().amax(1))
    torch.library.opcheck(torch.ops.fourbit.quant_linear_amax.default, args, test_utils=("test_faketensor",))


@pytest.mark.usefixtures("interpret")
def test_row_maxima_under_inductor():
    """``inductor_options(act_quant="given")`` with inductor itself (CPU here): the producer's tuple-returning op and
    the attention-like block's maxima as torch ops lower and run; the result is the default lowering's up to the
    down-projection's summation order."""
    import torch._dynamo

    from fourbit.kernels.fusion import fusion_stats
    from fourbit.nn import inductor_options

    torch.manual_seed(1)
    x = torch.randn(2, 24, 64)
    block = _quantized_block(_MlpBlock(), x)
    outs = {}
    before = fusion_stats().get("row_maxima", 0)
    with torch.no_grad(), _no_compile_caches():
        for mode in ("pass", "given"):
            torch._dynamo.reset()
            outs[mode] = torch.compile(block, options=inductor_options(mode), fullgraph=True)(x)
    torch._dynamo.reset()
    assert fusion_stats().get("row_maxima", 0) - before == 2
    assert sqnr_db(outs["pass"], outs["given"]) > SQNR_FP32_REORDER_DB


@pytest.mark.usefixtures("interpret")
def test_row_maxima_on_a_diffusers_flux_transformer():
    """No per-architecture code: on a tiny FLUX transformer (batch 2, siblings fused, SVDQuant int4p2) the hand-over
    finds the double block's MLP output projections (through the eval-mode dropout after the GELU), the single
    block's output projection (GELU'd MLP columns of the sibling group + the attention output) and the embedders'
    MLPs; the result is the default lowering's up to the down-projection's summation order."""
    pytest.importorskip("diffusers")
    torch.manual_seed(0)
    cfg = fourbit.SVDQuantConfig(weights="int4p2", activations="int4p2", rank=8, kernel="triton")
    wrapped, inp = _quantized_diffusers("flux", cfg, batch2=True)
    outs, handed = _compiled_both_ways(wrapped, inp)
    assert handed >= 6, handed  # 2 double-block MLPs + 1 single block + the 3 embedders' MLPs (timestep, guidance, text)
    assert sqnr_db(outs["pass"], outs["given"]) > SQNR_FP32_REORDER_DB
