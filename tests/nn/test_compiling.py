"""``fourbit.nn.compile_model``: which blocks are compiled, which kernels the layers get, what torch.compile is
given; one real inductor compile on the CPU equals eager."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fourbit
import fourbit.nn.compiling as cm
from fourbit.nn import compile_model, quantized_layers, repeated_blocks
from fourbit.nn.compiling import choose_kernels, compile_blocks, speed_kernel


class Block(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class Stage(nn.Module):
    """A stage of blocks (its instances may differ in shape): not compiled whole."""

    def __init__(self, n=2):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(n))
        self.skip = nn.ModuleList([nn.Linear(16, 16), nn.Linear(16, 16)])  # repeated, but layers themselves

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x + self.skip[0](x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(16, 16)
        self.stages = nn.ModuleList([Stage(2), Stage(3)])
        self.heads = nn.ModuleList([nn.Dropout(), nn.Dropout()])  # repeated, but holds no layer

    def forward(self, x):
        x = self.inp(x)
        for s in self.stages:
            x = s(x)
        return x


def _quantized(kernel="reference"):
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(4, 16)
    fourbit.quantize(net, fourbit.RTNConfig(weights="int8", activations="int8", kernel=kernel), lambda m: m(x),
                     progress=False, verbose=False)
    return net, x


def test_repeated_blocks_are_the_innermost_repeated_classes_holding_layers():
    assert repeated_blocks(Net()) == ["Block"]  # not Stage (holds Blocks), not Linear (a layer), not Dropout


def test_diffusers_declared_blocks_win_and_a_model_without_repeats_compiles_whole(monkeypatch):
    net = Net()
    net._repeated_blocks = ["Stage"]
    assert repeated_blocks(net) == ["Stage"]
    net._repeated_blocks = ["NotInThisModel"]  # a declaration naming nothing here is ignored
    assert repeated_blocks(net) == ["Block"]
    calls = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: calls.append(type(self).__name__))
    assert compile_blocks(nn.Sequential(nn.Linear(4, 4))) == (["Sequential"], 1)
    assert compile_blocks(Net()) == (["Block"], 5) and calls[1:] == ["Block"] * 5


def test_naming_blocks_that_are_not_there_is_refused():
    with pytest.raises(ValueError, match=r"no module of class \['Blk'\] in Net; its classes are: Block, Dropout"):
        compile_blocks(Net(), ["Blk"])


def test_choose_kernels_on_the_cpu_keeps_them_and_says_why():
    net, _ = _quantized()
    notes = choose_kernels(net, "auto")
    assert notes and "the model is on cpu" in notes[0]
    assert {layer.kernel for _, layer in quantized_layers(net)} == {"reference"}


def test_auto_moves_only_reference_layers_to_the_speed_kernel(monkeypatch):
    net, _ = _quantized()
    layers = [layer for _, layer in quantized_layers(net)]
    layers[0].kernel = "triton-cublas"  # a precision plan's per-layer choice
    monkeypatch.setattr(cm, "speed_kernel", lambda device: ("triton", ""))
    assert choose_kernels(net, "auto") == []
    assert [layer.kernel for layer in layers] == ["triton-cublas"] + ["triton"] * (len(layers) - 1)
    choose_kernels(net, "reference")  # a name: every layer
    assert {layer.kernel for layer in layers} == {"reference"}
    choose_kernels(net, None)
    assert {layer.kernel for layer in layers} == {"reference"}
    with pytest.raises(ValueError, match="unknown kernel 'fast'"):
        choose_kernels(net, "fast")


@pytest.mark.parametrize("capability, expected", [((9, 0), "triton"), ((8, 0), None), ((10, 0), None)])
def test_speed_kernel_only_where_measured(monkeypatch, capability, expected):
    pytest.importorskip("triton")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    name, why = speed_kernel(torch.device("cuda", 0))
    assert name == expected
    assert (why == "") == (expected is not None)
    if expected is None:
        assert f"compute capability {capability[0]}.{capability[1]}" in why and "kernel='triton'" in why


def test_gpu_kernels_are_prepared_and_compiled_with_the_fusion_pass(monkeypatch):
    """Layers on a GPU kernel: ``prepare_kernels`` runs with the forward loop, the blocks get the pass's options
    merged with the caller's; mode= with the pass is refused before anything is compiled."""
    net, x = _quantized()
    for _, layer in quantized_layers(net):
        layer.kernel = "triton"
    prepared, compiled = [], []
    monkeypatch.setattr(cm, "prepare_kernels", lambda model, forward_loop: prepared.append(forward_loop))
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: compiled.append(kw))
    with pytest.raises(ValueError, match="mode='max-autotune' cannot go with the fusion pass"):
        compile_model(net, kernel=None, mode="max-autotune")
    assert not compiled and not prepared  # refused before anything was done
    loop = lambda m: m(x)  # noqa: E731
    report = compile_model(net, loop, kernel=None, options={"max_autotune": False})
    assert prepared[-1] is loop and report.fusion and report.blocks == ["Block"] and report.compiled == 5
    from fourbit.kernels.fusion import FuseAroundQuantLinear

    opts = compiled[0]["options"]
    assert isinstance(opts.pop("pre_grad_custom_pass"), FuseAroundQuantLinear) and opts == {"max_autotune": False}
    assert report.kernels == {"triton": len(list(quantized_layers(net)))}
    assert "fusion pass on" in report.summary()
    compiled.clear()
    report = compile_model(net, loop, kernel=None, backend="eager")  # not inductor: no pass
    assert not report.fusion and compiled[0] == {"backend": "eager"}


