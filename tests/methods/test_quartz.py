"""QuaRTZ as a method: configs, composition with SVDQuant, end to end through fourbit.quantize, save/load."""
import pytest
import torch

import fourbit
from fourbit.calibration import LayerStats
from fourbit.formats import QuaRTZ
from fourbit.methods import get_transform
from fourbit.methods.common import output_error
from fourbit.nn import QuantLinear
from fourbit.utils import import_optional

from ..helpers import TinyNet, loop_over, tiny_batches


def test_defaults_are_the_papers_w4a4():
    cfg = fourbit.QuaRTZConfig()
    assert cfg.method == "quartz" and not cfg.needs_calibration_data()
    w, a = cfg.weight_format(), cfg.activation_format()
    assert (w.name, w.group_size) == ("int4", 64)
    assert isinstance(a, QuaRTZ) and (a.group_size, a.lzs_group, a.mode, a.stage1, a.signed) == (
        64, 16, "trunc", "group", True)
    assert fourbit.QuantConfig.from_dict(cfg.to_dict()) == cfg
    both = fourbit.SVDQuantQuaRTZConfig()
    assert both.method == "svdquant+quartz" and both.rank == 32 and both.activations == "quartz"
    assert fourbit.QuantConfig.from_dict(both.to_dict()) == both


def test_config_validation_and_variants():
    with pytest.raises(ValueError, match="QuaRTZ format"):
        fourbit.QuaRTZConfig(activations="int4")
    assert fourbit.QuaRTZConfig(activations=None).activation_format() is None  # W4A16 (e.g. via overrides)
    assert fourbit.QuaRTZConfig(activations="quartz_tok_s32_round").activation_format().stage1 == "token"
    unsigned = fourbit.QuaRTZConfig(act_signed=False).activation_format()
    assert not unsigned.signed and unsigned.code_dtype == torch.uint8
    with pytest.raises(ValueError, match="act_signed"):
        fourbit.QuaRTZConfig(act_signed="yes")
    # LZS on the weights too
    assert isinstance(fourbit.QuaRTZConfig(weights="quartz_tok").weight_format(), QuaRTZ)


def _outlier_layer(seed=0, n=256, k=256, n_out=192):
    """Gaussian activations with 1% outlier channels (20-50x), Gaussian W: the diffusion-transformer picture."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g)
    cols = torch.randperm(k, generator=g)[: k // 100 + 1]
    x[:, cols] *= 20 + 30 * torch.rand(len(cols), generator=g)
    w = torch.randn(n_out, k, generator=g) / k**0.5
    return x, w, LayerStats(x.abs().amax(0), x, n, 1)


def _err(cfg, x, w, stats):
    return output_error(get_transform(cfg)(w, stats, cfg), x, x @ w.t())


@pytest.mark.parametrize("activations", ["quartz", "quartz_round", "quartz_tok"])
def test_quartz_w4a4_beats_rtn_w4a4_on_outlier_activations(activations):
    """Same int4 g64 weights; only the activation quantizer differs."""
    x, w, stats = _outlier_layer()
    rtn = _err(fourbit.RTNConfig(), x, w, stats)
    assert _err(fourbit.QuaRTZConfig(activations=activations), x, w, stats) < rtn


def test_svdquant_composition_same_as_svdquant_config_with_quartz_activations():
    x, w, stats = _outlier_layer(1)
    a = get_transform(fourbit.SVDQuantQuaRTZConfig(rank=8))(w, stats, fourbit.SVDQuantQuaRTZConfig(rank=8))
    cfg = fourbit.SVDQuantConfig(rank=8, activations="quartz")
    b = get_transform(cfg)(w, stats, cfg)
    assert a.info["alpha"] == b.info["alpha"] and torch.equal(a.weight.codes, b.weight.codes)
    assert isinstance(a.act_format, QuaRTZ) and a.rank == 8 and a.smooth is not None
    # smoothing + low-rank branch + QuaRTZ is far better than QuaRTZ alone on this layer
    assert output_error(a, x, x @ w.t()) < 0.5 * _err(fourbit.QuaRTZConfig(), x, w, stats)


@pytest.mark.parametrize("cfg", [
    fourbit.SVDQuantConfig(rank=4, activations="quartz"),
    fourbit.SVDQuantQuaRTZConfig(rank=4, activations="quartz_tok_round"),
    fourbit.QuaRTZConfig(weights="quartz", exclude=("head",)),  # LZS on the weights: header-word scales
    fourbit.QuaRTZConfig(weights="quartz_tok", overrides={"odd": {"act_signed": False}}),  # fp32 row scales
    fourbit.QuaRTZConfig(weight_rounding="gptq"),
], ids=["svdquant-quartz", "svdquant+quartz-tok", "quartz-lzs-weights", "quartz-tok-weights-unsigned", "gptq"])
def test_end_to_end_save_load(cfg, tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    batches = tiny_batches(3)
    x = tiny_batches(1, seed=7)[0]
    with torch.no_grad():
        ref = model(x)
    fourbit.quantize(model, cfg, forward_loop=loop_over(batches), progress=False, verbose=False)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert layers and all(isinstance(m.act_format, QuaRTZ) for m in layers.values())
    with torch.no_grad():
        y = model(x)
    assert torch.isfinite(y).all() and float((y - ref).norm() / ref.norm()) < 0.5
    path = fourbit.save(model, tmp_path / "q.fourbit.safetensors")
    with torch.device("meta"):
        fresh = TinyNet()
    fourbit.load(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(x), y)  # bit-exact after the round trip
    for name, m in fresh.named_modules():
        if isinstance(m, QuantLinear):
            assert m.act_format == layers[name].act_format and m.weight_format == layers[name].weight_format
    if "odd" in cfg.overrides:
        assert not layers["odd"].act_format.signed and layers["fc"].act_format.signed


@pytest.mark.skipif(not import_optional("fourbit.harness.variants"), reason="harness not installed")
def test_harness_variant_names():
    from fourbit.harness.variants import parse_variant

    cfg = parse_variant("quartz:w4a4").config()
    assert isinstance(cfg, fourbit.QuaRTZConfig) and (cfg.weights, cfg.activations) == ("int4", "quartz")
    cfg = parse_variant("quartz:w4a4:lzs=32:mode=round").config()
    assert cfg.activations == "quartz_s32_round"
    cfg = parse_variant("quartz:w4a4:stage1=token:rounding=gptq").config()
    assert cfg.activations == "quartz_tok" and cfg.weight_rounding == "gptq"
    cfg = parse_variant("svdquant+quartz:w4a4:r32").config()
    assert isinstance(cfg, fourbit.SVDQuantQuaRTZConfig) and cfg.rank == 32 and cfg.activations == "quartz"
    with pytest.raises(ValueError, match="a4"):
        parse_variant("quartz:w4a8").config()
