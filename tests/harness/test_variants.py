"""Variant strings are validated once, before any work (issue 20 items 5 and 6)."""
import pytest

from fourbit.harness.variants import parse_variant


@pytest.mark.parametrize("text, match", [
    ("rtn:w4a4:gg=32", "option 'gg' is not read by rtn"),
    ("rtn:w4a4:alpha=0.5", "option 'alpha' is not read by rtn"),
    ("rtn:w4a4:r32", "rtn has no low-rank branch, so r32 would be ignored"),
    ("smoothquant:w4a4:r16", "smoothquant has no low-rank branch"),
    ("quartz:w4a4:ptqd_samples=3", "option 'ptqd_samples' is not read by quartz"),
    ("rtn:w4a4:g=0", "option g must be a positive integer, got '0'"),
    ("rtn:w4a4:g=abc", "option g must be a positive integer"),
    ("svdquant:w4a4:alpha=1.5", r"option alpha must be a number in \[0, 1\], got '1.5'"),
    ("rtn:w4a4:g=32:g=64", "option 'g' given twice"),
    ("rtn:w3a4", "bit widths are 4, 8 or 16"),
    ("rtn:w16a16", "16-bit weights are the fp16 baseline"),
])
def test_options_nothing_reads_or_out_of_range_are_refused(text, match):
    with pytest.raises(ValueError, match=match):
        parse_variant(text)


@pytest.mark.parametrize("text, match", [
    ("nf4:w4a4", "nf4 is 4-bit weight-only"),
    ("nf4:w4a16:fmt=int4p2", "nf4 is 4-bit weight-only"),
    ("rtn:w4a4:fmt=int3", "unknown format 'int3'"),
    ("rtn:w4a4:kernel=bogus", "unknown kernel 'bogus'"),
    ("rtn:w8a8:g=32", "group_size=32 would be ignored: int8 and int8 keep their own grouping"),
    ("quartz:w4a4:rounding=best", "weight_rounding must be one of"),
])
def test_configs_that_cannot_work_are_refused_when_built(text, match):
    v = parse_variant(text)
    with pytest.raises(ValueError, match=match) as err:
        v.config()
    assert text in str(err.value)  # names the variant


def test_ptqd_options_are_read_with_the_ptqd_suffix():
    v = parse_variant("rtn:w4a4:ptqd_samples=4+ptqd")
    assert v.options["ptqd_samples"] == "4" and v.posts == ["ptqd"]
    assert parse_variant("quartz:w4a4:stage1=token:rounding=gptq").config().weight_rounding == "gptq"
    assert parse_variant("rtn:w4a4:rounding=gptq").config().weight_rounding == "gptq"


# ---- item 6: fourbit compare refuses a bad variant or setting before any model is loaded ----------
@pytest.mark.parametrize("variants, match", [
    (("fp16", "rtn:w4a4:fmt=int3"), "unknown format 'int3'"),
    (("fp16", "svdquant:w4a4:alpha=1.5"), "option alpha must be"),
    (("rtn:w4a4:g=0",), "option g must be a positive integer"),
    (("rtn:w4a4:kernel=bogus",), "unknown kernel 'bogus'"),
])
def test_compare_fails_before_any_work(variants, match, tmp_path, monkeypatch):
    from fourbit.harness.compare import CompareSettings, run_compare

    def no_work(*a, **k):
        raise AssertionError("a model was loaded before the variants were checked")

    monkeypatch.setattr("fourbit.models.load_pretrained", no_work)
    with pytest.raises(ValueError, match=match):
        run_compare(CompareSettings(variants=variants, samples=4, data_samples=0), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_compare_group_size_checked_against_the_model_before_sampling(tmp_path, monkeypatch):
    from fourbit.harness.compare import CompareSettings, run_compare

    from ..helpers import TinyNet

    monkeypatch.setattr("fourbit.models.load_pretrained", lambda name, device="cpu": TinyNet())
    monkeypatch.setattr("fourbit.sampling.sample", lambda *a, **k: (_ for _ in ()).throw(AssertionError("sampled")))
    with pytest.raises(ValueError, match="padding in_features 27 to a multiple of 1000000000"):
        run_compare(CompareSettings(variants=("fp16", "rtn:w4a4:g=1000000000"), samples=4, data_samples=0),
                    tmp_path / "out")


@pytest.mark.parametrize("field, value, match", [
    ("samples", 1, "samples must be an integer >= 2 .the Frechet"), ("samples", -3, "samples must be"),
    ("calib_samples", 0, "calib_samples must be"), ("steps", 0, "steps must be"),
    ("data_samples", 1, "data_samples must be 0"), ("sampler", "euler", "sampler must be"),
])
def test_compare_settings_checked(field, value, match):
    from fourbit.harness.compare import CompareSettings

    with pytest.raises(ValueError, match=match):
        CompareSettings(**{field: value})
