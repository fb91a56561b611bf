"""OutputActivationSpy: the activation a layer's output (or a column slice of it) goes straight into, over one eager
run."""
import torch
import torch.nn.functional as F
from torch import nn

import fourbit
from fourbit.nn.output_activations import OutputActivationSpy
from fourbit.utils.activation_calls import activation_kind

from ..helpers import SingleBlock


class Followed(nn.Module):
    """Linears followed by: a tanh-GELU module, exact F.gelu, F.silu, a GELU on a column slice, a GELU on one call
    only (calls disagree), nothing; an in-place SiLU (not an epilogue activation); a GELU on a row slice and one
    after a reshape (neither is a column range the epilogue has); a GELU whose input is also read by a residual; a
    GELU on half the columns while other code reads the other half."""

    def __init__(self, d=8):
        super().__init__()
        names = ("tanh", "exact", "silu", "sliced", "once", "plain", "inplace", "rows", "reshaped", "residual",
                 "other_half")
        self.lin = nn.ModuleDict({n: nn.Linear(d, d) for n in names})
        self.act = nn.GELU(approximate="tanh")

    def forward(self, x):
        lin = self.lin
        y = self.act(lin["tanh"](x)) + F.gelu(lin["exact"](x)) + F.silu(lin["silu"](x))
        y = y + F.gelu(lin["sliced"](x)[:, :4]).sum() + F.gelu(lin["once"](x)) + lin["once"](x) + lin["plain"](x)
        y = y + F.gelu(lin["rows"](x)[:2]).sum() + F.gelu(lin["reshaped"](x).reshape(-1)).sum()
        r = lin["residual"](x)  # the pre-activation values read again: the epilogue cannot take the GELU
        y = y + F.gelu(r) + r
        h = lin["other_half"](x)  # other code reads the other columns only: the GELU's columns stay fusable
        y = y + torch.cat([F.gelu(h[..., :4]), h[..., 4:] * 2], -1)
        return y + F.silu(lin["inplace"](x), inplace=True)


def test_each_layer_gets_the_activation_its_output_goes_into():
    model = Followed()
    spy = OutputActivationSpy(dict(model.lin.named_children()))
    x = torch.randn(3, 8)
    with torch.no_grad(), spy:
        want = model(x)
    assert spy.kinds() == {"tanh": ("gelu_tanh", 0, 8), "exact": ("gelu", 0, 8), "silu": ("silu", 0, 8),
                           "sliced": ("gelu", 0, 4), "once": None, "plain": None, "inplace": None, "rows": None,
                           "reshaped": None, "residual": None, "other_half": ("gelu", 0, 4)}
    assert torch.equal(model(x), want)  # hooks removed, the model unchanged
    assert not any(m._forward_hooks for m in model.lin.values())


def test_a_layer_never_called_has_none():
    model = Followed()
    spy = OutputActivationSpy({"tanh": model.lin["tanh"], "unused": nn.Linear(2, 2)})
    with torch.no_grad(), spy:
        model(torch.randn(1, 8))
    assert spy.kinds() == {"tanh": ("gelu_tanh", 0, 8), "unused": None}


def test_activation_kind_reads_the_arguments():
    assert activation_kind(F.gelu, (torch.ones(1), "tanh"), {}) == "gelu_tanh"
    assert activation_kind(F.gelu, (torch.ones(1),), {"approximate": "none"}) == "gelu"
    assert activation_kind(F.gelu, (torch.ones(1),), {"approximate": "erf"}) is None
    assert activation_kind(F.silu, (torch.ones(1),), {"inplace": True}) is None
    assert activation_kind(torch.tanh, (torch.ones(1),), {}) is None


def test_a_sibling_groups_member_columns():
    """Q and an MLP input fused as siblings (FLUX's single blocks): the GELU on the MLP's columns of the group's
    output is seen as that column range of the group's linear."""
    block, x = SingleBlock(d=8, h=16), torch.randn(4, 8)
    fourbit.fuse_siblings(block, fourbit.find_siblings(block, lambda m: m(x)))
    group = block.to_q.group.linear
    spy = OutputActivationSpy({"group": group})
    with torch.no_grad(), spy:
        block(x)
    assert spy.kinds() == {"group": ("gelu_tanh", 8, 24)}