def test_reference_layers_are_not_prepared_and_get_no_pass(monkeypatch):
    net, x = _quantized()
    monkeypatch.setattr(cm, "prepare_kernels", lambda *a, **k: pytest.fail("prepared reference layers"))
    compiled = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: compiled.append(kw))
    report = compile_model(net, lambda m: m(x))
    assert not report.fusion and compiled[0] == {"options": {"emulate_precision_casts": True}}
    assert "the model is on cpu" in report.notes[0] and "emulate_precision_casts" in report.notes[1]


def test_inductor_compiled_blocks_equal_eager_on_the_cpu():
    """A real compile (inductor, CPU) of the quantized model's blocks: the same output as eager."""
    net, x = _quantized()
    with torch.no_grad():
        eager = net(x)
        report = compile_model(net, lambda m: m(x))
        got = net(x)
    assert report.compiled == 5 and all(b._compiled_call_impl is not None for b in net.modules()
                                        if isinstance(b, Block))
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt, note", [("int4", "group-scaled 4-bit formats"), ("int4p2", None)])
def test_slow_formats_on_the_gpu_kernels_are_named(monkeypatch, fmt, note):
    pytest.importorskip("triton")
    torch.manual_seed(0)
    net, x = Net(), torch.randn(4, 16)
    fourbit.quantize(net, fourbit.RTNConfig(weights=fmt, activations=fmt,
                                            kernel="triton"), lambda m: m(x), progress=False, verbose=False)
    monkeypatch.setattr(cm, "prepare_kernels", lambda model, forward_loop: None)
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: None)
    notes = compile_model(net, kernel=None).notes
    if note is None:
        assert not notes
    else:
        assert len(notes) == 1 and f"15 layers have {note}" in notes[0] and "'int4p2'" in notes[0]


def test_cuda_graphs_where_the_model_is_on_cuda(monkeypatch):
    """"auto" wraps a CUDA model's forward in ``graph_forward`` and nothing else; True says why it can't; other
    values are refused before any work."""
    import fourbit.nn.cuda_graph as cg

    net, x = _quantized()
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: None)
    with pytest.raises(ValueError, match="cuda_graphs must be True, False or 'auto'"):
        compile_model(net, kernel=None, cuda_graphs="always")
    report = compile_model(net, kernel=None)
    assert not report.cuda_graphs and not any("cuda_graphs" in n for n in report.notes)
    report = compile_model(net, kernel=None, cuda_graphs=True)
    assert not report.cuda_graphs and "cuda_graphs: the model is on cpu, not CUDA: no graphs" in report.notes
    wrapped = []
    monkeypatch.setattr(cg, "graph_forward", lambda model: wrapped.append(model))
    monkeypatch.setattr(cm, "model_device", lambda model: torch.device("cuda"))
    assert compile_model(net, kernel=None, cuda_graphs=False).cuda_graphs is False and not wrapped
    assert compile_model(net, kernel=None).cuda_graphs is True and wrapped == [net]
