"""Sibling linears (same input tensor) fused into one layer: discovery, exactness, quantization, checkpoints."""
import copy

import pytest
import torch
from torch import nn

import fourbit
from fourbit.nn import quantized_layers
from fourbit.siblings import SiblingOutput, find_siblings, fuse_siblings


class Attn(nn.Module):
    def __init__(self, d=64):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.to_q, self.to_k, self.to_v = nn.Linear(d, d), nn.Linear(d, d, bias=False), nn.Linear(d, 2 * d)
        self.out = nn.Linear(2 * d, d)

    def forward(self, x):
        h = self.norm(x)
        q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)  # three readers of the same tensor
        a = torch.softmax(q @ k.transpose(-1, -2) / 8, -1) @ v
        return x + self.out(a)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([Attn(), Attn()])
        self.head = nn.Linear(64, 64)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def _loop(model):
    torch.manual_seed(1)
    for _ in range(2):
        model(torch.randn(2, 16, 64))


def test_find_siblings_groups_only_shared_inputs():
    groups = find_siblings(Net(), _loop)
    assert groups == [[f"blocks.{i}.to_q", f"blocks.{i}.to_k", f"blocks.{i}.to_v"] for i in range(2)]
    # with a config: excluded layers are never grouped
    cfg = fourbit.RTNConfig(exclude=["*.to_k"])
    assert find_siblings(Net(), _loop, config=cfg) == [["blocks.0.to_q", "blocks.0.to_v"],
                                                        ["blocks.1.to_q", "blocks.1.to_v"]]


def test_fused_model_matches_and_each_input_is_multiplied_once():
    ref = Net()
    fused = fuse_siblings(copy.deepcopy(ref), find_siblings(ref, _loop))
    assert isinstance(fused.blocks[0].to_v, SiblingOutput) and fused.blocks[0].to_v.out_features == 128
    calls = []
    fused.blocks[0].to_q.group.linear.register_forward_hook(lambda m, a, o: calls.append(o.shape))
    x = torch.randn(3, 16, 64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)
    assert calls == [torch.Size([3, 16, 256])]  # one GEMM for q, k and v
    # the group's weights are stored once, under the first sibling
    keys = [k for k in fused.state_dict() if k.startswith("blocks.0.")]
    assert "blocks.0.to_q.group.linear.weight" in keys and not any("to_k" in k or "to_v" in k for k in keys)
    assert fused.blocks[0].to_q.sibling_group._out is None  # released once every sibling took its share


def test_sibling_outputs_are_views_unless_asked_for_copies():
    x = torch.randn(2, 5, 64)
    for contiguous in (False, True):
        net = fuse_siblings(Net(), [["blocks.0.to_q", "blocks.0.to_k", "blocks.0.to_v"]], contiguous=contiguous)
        with torch.no_grad():
            q, k, v = (getattr(net.blocks[0], n)(x) for n in ("to_q", "to_k", "to_v"))
        assert q.shape == (2, 5, 64) and v.shape == (2, 5, 128)
        shared = q.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
        assert shared != contiguous and q.is_contiguous() == contiguous
        assert v.unflatten(-1, (2, 64)).shape == (2, 5, 2, 64)  # what attention code does with them
        ref = Net().blocks[0]
        torch.testing.assert_close(v, ref.to_v(x))


def test_other_inputs_recompute():
    net = fuse_siblings(Net(), [["blocks.0.to_q", "blocks.0.to_k"]])
    a, b = torch.randn(2, 64), torch.randn(2, 64)
    q_a = net.blocks[0].to_q(a)
    k_b = net.blocks[0].to_k(b)  # a different tensor: computed afresh, not served from a's cache
    ref = Net()
    torch.testing.assert_close(q_a, ref.blocks[0].to_q(a))
    torch.testing.assert_close(k_b, ref.blocks[0].to_k(b))
    a.add_(1.0)  # in-place change: the version counter invalidates the cache
    torch.testing.assert_close(net.blocks[0].to_q(a), ref.blocks[0].to_q(a))


def test_bad_groups_are_refused():
    with pytest.raises(ValueError, match="not in the model"):
        fuse_siblings(Net(), [["blocks.0.to_q", "blocks.0.nope"]])
    with pytest.raises(ValueError, match="same in_features"):
        fuse_siblings(Net(), [["blocks.0.to_q", "blocks.0.out"]])
    with pytest.raises(ValueError, match="two sibling groups"):
        fuse_siblings(Net(), [["blocks.0.to_q", "blocks.0.to_k"], ["blocks.0.to_k", "blocks.0.to_v"]])


@pytest.mark.parametrize("cfg", [fourbit.RTNConfig(), fourbit.SVDQuantConfig(rank=8)])
def test_quantize_save_load_with_siblings(cfg, tmp_path):
    ref = Net()
    net = fuse_siblings(copy.deepcopy(ref), find_siblings(ref, _loop, config=cfg))
    fourbit.quantize(net, cfg, forward_loop=_loop, progress=False, verbose=False)
    names = [n for n, _ in quantized_layers(net)]
    assert "blocks.0.to_q.group.linear" in names and "blocks.0.to_k" not in names
    x = torch.randn(2, 16, 64)
    with torch.no_grad():
        y = net(x)
        rel = float((y - ref(x)).norm() / ref(x).norm())
    assert rel < 0.2  # 4-bit, but the same model
    path = fourbit.save(net, tmp_path / "q.safetensors")
    assert fourbit.read_header(path)["siblings"] == net.fourbit_siblings
    with torch.device("meta"):
        fresh = Net()
    loaded = fourbit.load(fresh, path)  # fuses the fresh model first
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), y)


