"""The compiled kernels on a CUDA GPU (skipped without one): bit-exact operands, bounded GEMM error.

Bounds (relative Frobenius error):
  * act_quant / expand_weight: bit for bit against the twins (which are built from the formats' references);
    the down-projection: 1e-4 single-pass (bf16 hi + lo factor, fp32 accumulation), 1e-3 two-launch (tf32);
  * GEMMs with fp32 output vs the fp32 twin: 1e-4 (fp8 products are exact; the tensor cores' fp32
    accumulation order and the tf32 low-rank epilogue differ);
  * layers with bf16 activations vs ``quant_linear_reference``: 4e-3 (one bf16 rounding of the output,
    identical codes); speed and memory mode: identical bits.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fourbit
from fourbit.formats import make_format
from fourbit.nn import set_kernel

from .conftest import bits
from .test_kernels_interpret import ACT_FORMATS, PAIRS, WEIGHT_FORMATS, _ids, hard_rows

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("path", ["single", "single+mm", "single+mm-side", "two"])
@pytest.mark.parametrize("name,kw", ACT_FORMATS, ids=_ids(ACT_FORMATS))
def test_act_quant_bit_exact_gpu(name, kw, path):
    """Every path of ``act_path`` (chosen here by the config's thresholds) against the twin: codes and scales bit for
    bit, the branch within 1e-4 of the fp32 reference (X times the bf16 hi + lo folded factor, fp32 sums)."""
    import dataclasses

    from fourbit.kernels.act_quant import DEFAULT_CONFIG, act_path, act_quant, act_quant_torch, act_spec

    fmt = make_format(name, **kw)
    m, k, kp = 333, 1000, 1024
    x = hard_rows(m, k).cuda()
    smooth = (torch.rand(kp) + 0.5).cuda()
    down = None if path == "single" else torch.randn(32, kp).bfloat16().cuda()
    mm_rows = 1 if path.startswith("single+mm") else 0
    cfg = dataclasses.replace(DEFAULT_CONFIG, lr_mm_rows=mm_rows, lr_mm_stream_max_k=kp if path.endswith("side") else 0)
    for xin in (x, x.bfloat16()):
        for c in (cfg, dataclasses.replace(cfg, chunk=0, rows=2), dataclasses.replace(cfg, rows=4, chunk=256, BM=16,
                                                                                    BK=256)):
            want = path if act_spec(fmt).outer != 1 else "two"
            if path.startswith("single+mm") and xin.dtype != torch.bfloat16:
                want = "two"
            assert act_path(act_spec(fmt), m, kp, down is not None, xin.dtype == torch.bfloat16, c) == want
            got = act_quant(xin, fmt, smooth, down, kp, config=c)
            ref = act_quant_torch(xin, fmt, smooth, down, kp)
            assert torch.equal(bits(got.q), bits(ref.q))
            for a, b in ((got.row_scale, ref.row_scale), (got.group_scale, ref.group_scale)):
                assert (a is None) == (b is None)
                if a is not None:
                    assert torch.equal(bits(a), bits(b))
            if down is not None:
                assert ((got.lr - ref.lr).norm() / ref.lr.norm()).item() < 1e-4


@pytest.mark.parametrize("name,kw", WEIGHT_FORMATS, ids=_ids(WEIGHT_FORMATS))
def test_expand_weight_bit_exact_gpu(name, kw):
    from fourbit.kernels.weights import expand_weight, expand_weight_torch

    fmt = make_format(name, **kw)
    q = fmt.quantize(hard_rows(300, 1024, seed=1).cuda())
    packed = fmt.pack(q.codes)
    got = expand_weight(packed, q.scales, q.row_scale, fmt, 1024)
    ref = expand_weight_torch(packed, q.scales, q.row_scale, fmt, 1024)
    assert torch.equal(bits(got.w), bits(ref.w))


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8, torch.bfloat16], ids=["fp8", "int8", "bf16"])
def test_scaled_gemm_gpu(dtype):
    from fourbit.kernels.gemm import scaled_gemm, scaled_gemm_torch

    m, n, k = 1000, 776, 3072
    if dtype == torch.int8:
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8, device="cuda")
        b = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
    else:
        a = torch.randint(-8, 8, (m, k), device="cuda").to(torch.float16).to(dtype)
        b = torch.randint(-8, 8, (n, k), device="cuda").to(torch.float16).to(dtype)
    sa, sb = torch.rand(m, device="cuda") + 0.5, torch.rand(n, device="cuda") + 0.5
    lr, up, bias = (torch.randn(m, 32, device="cuda") * 30, torch.randn(n, 32, device="cuda"),
                    torch.randn(n, device="cuda"))
    got = scaled_gemm(a, b, sa, sb, lr, up, bias, out_dtype=torch.float32)
    ref = scaled_gemm_torch(a, b, sa, sb, lr, up, bias, out_dtype=torch.float32)
    assert ((got - ref).norm() / ref.norm()).item() < 1e-4


def test_scaled_gemm_into_out_rows_gpu():
    """``out=``: the GEMM writes rows of a larger output (TMA store from a view), the same bits as its own output."""
    from fourbit.kernels.gemm import scaled_gemm

    m, n, k = 640, 768, 1024
    a = torch.randint(-8, 8, (m, k), device="cuda").to(torch.float16).to(torch.float8_e4m3fn)
    b = torch.randint(-8, 8, (n, k), device="cuda").to(torch.float16).to(torch.float8_e4m3fn)
    sa, sb = torch.rand(m, device="cuda") + 0.5, torch.rand(n, device="cuda") + 0.5
    lr, up = torch.randn(m, 32, device="cuda"), torch.randn(n, 32, device="cuda")
    big = torch.zeros(m + 256, n, device="cuda", dtype=torch.bfloat16)
    scaled_gemm(a, b, sa, sb, lr, up, out=big[128:128 + m])
    assert torch.equal(bits(big[128:128 + m]), bits(scaled_gemm(a, b, sa, sb, lr, up)))
    assert not big[:128].any() and not big[128 + m:].any()


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.bfloat16], ids=["fp8", "bf16"])
def test_scaled_gemm_stream_k_gpu(dtype):
    """A FLUX-like shape whose last wave is partial (432 tiles of 128 x 256 on 132 SMs, ragged edges): stream-K
    matches the twin and the data-parallel schedule, gives the same bits twice and under CUDA-graph replay."""
    import dataclasses

    from fourbit.kernels import gemm as gm

    m, n, k = 4603, 3032, 3072
    a = torch.randint(-8, 8, (m, k), device="cuda").to(torch.float16).to(dtype)
    b = torch.randint(-8, 8, (n, k), device="cuda").to(torch.float16).to(dtype)
    sa, sb = torch.rand(m, device="cuda") + 0.5, torch.rand(n, device="cuda") + 0.5
    lr, up, bias = (torch.randn(m, 32, device="cuda") * 30, torch.randn(n, 32, device="cuda"),
                    torch.randn(n, device="cuda"))
    base = gm.default_config(m, n, k, dtype)
    outs = {}
    for sk in (False, True):
        cfg = dataclasses.replace(base, stream_k=sk)
        outs[sk] = gm.scaled_gemm(a, b, sa, sb, lr, up, bias, out_dtype=torch.float32, config=cfg)
        assert torch.equal(gm.scaled_gemm(a, b, sa, sb, lr, up, bias, out_dtype=torch.float32, config=cfg), outs[sk])
    ref = gm.scaled_gemm_torch(a, b, sa, sb, lr, up, bias, out_dtype=torch.float32)
    assert ((outs[True] - ref).norm() / ref.norm()).item() < 1e-4
    assert ((outs[True] - outs[False]).norm() / ref.norm()).item() < 1e-5
    cfg = dataclasses.replace(base, stream_k=True)
    g = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on another stream, then two GEMMs in one graph
        gm.scaled_gemm(a, b, sa, sb, lr, up, bias, out_dtype=torch.float32, config=cfg)
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(g):
        y1 = gm.scaled_gemm(a, b, sa, sb, lr, up, bias, out_dtype=torch.float32, config=cfg)
        y2 = gm.scaled_gemm(a, b, sa, sb, lr, up, bias, out_dtype=torch.float32, config=cfg)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    assert torch.equal(y1, outs[True]) and torch.equal(y2, outs[True])


def test_grouped_gemm_gpu():
    from fourbit.kernels.gemm_grouped import grouped_gemm, grouped_gemm_torch

    m, n, k, g = 1000, 776, 3072, 64
    a = torch.randint(-8, 8, (m, k), device="cuda").to(torch.float16).to(torch.float8_e4m3fn)
    b = torch.randint(-8, 8, (n, k), device="cuda").to(torch.float16).to(torch.float8_e4m3fn)
    sa = torch.rand(k // g, m, device="cuda") + 0.1
    sb = torch.rand(k // g, n, device="cuda") + 0.1
    got = grouped_gemm(a, b, sa, sb, g, out_dtype=torch.float32)
    ref = grouped_gemm_torch(a, b, sa, sb, g, out_dtype=torch.float32)
    assert ((got - ref).norm() / ref.norm()).item() < 1e-5


@pytest.mark.parametrize("wf,af", PAIRS, ids=[f"w{w}-a{a}" for w, a in PAIRS])
def test_layers_gpu(wf, af):
    lin = nn.Linear(1000, 777).bfloat16().cuda()
    x = torch.randn(2, 300, 1000, device="cuda").bfloat16()
    model = nn.Sequential(lin)
    cfg = fourbit.SVDQuantConfig(weights=wf, activations=af, rank=32, alpha=0.5)
    fourbit.quantize(model, cfg, forward_loop=lambda mm: mm(x), progress=False, verbose=False)
    _speed_equals_memory_near_reference(model, x)


def _speed_equals_memory_near_reference(model, x):
    """The model in memory and speed mode: the same bits, within the output's bf16 rounding of the reference
    kernel's output (4e-3). Returns the speed-mode output; the model is left in speed mode."""
    ref = model(x).float()
    set_kernel(model, "triton-memory")
    memory = model(x)
    set_kernel(model, "triton")
    speed = model(x)
    assert torch.equal(bits(speed), bits(memory))
    assert ((speed.float() - ref).norm() / ref.norm()).item() < 4e-3
    return speed


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


def test_act_quant_large_m_down_projection_paths_gpu():
    """The large-M down-projection paths (cuBLAS GEMM beside the single pass, on the same stream or concurrent on
    a side stream; the two launches): the same codes, the branch within 1e-4 of the fp32 reference (bf16
    hi + lo factor, fp32 sums); the side stream's result is complete when act_quant returns."""
    import dataclasses

    from fourbit.kernels.act_quant import DEFAULT_CONFIG, act_quant, act_quant_torch

    fmt = make_format("int4p2")
    m, k = 2048 + 77, 1000
    x = hard_rows(m, k).cuda().bfloat16()
    smooth = (torch.rand(1024) + 0.5).cuda()
    down = torch.randn(32, 1024).bfloat16().cuda()
    ref = act_quant_torch(x, fmt, smooth, down, 1024)
    mm = dataclasses.replace(DEFAULT_CONFIG, lr_mm_rows=2048, lr_mm_stream_max_k=0)
    for cfg in (DEFAULT_CONFIG, mm, dataclasses.replace(mm, lr_mm_stream_max_k=1024),
                dataclasses.replace(mm, lr_mm_rows=0)):
        got = act_quant(x, fmt, smooth, down, 1024, config=cfg)
        assert torch.equal(bits(got.q), bits(ref.q)) and torch.equal(bits(got.row_scale), bits(ref.row_scale))
        assert ((got.lr - ref.lr).norm() / ref.lr.norm()).item() < 1e-4


@pytest.mark.parametrize("m", [1, 77, 512])
def test_scaled_gemm_few_tiles_default_gpu(m):
    """Launches with few 128 x 256 tiles (the text stream, the adaLN linears) take the 64 x 128 one-program-per-
    tile config by default; it matches the fp32 twin."""
    from fourbit.kernels import gemm as gm

    n, k = 3072, 3072
    assert gm.default_config(m, n, k, torch.float8_e4m3fn) == gm.FEW_TILES
    a = torch.randint(-8, 8, (m, k), device="cuda").to(torch.float16).to(torch.float8_e4m3fn)
    b = torch.randint(-8, 8, (n, k), device="cuda").to(torch.float16).to(torch.float8_e4m3fn)
    sa, sb = torch.rand(m, device="cuda") + 0.5, torch.rand(n, device="cuda") + 0.5
    lr, up, bias = torch.randn(m, 32, device="cuda"), torch.randn(n, 32, device="cuda"), torch.randn(n, device="cuda")
    got = gm.scaled_gemm(a, b, sa, sb, lr, up, bias, out_dtype=torch.float32)
    ref = gm.scaled_gemm_torch(a, b, sa, sb, lr, up, bias, out_dtype=torch.float32)
    assert ((got - ref).norm() / ref.norm()).item() < 1e-4


@pytest.mark.parametrize("m", [1, 2, 4])
@pytest.mark.parametrize("af,wf", [("int4p2", "int4p2"), ("fp4p2", "fp4p2")], ids=["int4p2", "fp4p2"])
def test_gemv_gpu(af, wf, m):
    """The few-row GEMV at an adaLN-like width: its fp32 twin within 1e-5 (fp32 sums in another order), with and
    without the branch; the layer in speed and memory mode, replayed from a CUDA graph and compiled: the same
    bits, within the output's bf16 rounding of the reference."""
    import torch._dynamo

    from fourbit.kernels.gemv import gemv, gemv_torch
    from fourbit.kernels.linear import layer_state
    from fourbit.nn import prepare_kernels

    model = nn.Sequential(nn.Linear(3072, 4600)).bfloat16().cuda()
    calib = torch.randn(64, 3072, device="cuda", dtype=torch.bfloat16)
    cfg = fourbit.SVDQuantConfig(weights=wf, activations=af, rank=32, alpha=0.5)
    fourbit.quantize(model, cfg, forward_loop=lambda mm: mm(calib), progress=False, verbose=False)
    layer = model[0]
    st = layer_state(layer)
    x = hard_rows(8, 3072)[[5, 1, 0, 3][:m]].cuda().bfloat16()
    for branch in (True, False):
        args = (x, layer.act_format, layer.weight_format, layer.padded_in, layer.weight_packed, layer.weight_scales,
                layer.weight_row_scale, st.smooth_recip, st.down_folded if branch else None,
                st.up if branch else None, st.bias)
        got, ref = gemv(*args, out_dtype=torch.float32), gemv_torch(*args, out_dtype=torch.float32)
        assert ((got - ref).norm() / ref.norm()).item() < 1e-5, branch
    with torch.no_grad():
        speed = _speed_equals_memory_near_reference(model, x)
        graph, s = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            model(x)
            with torch.cuda.graph(graph):
                out = model(x)
        torch.cuda.current_stream().wait_stream(s)
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(bits(out), bits(speed))
        prepare_kernels(model)
        torch._dynamo.reset()
        with torch._inductor.config.patch(compile_threads=1):
            assert torch.equal(bits(torch.compile(model, fullgraph=True)(x)), bits(speed))
    torch._dynamo.reset()


@pytest.mark.parametrize("kind", ["gelu_tanh", "gelu", "silu"])
def test_scaled_gemm_output_activation_gpu(kind):
    """The epilogue activation on a column range, at the default (128 x 256, TMA store) and few-tile configs:
    fp32 output the twin's to 1e-5; bf16 output within one rounding of the fp32 twin."""
    from fourbit.kernels.activation import OutputActivation
    from fourbit.kernels.gemm import scaled_gemm, scaled_gemm_torch

    for m, n, k in ((1000, 1536, 512), (77, 640, 256)):
        g = torch.Generator().manual_seed(m)
        a = torch.randint(-8, 8, (m, k), generator=g).float().to(torch.float8_e4m3fn).cuda()
        b = torch.randint(-8, 8, (n, k), generator=g).float().to(torch.float8_e4m3fn).cuda()
        sa, sb = (torch.rand(m, generator=g) * 0.05).cuda(), (torch.rand(n, generator=g) + 0.5).cuda()
        # the branch's factors exact in tf32 (the epilogue's up-projection dot), so only the summation order differs
        lr = torch.randn(m, 32, generator=g).bfloat16().float().cuda()
        up = (torch.randn(n, 32, generator=g) * 0.1).bfloat16().float().cuda()
        act = OutputActivation(kind, 300, n - 100)
        ref = scaled_gemm_torch(a, b, sa, sb, lr, up, None, out_dtype=torch.float32, act=act)
        got = scaled_gemm(a, b, sa, sb, lr, up, None, out_dtype=torch.float32, act=act)
        assert ((got - ref).norm() / ref.norm()).item() < 1e-5
        got16 = scaled_gemm(a, b, sa, sb, lr, up, None, out_dtype=torch.bfloat16, act=act).float()
        assert ((got16 - ref).abs() <= ref.abs() * 2 ** -8 * 1.01 + 1e-6).all()


def test_act_quant_two_column_blocks_gpu():
    """X as two column blocks at FLUX's single-block proj_out split (3072 | 12288, the second a strided view of a
    wider output) on the large-M path (single pass + cuBLAS down-projection, both reading the blocks in place):
    codes and row scales bit-exact with the concatenation's, the branch within 1e-5."""
    from fourbit.kernels.act_quant import act_quant

    fmt = make_format("int4p2")
    m, k1, k2 = 2304, 3072, 12288
    x = (torch.randn(m, k1 + k2, device="cuda") * 3).bfloat16()
    wide = torch.empty(m, 9216 + k2, device="cuda", dtype=torch.bfloat16)
    wide[:, 9216:] = x[:, k1:]
    blocks = [x[:, :k1].contiguous(), wide[:, 9216:]]
    smooth = (torch.rand(k1 + k2, device="cuda") + 0.5)
    down = torch.randn(32, k1 + k2, device="cuda").bfloat16()
    for rank_down in (None, down):
        got = act_quant(blocks, fmt, smooth, rank_down, k1 + k2)
        ref = act_quant(x, fmt, smooth, rank_down, k1 + k2)
        assert torch.equal(bits(got.q), bits(ref.q)) and torch.equal(bits(got.row_scale), bits(ref.row_scale))
        if rank_down is not None:
            assert ((got.lr - ref.lr).norm() / ref.lr.norm()).item() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fusion_under_inductor_gpu(dtype):
    """A FLUX-like block compiled with ``inductor_options``: both activations and the concatenation fused (counted),
    CUDA-graph replay gives the compiled bits. fp32: eager's result to 1e-5 (the GELU's input is the same fp32
    value). bf16: the fused GELU rounds once where eager rounds twice, which moves some 4-bit codes of the next
    layer's input (measured 3% here), so the bound is relative to what a missing GELU does: a third of it."""
    import torch._dynamo

    from fourbit.kernels.fusion import fusion_stats
    from fourbit.nn import inductor_options

    from .test_kernels_interpret import _MlpBlock, _no_compile_caches, _quantized_block

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
