"""OutputActivationSpy: the activation a layer's output goes straight into, over one eager run."""
import torch
import torch.nn.functional as F
from torch import nn

from fourbit.nn.output_activations import OutputActivationSpy, activation_kind


class Followed(nn.Module):
    """Linears followed by: a tanh-GELU module, exact F.gelu, F.silu, a GELU on a slice (not seen), a GELU on one
    call only (calls disagree), nothing; an in-place SiLU (not an epilogue activation)."""

    def __init__(self, d=8):
        super().__init__()
        names = ("tanh", "exact", "silu", "sliced", "once", "plain", "inplace")
        self.lin = nn.ModuleDict({n: nn.Linear(d, d) for n in names})
        self.act = nn.GELU(approximate="tanh")

    def forward(self, x):
        lin = self.lin
        y = self.act(lin["tanh"](x)) + F.gelu(lin["exact"](x)) + F.silu(lin["silu"](x))
        y = y + F.gelu(lin["sliced"](x)[:, :4]).sum() + F.gelu(lin["once"](x)) + lin["once"](x) + lin["plain"](x)
        return y + F.silu(lin["inplace"](x), inplace=True)


def test_each_layer_gets_the_activation_its_output_goes_into():
    model = Followed()
    spy = OutputActivationSpy(dict(model.lin.named_children()))
    x = torch.randn(3, 8)
    with torch.no_grad(), spy:
        want = model(x)
    assert spy.kinds() == {"tanh": "gelu_tanh", "exact": "gelu", "silu": "silu", "sliced": None, "once": None,
                           "plain": None, "inplace": None}
    assert torch.equal(model(x), want)  # hooks removed, the model unchanged
    assert not any(m._forward_hooks for m in model.lin.values())


def test_a_layer_never_called_has_none():
    model = Followed()
    spy = OutputActivationSpy({"tanh": model.lin["tanh"], "unused": nn.Linear(2, 2)})
    with torch.no_grad(), spy:
        model(torch.randn(1, 8))
    assert spy.kinds() == {"tanh": "gelu_tanh", "unused": None}


def test_activation_kind_reads_the_arguments():
    assert activation_kind(F.gelu, (torch.ones(1), "tanh"), {}) == "gelu_tanh"
    assert activation_kind(F.gelu, (torch.ones(1),), {"approximate": "none"}) == "gelu"
    assert activation_kind(F.gelu, (torch.ones(1),), {"approximate": "erf"}) is None
    assert activation_kind(F.silu, (torch.ones(1),), {"inplace": True}) is None
    assert activation_kind(torch.tanh, (torch.ones(1),), {}) is None
