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
