"""quantize_pipeline -> save_pretrained -> from_pretrained (meta) -> one pipeline call, on tiny real diffusers
pipelines of five families (random weights, random text embeddings in place of the text encoders, 2 steps, the
reference kernel), plus the paths that used to lose the 4-bit layers silently."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import fourbit
from fourbit.nn import QuantLinear

pytest.importorskip("diffusers")
from .tiny import FAMILIES, build, prompts  # noqa: E402

STEPS = 2


def _config():
    # small groups and rank for tiny layers; one alpha keeps the CPU test fast
    return fourbit.SVDQuantConfig(rank=4, group_size=8, alpha_grid=(0.5,))


def _quantized(family, n_prompts=2, dtype=None, **kw):
    pipe, comp, embeds, call_kwargs = build(family)
    if dtype is not None:
        pipe.to(dtype)
    ps = prompts(embeds, n_prompts)
    if dtype is not None:
        ps = [{k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in p.items()} for p in ps]
    fourbit.quantize_pipeline(pipe, _config(), ps, num_inference_steps=STEPS, call_kwargs=call_kwargs,
                              progress=False, **kw)
    return pipe, comp, ps, call_kwargs


def _latents(pipe, ps, call_kwargs, seed=7):
    pipe.set_progress_bar_config(disable=True)
    return pipe(**ps[0], **call_kwargs, num_inference_steps=STEPS, output_type="latent",
                generator=torch.Generator().manual_seed(seed)).images


def _swap(pipe, comp, module):
    pipe.register_modules(**{comp: module})


@pytest.mark.parametrize("family", FAMILIES)
def test_save_reload_meta_is_bit_identical(family, tmp_path):
    pipe, comp, ps, kw = _quantized(family)
    model = getattr(pipe, comp)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) >= 10
    assert model.fourbit_report.preset == {"sdxl": "unet"}.get(family, family)
    ref = _latents(pipe, ps, kw)
    assert torch.isfinite(ref).all()
    fourbit.save_pretrained(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "fourbit_model.safetensors"]
    loaded = fourbit.from_pretrained(tmp_path)
    assert not any(t.is_meta for t in list(loaded.parameters()) + list(loaded.buffers()))
    _swap(pipe, comp, loaded)
    assert torch.equal(_latents(pipe, ps, kw), ref)


def test_sharded_folder_reloads_bit_identical(tmp_path):
    pipe, comp, ps, kw = _quantized("flux")
    ref = _latents(pipe, ps, kw)
    fourbit.save_pretrained(pipe.transformer, tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "fourbit_model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    for shard in shards:  # at most 20 kB of tensor data, or one tensor larger than that on its own
        names = [n for n, s in index["weight_map"].items() if s == shard]
        size = (tmp_path / shard).stat().st_size - 8 - len(json.dumps(names)) * 4  # minus a generous header bound
        assert size <= 20_000 or len(names) == 1, (shard, names)
    assert not list(tmp_path.glob("diffusion_pytorch_model*"))
    _swap(pipe, comp, fourbit.from_pretrained(tmp_path))
    assert torch.equal(_latents(pipe, ps, kw), ref)
    (tmp_path / shards[1]).unlink()
    with pytest.raises(fourbit.CheckpointError, match="shard missing"):
        fourbit.from_pretrained(tmp_path)


def test_bf16_stays_bf16(tmp_path):
    from safetensors import safe_open

    pipe, comp, ps, kw = _quantized("flux", dtype=torch.bfloat16)
    fourbit.save_pretrained(pipe.transformer, tmp_path)
    with safe_open(str(tmp_path / "fourbit_model.safetensors"), framework="pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes["proj_out.weight"] == "BF16" and dtypes["x_embedder.weight"] == "BF16"
    assert dtypes["transformer_blocks.0.attn.to_q.lr_down"] == "BF16"
    loaded = fourbit.from_pretrained(tmp_path)
    assert loaded.proj_out.weight.dtype == torch.bfloat16
    ref = _latents(pipe, ps, kw)
    _swap(pipe, comp, loaded)
    assert torch.equal(_latents(pipe, ps, kw), ref)


def test_diffusers_save_pretrained_reloads_or_fails_loudly(tmp_path):
    """The silent-NaN path: the component's own save_pretrained writes a fourbit folder; diffusers' loader refuses
    it with an error (no random re-initialisation), fourbit's reloads it exactly; so does a whole pipeline."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    pipe, comp, ps, kw = _quantized("flux")
    ref = _latents(pipe, ps, kw)
    pipe.transformer.save_pretrained(tmp_path / "t")
    with pytest.raises(EnvironmentError, match="diffusion_pytorch_model"):
        FluxTransformer2DModel.from_pretrained(tmp_path / "t")
    pipe.save_pretrained(tmp_path / "pipe")
    with pytest.raises(EnvironmentError, match="diffusion_pytorch_model"):
        FluxPipeline.from_pretrained(tmp_path / "pipe")
    reloaded = FluxPipeline.from_pretrained(tmp_path / "pipe", transformer=fourbit.from_pretrained(
        tmp_path / "pipe" / "transformer"), text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    assert torch.equal(_latents(reloaded, ps, kw), ref)


def test_save_pretrained_follows_a_deepcopy_and_holds_no_cycle(tmp_path):
    import copy
    import gc
    import weakref

    pipe, comp, ps, kw = _quantized("sd3")
    twin = copy.deepcopy(pipe.transformer)
    twin.proj_out.bias.data.add_(1.0)
    twin.save_pretrained(tmp_path)  # saves the copy, not the original
    assert torch.equal(fourbit.from_pretrained(tmp_path).proj_out.bias, twin.proj_out.bias)
    gc.disable()
    try:
        ref = weakref.ref(twin)
        del twin
        assert ref() is None  # freed by reference counting alone
    finally:
        gc.enable()


def test_core_quantize_guards_the_models_own_save(tmp_path):
    pipe, comp, embeds, kw = build("sd3")
    model = pipe.transformer
    fourbit.quantize(model, fourbit.RTNConfig(group_size=8), progress=False, verbose=False)
    with pytest.raises(ValueError, match=r"fourbit\.save_pretrained"):
        model.save_pretrained(tmp_path)
    assert not list(tmp_path.iterdir())


def test_fuse_qkv_and_weight_are_refused_in_a_sentence():
    pipe, comp, ps, kw = _quantized("flux")
    with pytest.raises(ValueError, match="before quantizing"):
        pipe.transformer.fuse_qkv_projections()
    layer = pipe.transformer.transformer_blocks[0].attn.to_q
    assert (layer.in_features, layer.out_features) == (32, 32)
    with pytest.raises(AttributeError, match="no 16-bit .weight"):
        layer.weight  # noqa: B018
    assert not hasattr(layer, "weight")


def test_presets_generic_note_and_unmatched_patterns(capsys):
    pipe, comp, embeds, kw = build("pixart")
    cfg = fourbit.SVDQuantConfig(rank=4, group_size=8, alpha_grid=(0.5,), exclude=("no_such_layer",),
                                 overrides={"transformer_blocks.1.ff.*": {"activations": None}})
    fourbit.quantize_pipeline(pipe, cfg, prompts(embeds, 1), num_inference_steps=STEPS, call_kwargs=kw,
                              preset="generic", progress=False)
    err = capsys.readouterr().err
    assert "preset 'generic'" in err and "the safe default" in err
    assert "'no_such_layer' (exclude) matches no layer" in err
    report = pipe.transformer.fourbit_report
    assert report.unmatched_patterns == {"no_such_layer": "exclude"}
    t = pipe.transformer
    assert isinstance(t.pos_embed.proj, nn.Conv2d) and isinstance(t.proj_out, nn.Linear)  # generic keeps them
    assert isinstance(t.transformer_blocks[1].ff.net[2], QuantLinear)
    assert t.transformer_blocks[1].ff.net[2].act_format is None  # the user's W4A16 override
    assert t.transformer_blocks[0].ff.net[2].act_format is not None
    assert t.fourbit_header["extra"]["pipeline"]["preset"] == "generic"


def test_pipeline_errors_are_one_sentence():
    pipe, comp, embeds, kw = build("sd3")
    with pytest.raises(TypeError, match="needs a diffusers pipeline"):
        fourbit.quantize_pipeline(pipe.transformer, _config(), [])
    with pytest.raises(ValueError, match="no model component 'unet'"):
        fourbit.quantize_pipeline(pipe, _config(), [], component="unet")
    with pytest.raises(ValueError, match="unknown preset"):
        fourbit.quantize_pipeline(pipe, _config(), [], preset="sd5")


def test_from_pretrained_of_a_diffusers_folder_says_so(tmp_path):
    pipe, comp, embeds, kw = build("sd3")
    pipe.transformer.save_pretrained(tmp_path)  # 16-bit: diffusers' own folder
    with pytest.raises(fourbit.CheckpointError, match="not a fourbit folder"):
        fourbit.from_pretrained(tmp_path)


def _qwen_image():
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1,
                                       attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                       axes_dims_rope=(2, 2, 4))


