"""Shared tiny models for the PTQD tests: a 1-block DiT (width 64) with random weights, and its RTN W4A4 twin."""
import copy

import pytest
import torch

import fourbit
from fourbit.models import build_model, get_spec
from fourbit.models.io import save_weights


def tiny_dit(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model("fashion-dit", width=64, depth=1, num_heads=2)
    with torch.no_grad():  # adaLN-Zero starts with zero outputs: give every zero-initialised weight some signal
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.2)
    return model


@pytest.fixture(scope="session")
def tiny_pair():
    """(fp_model, RTN W4A4 model) - do not modify them in tests; deepcopy first."""
    fp = tiny_dit()
    q = copy.deepcopy(fp)
    fourbit.quantize(q, fourbit.RTNConfig(exclude=get_spec("fashion-dit").quant_exclude), progress=False, verbose=False)
    return fp, q


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("ptqd") / "tiny-dit.safetensors"
    save_weights(tiny_dit(), path, "fashion-dit")
    return path
