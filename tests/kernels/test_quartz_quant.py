"""``kernels/quartz_quant``: the QuaRTZ quantize kernel against ``quartz_quant_torch`` (the format reference): bit for
bit, under Triton's CPU interpreter (and compiled on a GPU when one is present)."""
from __future__ import annotations

import importlib

import pytest
import torch

from fourbit.formats import make_format

from .conftest import bits
from .kernel_helpers import SQNR_TF32_DOWN_DB, sqnr_db


@pytest.fixture
def env(device):
    """(kernel module, device). Triton's interpreter before 3.9 cannot take scalar kernel arguments in range()
    (seen with 3.6): there only the compiled kernel runs."""
    import triton

    if device == "cpu" and tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 9):
        pytest.skip("Triton's interpreter < 3.9")
    return importlib.import_module("fourbit.kernels.quartz_quant"), device


def activations(m, k, seed, dtype=torch.float32, kind="outliers"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    if kind == "outliers":  # a few large channels, some all-zero rows, values at exact ties
        x[:, torch.randperm(k, generator=g)[: max(1, k // 50)]] *= 40.0
        x[1] = 0.0
        x[2, :8] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, 64.0, 8.0])
    elif kind == "gelu":
        x = torch.nn.functional.gelu(x * 3)
    return x.to(dtype)


CASES = [  # (format name, options, out)
    ("quartz_tok", {}, "fp8"),
    ("quartz_tok_round", {}, "fp8"),
    ("quartz_tok_s32", {}, "int8"),
    ("quartz_tok_s32_round", {}, "int8"),
    ("quartz_tok", {"signed": False}, "fp8"),
    ("quartz_tok_round", {"signed": False}, "int8"),
]


@pytest.mark.parametrize("name,opts,out", CASES, ids=[f"{n}-{o}-{'u' if p else 's'}" for n, p, o in CASES])
@pytest.mark.parametrize("shape", [(37, 160), (64, 512)])
def test_bit_exact_against_the_reference(env, name, opts, out, shape):
    mod, dev = env
    fmt = make_format(name, **opts)
    x = activations(*shape, seed=shape[0], kind="gelu" if not fmt.signed else "outliers").to(dev)
    got = mod.quartz_quant(x, fmt, out=out)
    ref = mod.quartz_quant_torch(x, fmt, out=out)
    assert got.q.dtype == ref.q.dtype == ({"fp8": torch.float8_e4m3fn}.get(out) or fmt.code_dtype)
    assert torch.equal(bits(got.q), bits(ref.q))
    assert torch.equal(bits(got.row_scale), bits(ref.row_scale))
    # the operand times the row scale is the format's dequantized activation, exactly
    deq = fmt.fake_quantize(x.float())
    assert torch.equal(got.q.float() * got.row_scale[:, None], deq)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_smoothing_padding_and_low_rank(env, dtype):
    mod, dev = env
    fmt = make_format("quartz_tok")
    m, k, kp = 33, 200, 224  # K padded to a multiple of the LZS group, as QuantLinear does
    x = activations(m, k, seed=3, dtype=dtype).to(dev)
    g = torch.Generator().manual_seed(4)
    smooth = (torch.rand(kp, generator=g) + 0.25).to(dev)
    lr_down = (torch.randn(5, kp, generator=g) / 8).to(dev)
    got = mod.quartz_quant(x, fmt, smooth=smooth, lr_down=lr_down, padded_in=kp)
    ref = mod.quartz_quant_torch(x, fmt, smooth=smooth, lr_down=lr_down, padded_in=kp)
    assert got.q.shape == (m, kp) and torch.equal(bits(got.q), bits(ref.q))
    assert torch.equal(bits(got.row_scale), bits(ref.row_scale))
    assert got.lr.shape == (m, 16) and (got.lr[:, 5:] == 0).all()
    # the down-projection is a tf32 dot on a GPU (10-bit mantissa): relative Frobenius error ~1e-3 there
    assert sqnr_db(ref.lr, got.lr) > SQNR_TF32_DOWN_DB


def test_argument_checks(env):
    mod, dev = env
    x = torch.randn(4, 64, device=dev)
    with pytest.raises(ValueError, match="per-token"):
        mod.quartz_quant(x, make_format("quartz"))
    with pytest.raises(ValueError, match="out"):
        mod.quartz_quant(x, make_format("quartz_tok"), out="bf16")
    with pytest.raises(ValueError, match="multiple"):
        mod.quartz_quant(x, make_format("quartz_tok"), padded_in=70)