@pytest.mark.parametrize("family", FAMILIES + ("qwen-image",))
def test_every_family_pattern_matches_a_layer(family):
    """The table is written against diffusers' module names: a rename in a diffusers release fails here."""
    from fourbit.pipelines.presets import find_preset, unmatched_patterns

    if family == "qwen-image":
        model = _qwen_image()
    else:
        pipe, comp = build(family)[:2]
        model = getattr(pipe, comp)
    preset = find_preset(model)
    assert preset.name == {"sdxl": "unet"}.get(family, family)
    assert unmatched_patterns([n for n, _ in model.named_modules()], _config(), preset) == {}


def test_plan_pipeline_then_quantize_keeps_the_slow_layers_16_bit(tmp_path):
    """plan_pipeline records the rows of one pipeline call; layers timed slower in 4 bits stay nn.Linear through
    quantize_pipeline, save_pretrained and from_pretrained (the plan's overrides are part of the saved config)."""
    pipe, comp, embeds, call_kwargs = build("pixart")
    ps = prompts(embeds, 2)
    model = getattr(pipe, comp)

    def timer(variants):  # layers whose closures get wide inputs pay in 4 bits, the others do not
        x = variants["16-bit"][0].args[0]
        return {"16-bit": 1.0, "config": 0.5 if x.shape[-1] > 32 else 2.0}

    plan = fourbit.plan_pipeline(pipe, _config(), ps[0], call_kwargs=call_kwargs, progress=False, verbose=False,
                                 timer=timer)
    choice = {lp.name: lp.choice for lp in plan.layers}
    assert set(choice.values()) == {"config", "16-bit"}
    assert all(sum(lp.rows.values()) == 1 for lp in plan.layers)  # one step, classifier-free guidance batched
    fourbit.quantize_pipeline(pipe, plan.config, ps, num_inference_steps=STEPS, call_kwargs=call_kwargs,
                              progress=False, verbose=False)
    for name, chosen in choice.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, QuantLinear) == (chosen == "config"), name
    ref = _latents(pipe, ps, call_kwargs)
    fourbit.save_pretrained(model, tmp_path)
    loaded = fourbit.from_pretrained(tmp_path)
    for name, chosen in choice.items():
        assert isinstance(loaded.get_submodule(name), QuantLinear) == (chosen == "config"), name
    _swap(pipe, comp, loaded)
    assert torch.equal(_latents(pipe, ps, call_kwargs), ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_siblings_fused_from_the_pipeline_save_and_reload(family, tmp_path):
    """quantize_pipeline(siblings=True) fuses the layers reading one input (one call of the pipeline finds them),
    quantizes the fused layers, and the checkpoint reloads into the same fused structure, bit for bit."""
    pipe, comp, ps, kw = _quantized(family, siblings=True)
    model = getattr(pipe, comp)
    groups = model.fourbit_siblings
    assert groups and all(len(g) >= 2 for g in groups)
    fused = [n for n, m in model.named_modules() if n.endswith(".group.linear")]
    assert len(fused) == len(groups) and all(isinstance(model.get_submodule(n), QuantLinear) for n in fused)
    ref = _latents(pipe, ps, kw)
    fourbit.save_pretrained(model, tmp_path)
    loaded = fourbit.from_pretrained(tmp_path)
    assert loaded.fourbit_siblings == groups
    _swap(pipe, comp, loaded)
    assert torch.equal(_latents(pipe, ps, kw), ref)


def test_plan_with_siblings_times_the_fused_layers_and_quantize_does_not_fuse_again():
    pipe, comp, embeds, call_kwargs = build("flux")
    ps = prompts(embeds, 2)
    model = getattr(pipe, comp)
    plan = fourbit.plan_pipeline(pipe, _config(), ps[0], call_kwargs=call_kwargs, progress=False, verbose=False,
                                 timer=lambda v: {label: 1.0 if label == "16-bit" else 0.5 for label in v},
                                 siblings=True)
    groups = [list(g) for g in model.fourbit_siblings]
    assert groups and any(lp.name.endswith(".group.linear") for lp in plan.layers)
    fourbit.quantize_pipeline(pipe, plan.config, ps, num_inference_steps=STEPS, call_kwargs=call_kwargs,
                              progress=False, verbose=False, siblings=True)
    assert model.fourbit_siblings == groups
    assert model.fourbit_report.unmatched_patterns == {}


def test_a_plan_made_on_the_fused_denoiser_applies_to_a_fresh_one():
    """A plan made with siblings=True names the fused layers (here the fused groups are the ones kept 16-bit);
    quantize_pipeline(siblings=True) on a fresh pipeline fuses before it checks the patterns, so every override of
    the plan matches (none reported unmatched) and its 16-bit layers stay so."""
    pipe, comp, embeds, call_kwargs = build("flux")
    ps = prompts(embeds, 2)

    def timer(variants):  # the fused groups (wide N) are slower in 4 bits, the others pay
        timed = variants["config"][0].func  # the layer, or the layer followed by its activation (``.layer``)
        layer = getattr(timed, "layer", timed)
        return {"16-bit": 1.0, "config": 2.0 if layer.out_features > 64 else 0.5}

    plan = fourbit.plan_pipeline(pipe, _config(), ps[0], call_kwargs=call_kwargs, progress=False, verbose=False,
                                 timer=timer, siblings=True)
    assert {lp.choice for lp in plan.layers} == {"config", "16-bit"}
    assert any(lp.name.endswith(".group.linear") and lp.choice == "16-bit" for lp in plan.layers)
    fresh, comp2, _, _ = build("flux")
    assert not getattr(getattr(fresh, comp2), "fourbit_siblings", None)
    fourbit.quantize_pipeline(fresh, plan.config, ps, num_inference_steps=STEPS, call_kwargs=call_kwargs,
                              progress=False, verbose=False, siblings=True)
    model = getattr(fresh, comp2)
    assert model.fourbit_report.unmatched_patterns == {}
    for lp in plan.layers:
        assert isinstance(model.get_submodule(lp.name), QuantLinear) == (lp.choice == "config"), lp.name
