"""``+ptqd`` variants through ``fourbit compare`` and ``fourbit ptqd-ablation`` on a tiny random model."""
import json

import pytest

from fourbit.cli import main
from fourbit.harness.compare import CompareSettings, run_compare
from fourbit.config import SVDQuantConfig
from fourbit.harness.variants import parse_variant
from fourbit.harness.ptqd_variants import candidate_formats


def test_ptqd_variant_names_parse():
    v = parse_variant("svdquant:w4a4-8:r32+ptqd")
    assert (v.abits, v.posts, v.rank) == ("4-8", ["ptqd"], 32)
    assert v.config().activations == "int4"  # mixed: the base config uses the lowest width
    assert parse_variant("rtn:w4a4+ptqd").posts == ["ptqd"]


def test_mixed_candidates_keep_the_models_config():
    class _Header:  # candidate_formats only reads the quantized model's header
        fourbit_header = {"config": SVDQuantConfig(group_size=32, rank=8).to_dict()}

    fmts = candidate_formats(parse_variant("svdquant:w4a4-8:r8:g=32+ptqd"), _Header())
    assert [(f.name, f.group_size) for f in fmts] == [("int4", 32), ("int8", None)]
    assert candidate_formats(parse_variant("svdquant:w4a4:r8+ptqd"), _Header()) is None


def test_compare_with_ptqd_on_tiny_model(tiny_weights, tmp_path):
    settings = CompareSettings(model="fashion-dit", weights=str(tiny_weights), samples=4, steps=3, calib_samples=2,
                               variants=("fp16", "rtn:w4a4+ptqd", "rtn:w4a4-8+ptqd"),
                               data_samples=0, n_boot=20, fd_n_boot=3, device="cpu")
    run_compare(settings, tmp_path)
    rows = json.loads((tmp_path / "report.json").read_text())["variants"]
    single, mixed = rows["rtn:w4a4+ptqd"]["ptqd"], rows["rtn:w4a4-8+ptqd"]["ptqd"]
    assert single["setting"].endswith("ddim|steps=3|guidance=3|eta=0") and single["samples"] == 2
    assert list(single["per_format"]) == ["int4"] and single["schedule"] is None
    assert single["bops"]["bops_vs_all_a4"] == pytest.approx(1.0)
    assert "no-op" in single["variance_calibration"]
    assert list(mixed["per_format"]) == ["int4", "int8"] and len(mixed["schedule"]) == 3
    assert mixed["schedule"][0] == "int4"  # t = 999: SNR_F ~ 4e-5, any width beats it
    b = mixed["bops"]
    assert b["bops_vs_all_a4"] >= 1.0 >= b["bops_vs_all_a8"]
    assert rows["rtn:w4a4+ptqd"]["lpips"]["mean"] > 0


def test_ablation_command(tiny_weights, tmp_path, capsys):
    out = tmp_path / "abl"
    rc = main(["ptqd-ablation", "--weights", str(tiny_weights), "--variant", "rtn:w4a4", "--samples", "4",
               "--steps", "2", "--eta", "0,1", "--calib-samples", "2", "--stats-samples", "2", "--data-samples", "0",
               "--n-boot", "10", "--fd-n-boot", "2", "--device", "cpu", "--save", str(tmp_path / "q.safetensors"),
               "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "ablation.json").read_text())
    assert [r["eta"] for r in report["results"]] == [0.0, 1.0]
    eta0, eta1 = ({r["row"]: r for r in res["rows"]} for res in report["results"])
    assert list(eta0) == ["W4A4", "W4A4 +correlated", "W4A4 +correlated +bias", "W4A4 +correlated +bias +VSC",
                          "W4A4 + validated PTQD", "mixed A4/A8 + full PTQD", "mixed A4/A8 + validated PTQD",
                          "W4A8", "W4A8 + full PTQD", "W4A8 + validated PTQD"]
    assert "no-op" in eta0["W4A4 +correlated +bias +VSC"]["note"]
    assert eta0["W4A4 + validated PTQD"]["note"].startswith("kept: ")
    validation = report["results"][1]["stats"]["validation"]
    assert set(validation) == {"int4", "int8", "auto"}
    assert "correlated+bias+vsc" in validation["int4"]["candidates"]  # eta 1 injects noise: VSC is a candidate
    assert eta1["W4A4 +correlated +bias +VSC"]["note"] is None
    bops = {n: r["bops"]["bops"] for n, r in eta0.items()}
    assert bops["W4A4"] <= bops["mixed A4/A8 + full PTQD"] <= bops["W4A8"]
    md = (out / "ablation.md").read_text()
    assert "## eta = 0 (deterministic sampler)" in md and "Precision schedule: int4" in md
    assert "Validated PTQD for int4: kept: " in md
    assert (out / "grid_eta1.png").stat().st_size > 0
    assert "ablation.md" in capsys.readouterr().out
    from fourbit import read_header
    from fourbit.ptqd import stored_settings
    assert len(stored_settings(read_header(tmp_path / "q.safetensors"))) == 2
