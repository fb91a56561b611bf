"""``graph_forward``: one capture per signature, inputs copied into the captured buffers, outputs copied out, calls
that can't be captured run as before. On the CPU through a fake capture (it re-runs the call into the captured
output's buffers, as a replay does); on a GPU with real CUDA graphs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fourbit.nn.cuda_graph import GraphForward, graph_forward, release_graphs


class Denoiser(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.calls = 0

    def forward(self, hidden_states, timestep, encoder_hidden_states=None, scale: float = 1.0, return_dict=True):
        self.calls += 1
        y = self.lin(hidden_states) * timestep[:, None, None] * scale
        if encoder_hidden_states is not None:
            y = y + encoder_hidden_states.mean(1, keepdim=True)
        return (y,) if not return_dict else {"sample": y}


class Unhashable(float):
    __hash__ = None


def fake_capture(fn, pool):
    """What a CUDA graph does, on the CPU: the captured output's buffers are rewritten by each replay."""
    out = fn()

    def replay():
        new = fn()
        (out[0] if isinstance(out, tuple) else out["sample"]).copy_(
            new[0] if isinstance(new, tuple) else new["sample"])
    return replay, out


def _inputs(seed, b=2, n=4):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(b, n, 8, generator=g), timestep=torch.rand(b, generator=g),
                encoder_hidden_states=torch.randn(b, 3, 8, generator=g))


@torch.no_grad()
def test_replays_equal_eager_and_each_signature_is_captured_once():
    torch.manual_seed(0)
    m = Denoiser()
    want = [m(**_inputs(s), return_dict=False)[0] for s in range(3)]
    g = graph_forward(m, warmup=2, capture=fake_capture, device_type="cpu")
    m.calls = 0
    got = [m(**_inputs(s), return_dict=False)[0] for s in range(3)]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert len(g.graphs) == 1 and m.calls == 2 + 1 + 3  # warm-up, capture, one replay per call
    assert got[0].data_ptr() != got[1].data_ptr()  # copies: the next replay does not overwrite what was returned
    m(**_inputs(0, b=1), return_dict=False)  # another shape: a second graph
    m(**_inputs(0), scale=0.5, return_dict=False)  # another value of a plain argument: a third
    d = m(**_inputs(0))  # return_dict=True: a dict output, a fourth
    assert len(g.graphs) == 4 and set(d) == {"sample"}


@torch.no_grad()
def test_calls_that_cannot_be_captured_run_eagerly():
    m = Denoiser()
    g = graph_forward(m, capture=fake_capture, device_type="cuda")  # CPU tensors: not capturable here
    x = _inputs(0)
    torch.testing.assert_close(m(**x, return_dict=False)[0], Denoiser.forward(m, **x, return_dict=False)[0])
    assert not g.graphs and g.eager_calls == 1
    g.device_type = "cpu"
    m(**x, scale=Unhashable(1.0), return_dict=False)  # an argument that can't be a key
    assert not g.graphs and g.eager_calls == 2
    g.max_graphs = 0
    with pytest.warns(UserWarning, match="calls with a new signature run without one from now on"):
        m(**x, return_dict=False)
    assert not g.graphs and g.eager_calls == 3
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        m(**x, return_dict=False)
    assert g.eager_calls == 4 and g.eager_calls_past_max == 2


def test_calls_recording_gradients_run_eagerly():
    m = Denoiser()
    g = graph_forward(m, capture=fake_capture, device_type="cpu")
    x = _inputs(0)
    x["hidden_states"].requires_grad_(True)
    m(**x, return_dict=False)[0].sum().backward()
    assert x["hidden_states"].grad is not None and not g.graphs


def test_the_forward_keeps_its_signature():
    """Pipelines look at ``inspect.signature(denoiser.forward)`` to decide what to pass."""
    import inspect

    m = Denoiser()
    want = inspect.signature(m.forward)
    graph_forward(m, capture=fake_capture, device_type="cpu")
    assert inspect.signature(m.forward) == want and "encoder_hidden_states" in inspect.signature(m.forward).parameters


