"""The compare harness end to end on a tiny random model (the real models are exercised by `fourbit demo`)."""
import json

import pytest
import torch

from fourbit.harness.compare import CompareSettings, format_table, run_compare
from fourbit.harness.variants import parse_variant
from fourbit.models import build_model
from fourbit.models.io import save_weights


def test_variant_grammar():
    v = parse_variant("svdquant:w4a4:r32")
    assert (v.method, v.wbits, v.abits, v.rank) == ("svdquant", 4, "4", 32)
    cfg = v.config(exclude=("final_layer.*",))
    assert cfg.rank == 32 and cfg.weights == "int4" and cfg.activations == "int4" and cfg.exclude == ("final_layer.*",)
    w8 = parse_variant("svdquant:w8a8").config()
    assert (w8.weights, w8.activations, w8.rank) == ("int8", "int8", 16)
    assert parse_variant("nf4:w4a16").config().activations is None
    assert parse_variant("rtn:w4a4:fmt=int4p2:g=32").config().group_size == 32
    assert parse_variant("fp16").is_baseline


@pytest.mark.parametrize("bad, match", [("", "empty"), ("magic:w4a4", "unknown method"),
                                        ("rtn", "bit-widths"), ("rtn:w4a4:q7", "unexpected token"),
                                        ("rtn:w4a4+nope", "unknown suffix")])
def test_bad_variant_names(bad, match):
    with pytest.raises(ValueError, match=match):
        parse_variant(bad)


def test_compare_on_tiny_model(tmp_path):
    torch.manual_seed(0)
    model = build_model("fashion-dit", width=64, depth=1, num_heads=2)
    with torch.no_grad():  # adaLN-Zero starts with zero outputs: give every zero-initialised weight some signal
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.2)
    weights = tmp_path / "tiny.safetensors"
    save_weights(model, weights, "fashion-dit")
    settings = CompareSettings(model="fashion-dit", weights=str(weights), samples=6, steps=2, calib_samples=2,
                               variants=("fp16", "rtn:w4a4", "svdquant:w4a4:r8"), data_samples=0,
                               n_boot=50, fd_n_boot=5, device="cpu")
    report = run_compare(settings, tmp_path / "out")
    for f in ("report.json", "report.html", "grid.png"):
        assert (tmp_path / "out" / f).stat().st_size > 0
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    rows = on_disk["variants"]
    assert list(rows) == ["fp16", "rtn:w4a4", "svdquant:w4a4:r8"]
    assert rows["fp16"]["lpips"]["mean"] == pytest.approx(0.0, abs=1e-6)
    assert rows["rtn:w4a4"]["lpips"]["mean"] > 0
    assert 4.0 < rows["rtn:w4a4"]["weight_bits_per_element"] < 5.0
    assert rows["svdquant:w4a4:r8"]["calibration_seconds"] > 0
    for key in ("psnr", "ssim", "fd_vs_fp16", "model_bytes", "sampling_seconds"):
        assert key in rows["rtn:w4a4"]
    assert "svdquant:w4a4:r8" in format_table(report)
    html = (tmp_path / "out" / "report.html").read_text()
    assert "<svg" in html and "data:image/png;base64" in html


def test_model_policy_option():
    from fourbit.models import get_spec

    spec = get_spec("fashion-dit")
    cfg = parse_variant("svdquant:w4a4:r32:policy=paper").config(spec.quant_exclude, spec.quant_policies)
    assert cfg.for_layer("blocks.2.adaLN_modulation.1").activations is None
    assert cfg.for_layer("blocks.2.mlp.fc1").activations == "int4"
    with pytest.raises(ValueError, match="no policy 'nope'"):
        parse_variant("rtn:w4a4:policy=nope").config((), spec.quant_policies)
