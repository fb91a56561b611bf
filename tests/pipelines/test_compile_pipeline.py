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
    err = capsys.readouterr().err
    assert f"fourbit: {comp}: warm-up call (compiling {len(blocks)} modules; minutes for a large model)" in err
    assert f"fourbit: {comp} ({type(model).__name__}): compiled {len(blocks)} modules" in err
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


def test_cuda_graphs_off_cuda_are_refused_in_the_report():
    pipe, comp, embeds, call_kwargs = build("pixart")
    from .tiny import prompts

    report = fourbit.compile_pipeline(pipe, prompts(embeds, 1)[0], call_kwargs=call_kwargs, backend="eager",
                                      cuda_graphs=True, warmup=False, verbose=False)
    assert not report.cuda_graphs and "cuda_graphs: the model is on cpu, not CUDA: no graphs" in report.notes
    assert "GraphForward" not in type(pipe.transformer.forward).__name__


def test_cuda_graphs_default_to_cuda_only():
    """The default ("auto") replays graphs where the denoiser is on CUDA and says nothing elsewhere; other values
    are refused before any work."""
    pipe, comp, embeds, call_kwargs = build("pixart")
    from .tiny import prompts

    with pytest.raises(ValueError, match="cuda_graphs must be True, False or 'auto'"):
        fourbit.compile_pipeline(pipe, prompts(embeds, 1)[0], call_kwargs=call_kwargs, backend="eager",
                                 cuda_graphs="yes", warmup=False, verbose=False)
    report = fourbit.compile_pipeline(pipe, prompts(embeds, 1)[0], call_kwargs=call_kwargs, backend="eager",
                                      warmup=False, verbose=False)
    assert not report.cuda_graphs and not any("cuda_graphs" in n for n in report.notes)
    assert "GraphForward" not in type(pipe.transformer.forward).__name__


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["pixart", "flux"])
def test_cuda_graphs_replay_the_compiled_denoiser_gpu(family):
    """16-bit tiny pipelines on the GPU: compiled + CUDA graphs equal eager up to fp32 summation order; a 4-bit one
    captures and runs (its latents are not compared: tiny 4-bit models are chaotic, see test_cli_pipeline.py)."""
    from .tiny import prompts

    pipe, comp, embeds, call_kwargs = build(family)
    pipe.to("cuda")
    ps = [{k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in p.items()} for p in prompts(embeds, 1)]
    eager = _latents(pipe, ps, call_kwargs)
    report = fourbit.compile_pipeline(pipe, ps[0], call_kwargs=call_kwargs, verbose=False)  # graphs: the default
    got = _latents(pipe, ps, call_kwargs)
    graphed = getattr(pipe, comp).forward
    assert report.cuda_graphs and len(graphed.graphs) >= 1 and graphed.eager_calls == 0
    err = (got - eager).pow(2).mean() / eager.pow(2).mean()
    assert err < 1e-8, float(err)
    torch._dynamo.reset()
    q, comp, qs, call_kwargs = _quantized(family)
    q.to("cuda")
    qs = [{k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in p.items()} for p in qs]
    report = fourbit.compile_pipeline(q, qs[0], call_kwargs=call_kwargs, cuda_graphs=True, verbose=False)
    assert report.cuda_graphs and torch.isfinite(_latents(q, qs, call_kwargs)).all()


def _replaying_capture(fn, pool):
    """A CUDA graph's behaviour on the CPU: the captured output's buffers are rewritten by each replay."""
    from torch.utils._pytree import tree_flatten

    out = fn()

    def replay():
        for static, new in zip(tree_flatten(out)[0], tree_flatten(fn())[0]):
            if isinstance(static, torch.Tensor):
                static.copy_(new)
    return replay, out


@pytest.mark.parametrize("family", FAMILIES)
def test_graph_forward_serves_every_familys_pipeline_calls(family):
    """``graph_forward`` under each real pipeline's denoiser calls (their keyword arguments, Nones, dicts, return
    types), with a CPU stand-in for the capture: one capture, every later step replayed, latents bit-identical."""
    from fourbit.nn import graph_forward

    pipe, comp, ps, call_kwargs = _quantized(family)
    eager = _latents(pipe, ps, call_kwargs)
    graphed = graph_forward(getattr(pipe, comp), capture=_replaying_capture, device_type="cpu")
    got = _latents(pipe, ps, call_kwargs)
    assert len(graphed.graphs) == 1 and graphed.eager_calls == 0
    torch.testing.assert_close(got, eager, rtol=0, atol=0)
