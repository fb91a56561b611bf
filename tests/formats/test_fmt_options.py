import pytest
import torch

from fourbit.formats import make_format


@pytest.mark.parametrize("name, ok", [("int4", "bfloat16"), ("int8", "float16"), ("nf4", "float16")])
def test_scale_dtype_option(name, ok):
    assert make_format(name, scale_dtype=ok).scale_dtype == getattr(torch, ok)
    with pytest.raises(ValueError, match=f"{name}: scale_dtype must be one of"):
        make_format(name, scale_dtype="float64")
