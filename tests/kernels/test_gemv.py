"""``kernels/gemv``: the few-row GEMV against ``gemv_torch`` (fp32 sums in another order:
``SQNR_FP32_REORDER_DB``), its argument checks, and the layer's choice of it.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fourbit
from fourbit.formats import make_format
from fourbit.nn import set_kernel

from .conftest import bits
from .kernel_helpers import SQNR_FP32_REORDER_DB, hard_rows, speed_equals_memory_near_reference, sqnr_db

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


GEMV_PAIRS = [("int4p2", "int4p2", None), ("fp4p2", "fp4p2", None), ("int4p2", "fp4p2", 32),
              ("fp4p2", "int4p2", 64)]  # (activations, weights, group size of both)


def _gemv_layer(af, wf, group=None, bias=True, k=200, n=40):
    lin = nn.Linear(k, n, bias=bias)
    cfg = fourbit.SVDQuantConfig(weights=wf, activations=af, rank=20, alpha=0.5, group_size=group)
    model = nn.Sequential(lin)
    fourbit.quantize(model, cfg, forward_loop=lambda mm: mm(torch.randn(8, k)), progress=False, verbose=False)
    return model


@pytest.mark.parametrize("m", [1, 3, 5])
@pytest.mark.parametrize("af,wf,wg", GEMV_PAIRS, ids=[f"a{a}-w{w}-g{g}" for a, w, g in GEMV_PAIRS])
def test_gemv_matches_twin(device, af, wf, wg, m):
    """The GEMV against its twin, with and without the branch (stats launch / own row maxima) and bias, fp32
    and bf16 rows (the hard rows: ties, an all-zero row, subnormal-ish and clamped groups): fp32 sums in another
    order, relative 1e-5."""
    from fourbit.kernels.gemv import GemvConfig, gemv, gemv_torch
    from fourbit.kernels.linear import layer_state

    layer = _gemv_layer(af, wf, wg)[0].to(device)
    st = layer_state(layer)
    wfmt, packed, scales, row_scale = (layer.weight_format, layer.weight_packed, layer.weight_scales,
                                       layer.weight_row_scale)
    cfgs = (GemvConfig(BN=16, BK=128, act_programs=3, act_BK=64), GemvConfig(BN=8, BK=64, act_programs=1))
    x = hard_rows(8, 200)[{1: [5], 3: [0, 1, 3], 5: [0, 1, 2, 3, 4]}[m]].to(device)  # row 1 of several: all zeros
    for xin in (x, x.bfloat16()):
        for branch, bias in ((True, True), (False, False)):
            args = (xin, layer.act_format, wfmt, layer.padded_in, packed, scales, row_scale, st.smooth_recip,
                    st.down_folded if branch else None, st.up if branch else None, st.bias if bias else None)
            ref = gemv_torch(*args, out_dtype=torch.float32)
            got = gemv(*args, out_dtype=torch.float32, config=cfgs[branch])
            assert torch.isfinite(got).all()
            assert sqnr_db(ref, got) > SQNR_FP32_REORDER_DB, (xin.dtype, branch)
            if m > 1:
                assert torch.equal(got[1], ref[1])  # the all-zero row: bias (or zero) exactly


@pytest.mark.usefixtures("interpret")
def test_gemv_rejects_bad_input():
    from fourbit.kernels.gemv import gemv
    from fourbit.kernels.linear import layer_state

    layer = _gemv_layer("int4p2", "int4p2")[0]
    st = layer_state(layer)
    base = dict(act_format=layer.act_format, weight_format=layer.weight_format, padded_in=layer.padded_in,
                packed=layer.weight_packed, scales=layer.weight_scales, row_scale=layer.weight_row_scale)
    with pytest.raises(ValueError, match="x must be"):
        gemv(torch.randn(1, 300), **base)
    with pytest.raises(ValueError, match="both down_folded and up"):
        gemv(torch.randn(1, 200), **base, down_folded=st.down_folded)
    with pytest.raises(NotImplementedError, match="no kernel"):
        gemv(torch.randn(1, 200), **dict(base, act_format=make_format("int8")))
    with pytest.raises(NotImplementedError, match="no kernel"):  # group sizes differ
        gemv(torch.randn(1, 200), **dict(base, act_format=make_format("int4p2", group_size=32)))


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("kernel", ["triton", "triton-memory"])
def test_few_row_layer_takes_the_gemv(kernel, monkeypatch):
    """A layer called with one row runs the GEMV (no weight operand built) and matches the reference; more
    rows than ``GemvConfig.max_m`` take the GEMM."""
    from fourbit.kernels import gemv as gv
    from fourbit.kernels.linear import layer_state

    model = _gemv_layer("int4p2", "int4p2")
    layer = model[0]
    calls = []
    real = gv.gemv
    monkeypatch.setattr(gv, "gemv", lambda *a, **kw: calls.append(a[0].shape[0]) or real(*a, **kw))
    x = torch.randn(2, 3, 200)
    for rows in (x[:1, :1], x[:1, :2], x):  # M = 1 (GEMV), 2 and 6 (GEMM)
        ref = model(rows)
        set_kernel(model, kernel)
        got = model(rows)
        set_kernel(model, "reference")
        assert sqnr_db(ref, got) > SQNR_FP32_REORDER_DB
    assert calls == [1]
    if kernel == "triton-memory":
        assert layer_state(layer).weight is None


@pytest.mark.gpu
@needs_cuda
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
        assert sqnr_db(ref, got) > SQNR_FP32_REORDER_DB, branch
    with torch.no_grad():
        speed = speed_equals_memory_near_reference(model, x)
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

