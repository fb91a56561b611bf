"""The core issue's acceptance on the synthetic outlier layer (2048 tokens, 1536 -> 1536)."""
import pytest
import torch

import fourbit
from fourbit.calibration import LayerStats
from fourbit.methods import get_transform
from fourbit.methods.common import output_error

from ..helpers import outlier_layer


@pytest.fixture(scope="module")
def layer():
    x, w = outlier_layer()
    # calibration sees a bounded sample of rows, as fourbit.quantize would; errors are measured on all rows
    stats = LayerStats(x.abs().amax(0), x[torch.randperm(x.shape[0])[:512]], x.shape[0], 1)
    return x, w, stats, x @ w.t()


def err(layer, cfg):
    x, w, stats, y = layer
    return output_error(get_transform(cfg)(w, stats, cfg), x, y)


@pytest.fixture(scope="module")
def errors(layer):
    grid = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    e = {
        "rtn": err(layer, fourbit.RTNConfig(weights="int4", activations="int4", group_size=64)),
        "svdquant": err(layer, fourbit.SVDQuantConfig(weights="int4", activations="int4", group_size=64,
                                                      rank=32, alpha_grid=grid)),
    }
    e["smoothquant_best"] = min(
        err(layer, fourbit.SmoothQuantConfig(weights="int4", activations="int4", group_size=64, alpha=a))
        for a in (0.0,) + grid)
    return e


def test_svdquant_beats_rtn_by_3x(errors):
    assert errors["svdquant"] <= errors["rtn"] / 3, errors


def test_svdquant_beats_best_smoothquant(errors):
    assert errors["svdquant"] <= 0.6 * errors["smoothquant_best"], errors


def test_w8a8_svdquant_rank16_below_one_percent(layer):
    e = err(layer, fourbit.SVDQuantConfig(weights="int8", activations="int8", rank=16, alpha_grid=(0.3, 0.5, 0.7)))
    assert e < 0.01, e


def test_ablation_order_svd_lorc_smoothing(layer, errors):
    """SVDQuant without smoothing is worse than with it; LoRC does not beat SVDQuant."""
    no_smooth = err(layer, fourbit.SVDQuantConfig(rank=32, smooth=False))
    lorc = err(layer, fourbit.LoRCConfig(rank=32))
    assert errors["svdquant"] < no_smooth
    assert errors["svdquant"] < lorc


@pytest.mark.parametrize("make_cfg", [
    lambda: fourbit.RTNConfig(weights="fp8", activations="fp8"),
    lambda: fourbit.SmoothQuantConfig(weights="fp8", activations="fp8", alpha=0.5),
    lambda: fourbit.SVDQuantConfig(weights="fp8", activations="fp8", rank=16, alpha_grid=(0.3, 0.5, 0.7)),
], ids=["rtn", "smoothquant", "svdquant"])
def test_fp8_w8a8_every_method(layer, errors, make_cfg):
    """fp8 (e4m3, per-row / per-token scales) is a format of every method: below 5% relative output error on this
    outlier layer (measured 3.5% RTN, 3.2% SmoothQuant, 0.6% SVDQuant r16; W4A4 RTN 23%)."""
    e = err(layer, make_cfg())
    assert e < 0.05 and e < errors["rtn"] / 4, e


def test_fp8_rtn_beats_int8_rtn_with_outliers(layer):
    """Per-token fp8 keeps a relative error per value; per-token int8's step follows the outlier channels."""
    fp8 = err(layer, fourbit.RTNConfig(weights="fp8", activations="fp8"))
    int8 = err(layer, fourbit.RTNConfig(weights="int8", activations="int8"))
    assert fp8 < 0.75 * int8, (fp8, int8)