def test_release_restores_the_modules_forward():
    m = Denoiser()
    g = graph_forward(m, capture=fake_capture, device_type="cpu")
    assert graph_forward(m) is g  # installing twice keeps the first
    with torch.no_grad():
        m(**_inputs(0), return_dict=False)
    release_graphs(m)
    assert not isinstance(m.forward, GraphForward) and not g.graphs
    with torch.no_grad():
        m(**_inputs(0), return_dict=False)
    assert not g.graphs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_real_cuda_graphs_equal_eager_gpu():
    torch.manual_seed(0)
    m = Denoiser().cuda()
    with torch.no_grad():
        xs = [{k: v.cuda() for k, v in _inputs(s).items()} for s in range(3)]
        want = [m(**x, return_dict=False)[0] for x in xs]
        g = graph_forward(m)
        got = [m(**x, return_dict=False)[0] for x in xs]
    assert len(g.graphs) == 1
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_real_cuda_graphs_follow_moved_and_replaced_weights_gpu():
    """On real CUDA graphs: after the model goes to the CPU and back (model CPU offload frees and reallocates its
    weights) and after a parameter is replaced, a replay computes with the weights the module holds now, not with
    the memory the capture read (which the allocator may have handed to another tensor)."""
    torch.manual_seed(0)
    m = Denoiser().cuda()
    with torch.no_grad():
        x = {k: v.cuda() for k, v in _inputs(0).items()}

        def eager():
            return type(m).forward(m, **x, return_dict=False)[0]

        g = graph_forward(m)
        for _ in range(3):  # 2 eager warm-up calls, then the capture
            m(**x, return_dict=False)
        torch.testing.assert_close(m(**x, return_dict=False)[0], eager(), rtol=0, atol=0)
        m.to("cpu")
        garbage = [torch.full((8, 8), 1e6, device="cuda") for _ in range(64)]  # reuse what the weights freed
        m.to("cuda")
        m.lin.weight.mul_(2)  # new values wherever the weight lives now
        torch.testing.assert_close(m(**x, return_dict=False)[0], eager(), rtol=0, atol=0)
        m.lin.bias = nn.Parameter(torch.full((8,), 3.0, device="cuda"))  # replaced
        torch.testing.assert_close(m(**x, return_dict=False)[0], eager(), rtol=0, atol=0)
    del garbage
    assert g.dropped >= 1 and len(g.graphs) == 1


@torch.no_grad()
def test_a_quantized_layer_changed_drops_the_graphs():
    """A LoRA-style branch change (``set_branch``) or an activation-format switch after a capture: the next call
    captures again and gives the new output, not the stale graph's."""
    import fourbit
    from fourbit.nn import activation_format, quantized_layers

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16))
    x = torch.randn(4, 16)
    fourbit.quantize(m, fourbit.RTNConfig(weights="int8", activations="int8"), lambda mod: mod(x), progress=False,
                     verbose=False)

    def capture(fn, pool):
        out = fn()
        return (lambda: out.copy_(fn())), out

    g = graph_forward(m, capture=capture, device_type="cpu")
    m(x)
    assert len(g.graphs) == 1
    layer = next(layer for _, layer in quantized_layers(m))
    layer.set_branch(torch.randn(2, layer.padded_in) * 0.1, torch.randn(layer.out_features, 2) * 0.1)
    got = m(x)
    torch.testing.assert_close(got, type(m).forward(m, x), rtol=0, atol=0)
    assert g.dropped == 1 and len(g.graphs) == 1
    with activation_format(m, None):  # 16-bit activations for a while (PTQD's step-aware switch)
        torch.testing.assert_close(m(x), type(m).forward(m, x), rtol=0, atol=0)
    assert g.dropped == 2
    torch.testing.assert_close(m(x), got, rtol=0, atol=0)  # back: captured again, the same as before the switch
    assert g.dropped == 3
    m(x)
    assert g.dropped == 3  # no change, no new capture


@torch.no_grad()
def test_a_failed_capture_warns_and_runs_that_signature_eagerly():
    def failing(fn, pool):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    m = Denoiser()
    g = graph_forward(m, capture=failing, device_type="cpu")
    x = _inputs(0)
    with pytest.warns(UserWarning, match=r"could not capture a call of Denoiser \(operation not permitted when "
                                         r"stream is capturing\); calls like it run without a CUDA graph"):
        y = m(**x, return_dict=False)[0]
    torch.testing.assert_close(y, Denoiser.forward(m, **x, return_dict=False)[0], rtol=0, atol=0)
    m(**x, return_dict=False)  # no second attempt, no second warning
    assert g.eager_calls == 2 and len(g.graphs) == 1


