"""``fourbit.compile_pipeline`` on tiny real diffusers pipelines of five families: the repeated blocks found without
per-family code, compiled (dynamo), the latents unchanged; the kernels chosen and reported."""
from __future__ import annotations

import pytest
import torch

import fourbit
from fourbit.nn import quantized_layers, repeated_blocks

pytest.importorskip("diffusers")
from .test_pipelines import STEPS, _latents, _quantized  # noqa: E402
from .tiny import FAMILIES, build  # noqa: E402

BLOCKS = {"flux": ["FluxTransformerBlock", "FluxSingleTransformerBlock"], "sd3": ["JointTransformerBlock"],
          "pixart": ["BasicTransformerBlock"], "sana": ["SanaTransformerBlock"], "sdxl": ["BasicTransformerBlock"]}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_familys_blocks_are_found(family):
    pipe, comp, _, _ = build(family)
    assert repeated_blocks(getattr(pipe, comp)) == BLOCKS[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_quantized_pipeline_gives_the_same_latents(family, capsys):
    pipe, comp, ps, call_kwargs = _quantized(family)
    eager = _latents(pipe, ps, call_kwargs)
    torch._dynamo.reset()
    report = fourbit.compile_pipeline(pipe, ps[0], call_kwargs=call_kwargs, backend="eager")
    model = getattr(pipe, comp)
    blocks = [m for m in model.modules() if type(m).__name__ in BLOCKS[family]]
    assert report.blocks == BLOCKS[family] and report.compiled == len(blocks)
    assert all(b._compiled_call_impl is not None for b in blocks)
    assert report.kernels == {"reference": len(list(quantized_layers(model)))} and not report.fusion
    assert report.seconds is not None and "the model is on cpu" in report.notes[0]
    assert f"fourbit: {comp} ({type(model).__name__}): compiled {len(blocks)} modules" in capsys.readouterr().err
    torch.testing.assert_close(_latents(pipe, ps, call_kwargs), eager, rtol=0, atol=0)


def test_an_unquantized_pipeline_compiles_the_same_way_as_the_baseline():
    pipe, comp, embeds, call_kwargs = build("pixart")
    from .tiny import prompts

    ps = prompts(embeds, 1)
    eager = _latents(pipe, ps, call_kwargs)
    report = fourbit.compile_pipeline(pipe, ps[0], call_kwargs=call_kwargs, backend="eager", warmup=False,
                                      verbose=False)
    assert report.kernels == {} and report.seconds is None and report.compiled == 2
    assert "no quantized layers" in report.summary()
    torch.testing.assert_close(_latents(pipe, ps, call_kwargs), eager, rtol=0, atol=0)


def test_inductor_compiled_pixart_step_matches_eager():
    """One real inductor compile of a quantized pipeline's blocks on the CPU (the reference kernel): equal to eager
    but for fp32 summation order (inductor left to drop the fp16 scale rounding, one code in ~700 flipped: 2.8e-5)."""
    pipe, comp, ps, call_kwargs = _quantized("pixart")
    eager = _latents(pipe, ps, call_kwargs)
    report = fourbit.compile_pipeline(pipe, ps[0], call_kwargs=call_kwargs, verbose=False)
    assert any("emulate_precision_casts" in n for n in report.notes)
    got = _latents(pipe, ps, call_kwargs)
    assert STEPS == 2
    err = (got - eager).pow(2).mean() / eager.pow(2).mean()
    assert err < 1e-10, float(err)
