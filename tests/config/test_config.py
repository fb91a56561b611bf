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