def test_rtn_fused_equals_rtn_unfused():
    """RTN quantizes weights per output row and activations per token: fusing changes nothing but the GEMM."""
    ref, cfg = Net(), fourbit.RTNConfig()
    a = fourbit.quantize(copy.deepcopy(ref), cfg, progress=False, verbose=False)
    b = fourbit.quantize(fuse_siblings(copy.deepcopy(ref), find_siblings(ref, _loop)), cfg, progress=False,
                         verbose=False)
    x = torch.randn(2, 16, 64)
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), rtol=1e-5, atol=1e-5)


def test_diffusers_flux_block_siblings():
    pytest.importorskip("diffusers")
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    m = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                               attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                               pooled_projection_dim=16, axes_dims_rope=(4, 6, 6)).eval()
    img, txt = torch.randn(1, 16, 8), torch.randn(1, 4, 32)
    ids_img, ids_txt = torch.zeros(16, 3), torch.zeros(4, 3)
    kw = dict(hidden_states=img, encoder_hidden_states=txt, pooled_projections=torch.randn(1, 16),
              timestep=torch.tensor([0.5]), img_ids=ids_img, txt_ids=ids_txt, return_dict=False)
    with torch.no_grad():
        ref = m(**kw)[0]
    groups = find_siblings(m, lambda model: model(**kw))
    flat = {n.rsplit(".", 1)[-1] for g in groups for n in g}
    assert {"to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"} <= flat
    fuse_siblings(m, groups)
    with torch.no_grad():
        torch.testing.assert_close(m(**kw)[0], ref, rtol=1e-4, atol=1e-4)


def test_fused_model_compiles_without_graph_breaks():
    """dynamo traces the group's sharing: one graph, one GEMM per group, the eager result."""
    import torch._dynamo

    net = Net()
    fused = fuse_siblings(copy.deepcopy(net), find_siblings(net, _loop))
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        eager = fused(x)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(fused)(x)
        assert explained.graph_break_count == 0 and explained.graph_count == 1
        linears = [n for n in explained.graphs[0].graph.nodes
                   if n.op == "call_function" and "linear" in str(n.target)]
        assert len(linears) == 2 * 2 + 1  # per block: the q/k/v group and `out`; then the head
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(fused, backend="aot_eager")(x), eager, rtol=0, atol=0)
        assert fused.blocks[0].to_q.sibling_group._out is None
    torch._dynamo.reset()


class CrossBlock(nn.Module):
    """Reads the block's input and a context shared by every block (a cross-attention's K and V)."""

    def __init__(self, d=32):
        super().__init__()
        self.to_q, self.to_k, self.to_v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x, ctx):
        q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)
        return x + torch.softmax(q @ k.transpose(-1, -2), -1) @ v


class CrossNet(nn.Module):
    def __init__(self, n=3):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([CrossBlock() for _ in range(n)])

    def forward(self, x, ctx):
        for b in self.blocks:
            x = b(x, ctx)
        return x


def _cross_loop(model):
    torch.manual_seed(1)
    model(torch.randn(2, 8, 32), torch.randn(2, 5, 32))


def test_groups_stay_inside_a_block_unless_asked():
    """Every block's K and V read the same context: by default one group per block, with across_blocks one."""
    net = CrossNet()
    assert find_siblings(net, _cross_loop) == [[f"blocks.{i}.to_k", f"blocks.{i}.to_v"] for i in range(3)]
    assert find_siblings(net, _cross_loop, across_blocks=True) == [
        [f"blocks.{i}.{n}" for i in range(3) for n in ("to_k", "to_v")]]


@pytest.mark.parametrize("across_blocks", [False, True], ids=["per-block", "across-blocks"])
def test_compiled_blocks_share_their_graphs(across_blocks):
    """Each block compiled on its own (as models are): groups inside a block give every block the same code, one
    graph for all; a group across blocks is served outside the graphs (a graph break at each member: K and V), and
    every block shares the pieces between them - traced, its sibling index would specialise each block's graph."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    net = CrossNet()
    fuse_siblings(net, find_siblings(net, _cross_loop, across_blocks=across_blocks))
    x, ctx = torch.randn(2, 8, 32), torch.randn(2, 5, 32)
    with torch.no_grad():
        eager = net(x, ctx)
        torch._dynamo.reset()
        counters.clear()
        for b in net.blocks:
            b.compile(backend="eager")
        got = net(x, ctx)
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    torch._dynamo.reset()
    torch.testing.assert_close(got, eager, rtol=0, atol=0)
    assert (graphs, breaks) == ((2, 2 * 3) if across_blocks else (1, 0))
