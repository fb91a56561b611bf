import pytest

import fourbit
from fourbit.config import QuantConfig


def test_defaults_and_round_trip():
    cfg = fourbit.SVDQuantConfig(weights="int4", activations="int4", group_size=64, rank=32)
    assert cfg.weight_format().group_size == 64
    d = cfg.to_dict()
    assert d["method"] == "svdquant" and d["rank"] == 32
    assert QuantConfig.from_dict(d) == cfg


@pytest.mark.parametrize("kwargs, match", [
    (dict(weights="int3"), "unknown format 'int3'"),
    (dict(rank=-1), "rank must be"),
    (dict(alpha=1.5), "alpha must be in"),
    (dict(pad="wrap"), "pad must be one of"),
    (dict(overrides={"fc*": {"rnak": 3}}), "unknown field"),
])
def test_bad_configs_say_what_is_wrong(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fourbit.SVDQuantConfig(**kwargs)


def test_sixteen_bit_activation_spellings():
    assert fourbit.RTNConfig(activations="fp16").activations is None
    assert fourbit.RTNConfig(activations=None).activation_format() is None


def test_per_layer_overrides():
    cfg = fourbit.SVDQuantConfig(overrides={"*.adaLN*": {"activations": None}, "*.kv": {"keep": True},
                                            "blocks.0.*": {"rank": 64}})
    assert cfg.for_layer("blocks.1.adaLN_modulation.1").activations is None
    assert cfg.for_layer("blocks.0.attn.kv") is None
    assert cfg.for_layer("blocks.0.mlp.fc1").rank == 64
    assert cfg.for_layer("blocks.1.mlp.fc1") is cfg


def test_unknown_method_in_dict():
    with pytest.raises(ValueError, match="unknown method"):
        QuantConfig.from_dict({"method": "magic"})


def test_svdquant_rank_follows_weight_bits():
    assert fourbit.SVDQuantConfig().rank == 32
    assert fourbit.SVDQuantConfig(weights="int8", activations="int8").rank == 16
    assert fourbit.SVDQuantConfig(weights="int8", rank=8).rank == 8


# ---- issue 20 items 5 and 6: nothing silently ignored, everything checked before any work ----------
@pytest.mark.parametrize("kwargs, match", [
    (dict(alpha_grid=(2.0,)), r"alpha_grid must be a tuple of alphas in \[0, 1\]"),
    (dict(alpha="0.5"), "alpha must be in"),
    (dict(group_size=True), "group_size must be a positive integer or None"),
    (dict(seed="1"), "seed must be an integer"),
    (dict(rank=2.0), "rank must be a non-negative integer"),
    (dict(kernel="bogus"), "unknown kernel 'bogus'"),
    (dict(weights="int8", activations="int8", group_size=32), "group_size=32 would be ignored"),
    (dict(overrides={"fc*": {"rank": -1}}), "override for 'fc\\*': rank must be"),
    (dict(overrides={"fc*": {"activations": "int3"}}), "override for 'fc\\*': unknown format 'int3'"),
    (dict(overrides={"fc*": 3}), "overrides map a pattern"),
])
def test_bad_values_are_refused_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fourbit.SVDQuantConfig(**kwargs)


def test_from_dict_names_unknown_fields():
    d = fourbit.RTNConfig().to_dict()
    with pytest.raises(ValueError, match="RTNConfig has no field\\(s\\) 'rank'"):
        QuantConfig.from_dict({**d, "rank": 8})
    with pytest.raises(ValueError, match="unknown method"):
        QuantConfig.from_dict({**d, "method": ["rtn"]})


def test_huge_group_size_refused_before_any_allocation():
    from fourbit.calibration import select_targets

    from ..helpers import TinyNet

    with pytest.raises(ValueError, match="layer conv: padding in_features 27 to a multiple of 1000000000"):
        select_targets(TinyNet(), fourbit.RTNConfig(group_size=10**9))


def test_rank_beyond_the_matrix_is_reported(capsys):
    from ..helpers import TinyNet

    model = fourbit.quantize(TinyNet(), fourbit.SVDConfig(rank=32), verbose=True, progress=False)
    assert model.fourbit_report.layers["head"]["rank_clipped_from"] == 32  # head is 40 -> 10
    assert "rank larger than the matrix, cut to min(N, K)" in capsys.readouterr().err
