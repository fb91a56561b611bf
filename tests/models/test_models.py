import fnmatch

import pytest
import torch
from torch import nn

from fourbit.models import available_models, build_model, get_spec

TINY = {
    "fashion-dit": dict(width=32, depth=2, num_heads=2),
    "fashion-unet": dict(channels=(32, 32, 32), groups=8, emb_dim=32, freq_dim=16),
}


def _inputs(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 1, 28, 28, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    y = torch.tensor([0, 7, 10, 3, 9, 10][:b])
    return x, t, y


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give zero-initialised layers random weights, so outputs depend on every input."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().max() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def test_registry_lists_both():
    assert available_models() == ["fashion-dit", "fashion-unet"]
    with pytest.raises(KeyError, match="available"):
        get_spec("nope")


@pytest.mark.parametrize("name", ["fashion-dit", "fashion-unet"])
def test_forward_shape_and_determinism(name):
    model = randomize_(build_model(name, **TINY[name]))
    x, t, y = _inputs()
    with torch.no_grad():
        out1, out2 = model(x, t, y), model(x, t, y)
    assert out1.shape == (3, 1, 28, 28) and out1.dtype == torch.float32
    assert torch.isfinite(out1).all() and torch.equal(out1, out2)
    # The class and the timestep both change the output (null class 10 included).
    with torch.no_grad():
        assert not torch.allclose(model(x, t, torch.tensor([1, 7, 10])), out1)
        assert not torch.allclose(model(x, (t + 100) % 1000, y), out1)


@pytest.mark.parametrize("name", ["fashion-dit", "fashion-unet"])
def test_full_config_forward_and_size(name):
    model = build_model(name)
    x, t, y = _inputs(2)
    with torch.no_grad():
        assert model(x, t, y).shape == (2, 1, 28, 28)
    n = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    assert n * 2 <= 12 * 2**20, "fp16 weights must stay at most 12 MiB"


@pytest.mark.parametrize("name", ["fashion-dit", "fashion-unet"])
def test_build_on_meta(name):
    meta = build_model(name, device="meta", dtype=torch.float16)
    cpu = build_model(name)
    assert all(p.device.type == "meta" and p.dtype == torch.float16 for p in meta.parameters())
    assert [(k, v.shape) for k, v in meta.state_dict().items()] == [(k, v.shape) for k, v in cpu.state_dict().items()]


def test_dit_layer_names_are_plain_linears():
    model = build_model("fashion-dit", device="meta")
    mods = dict(model.named_modules())
    for name in (
        "blocks.3.attn.qkv",
        "blocks.3.attn.proj",
        "blocks.3.mlp.fc1",
        "blocks.3.mlp.fc2",
        "blocks.3.adaLN_modulation.1",
    ):
        assert type(mods[name]) is nn.Linear, name
    assert type(mods["x_embedder"]) is nn.Conv2d


def test_unet_has_convs_linears_and_attention():
    model = build_model("fashion-unet", device="meta")
    mods = dict(model.named_modules())
    assert type(mods["conv_in"]) is nn.Conv2d and type(mods["conv_out"]) is nn.Conv2d
    assert type(mods["mid_block.attentions.0.qkv"]) is nn.Linear
    assert type(mods["down_blocks.0.resnets.0.conv1"]) is nn.Conv2d
    n = sum(p.numel() for p in model.parameters())
    assert 2e6 <= n <= 5e6


@pytest.mark.parametrize("name", ["fashion-dit", "fashion-unet"])
def test_quant_exclude_patterns_match_layers(name):
    spec = get_spec(name)
    names = [n for n, m in build_model(name, device="meta").named_modules() if n]
    for pattern in spec.quant_exclude:
        assert any(fnmatch.fnmatchcase(n, pattern) for n in names), pattern
    assert spec.null_class == 10 and spec.default_guidance_scale > 1