class Opaque:
    def __init__(self, t):
        self.t = t


class OpaqueOut(nn.Module):
    def forward(self, x):
        return Opaque(x * 2)


@torch.no_grad()
def test_an_output_that_cannot_be_copied_out_is_not_replayed():
    """An output container pytree can't see into would hand out the graph's own buffers: eager, with a warning."""
    m = OpaqueOut()
    g = graph_forward(m, capture=lambda fn, pool: (fn, fn()), device_type="cpu")
    x = torch.ones(3)
    with pytest.warns(UserWarning, match="its output holds a Opaque, which can't be copied out of the graph"):
        a = m(x)
    b = m(x + 1)
    assert g.eager_calls == 2 and torch.equal(a.t, x * 2) and torch.equal(b.t, (x + 1) * 2)


def _address_capture(module, captures):
    """A CUDA graph's other property, on the CPU: it reads the tensors at the addresses they had at capture. The
    fake keeps the capture-time tensors (a moved or replaced parameter is not seen) and counts captures."""
    def tensors():
        return dict(list(module.named_parameters()) + list(module.named_buffers()))

    def capture(fn, pool):
        captures.append(1)
        frozen = {name: (t, t.data) for name, t in tensors().items()}  # the objects and the storage they had
        out = fn()

        def replay():
            now = tensors()
            if set(now) != set(frozen):  # the captured kernels would read tensors the module no longer has
                raise AssertionError("replayed a graph of a module whose tensors changed")
            saved = {name: (t, t.data) for name, t in now.items()}
            for name, (t, data) in frozen.items():  # what the replay reads: the capture-time storage
                _set(module, name, t)
                t.data = data
            try:
                res = fn()
            finally:
                for name, (t, data) in saved.items():
                    _set(module, name, t)
                    t.data = data
            (out[0] if isinstance(out, tuple) else out["sample"]).copy_(
                res[0] if isinstance(res, tuple) else res["sample"])
        return replay, out
    return capture


def _set(module, name, t):
    *path, leaf = name.split(".")
    owner = module.get_submodule(".".join(path)) if path else module
    (owner._parameters if leaf in owner._parameters else owner._buffers)[leaf] = t


@torch.no_grad()
def test_tensors_moved_or_replaced_drop_the_graphs():
    """A graph reads parameters by address: after ``.data`` is reassigned (what ``.to()`` away and back does under
    model CPU offload), a parameter replaced, or a submodule swapped (a LoRA library wrapping a layer), the next call
    captures again and computes with the new tensors; an in-place change of values needs no new capture."""
    torch.manual_seed(0)
    m = Denoiser()
    captures = []
    g = graph_forward(m, warmup=1, capture=_address_capture(m, captures), device_type="cpu")
    x, t = torch.randn(2, 4, 8), torch.rand(2)

    def eager():
        return type(m).forward(m, x, t, return_dict=False)[0]

    m(x, t, return_dict=False)
    assert len(captures) == 1
    torch.testing.assert_close(m(x, t, return_dict=False)[0], eager(), rtol=0, atol=0)
    m.lin.weight.data = m.lin.weight.data * 2  # new storage, same Parameter object
    torch.testing.assert_close(m(x, t, return_dict=False)[0], eager(), rtol=0, atol=0)
    assert len(captures) == 2 and g.dropped == 1
    m.lin.bias = nn.Parameter(torch.ones(8))  # replaced
    torch.testing.assert_close(m(x, t, return_dict=False)[0], eager(), rtol=0, atol=0)
    assert len(captures) == 3 and g.dropped == 2
    m.lin = nn.Linear(8, 8)  # a submodule swapped
    torch.testing.assert_close(m(x, t, return_dict=False)[0], eager(), rtol=0, atol=0)
    assert len(captures) == 4 and g.dropped == 3
    m.lin.weight.mul_(3)  # in place: the graph reads the new values, no new capture
    torch.testing.assert_close(m(x, t, return_dict=False)[0], eager(), rtol=0, atol=0)
    nn.Linear(3, 3)  # a module built elsewhere: the holders are listed again, nothing here moved
    m(x, t, return_dict=False)
    assert len(captures) == 4 and g.dropped == 3
