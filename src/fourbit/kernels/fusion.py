"""Graph rewrites that move the code around quantized layers into their kernels, under ``torch.compile``.

Compile blocks with ``options=fourbit.nn.inductor_options()`` (``prepare_kernels(model)`` first). Inductor then
runs ``FuseAroundQuantLinear`` on each graph dynamo captures, before its own lowering. On the graph's
``fourbit::quant_linear`` nodes (``compiled.py``) it makes these rewrites, for any model (no per-architecture code):

1. **Output activation into the GEMM epilogue**: ``gelu(y)``, ``gelu(y, approximate="tanh")`` or ``silu(y)`` where
   y is the layer's output, or a column slice of it that no other consumer reads (a sibling group's MLP columns),
   becomes the op's ``act`` on those columns. Saves a read and a write of those columns (and the activation is
   applied in fp32 before the output's one rounding). Not on a layer of the "triton-cublas" kernel: its GEMM is
   cuBLAS's, which has no such epilogue (``precision_plan`` timed it with the activation apart).
2. **Concatenated input read in place**: a layer whose input is ``cat([a, b], dim=-1)`` (used by nothing else)
   takes a and b as two column blocks (``x2``, ``x_tail``): ``act_quant`` reads both (``act_quant.py``) and the
   concatenation is never written. FLUX's single blocks concatenate the attention output and the MLP activation
   before ``proj_out``.

Each rewrite checks that it is safe (the values it removes have no other readers; a strided column slice only
flows into consumers that accept any strides) and otherwise leaves the graph alone.

3. **Inline activation quantization** (opt-in, ``inductor_options(act_quant="inline")``): after 1 and 2, each
   quant_linear node that ``compiled.inlinable`` accepts (speed mode, FP8-operand formats, more rows than the GEMV)
   calls ``compiled.quant_linear_inline`` instead: the quantization as torch ops, which inductor generates inside
   the kernel producing X, then ``fourbit::scaled_gemm`` (with the epilogue activation of rewrite 1).

4. **Row maxima handed over** (opt-in, ``act_quant="given"``): a quant_linear node whose input X is, through row
   reshapes, eval-mode dropouts and a column slice, the output of another quant_linear node P on the Triton GEMM (FLUX.1's MLP output
   projection after the GELU-fused input projection; in the single blocks the MLP columns of the Q/K/V/MLP group,
   with the attention output as X's first column block) gets ``x_amax``: P becomes ``quant_linear_amax``, whose
   epilogue also returns each row's max |X * (1 / smooth)| over those columns (``row_amax.py``; the other column
   block's maxima are torch ops here), and the layer's ``act_quant`` reads X once (path "given") instead of twice at
   large K (row pass, then the down-projection). Codes and scales are unchanged (the same maxima). Measured on
   FLUX.1-dev (H100, 2026-12-05, docs/kernels.md): the activation quantization and the cuBLAS down-projections
   ~1 ms less per step, the producing GEMMs' epilogue ~1 ms more, the step no faster, so not the default.

``fusion_stats()`` counts what was rewritten.
"""
from __future__ import annotations

import operator
import os
from collections import Counter
from typing import Optional

import torch
import torch.fx as fx

from ..utils.activation_calls import activation_kind, last_dim_slice

try:  # the interface inductor's caches read (uuid); torch >= 2.6
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
except ImportError:  # pragma: no cover - older torch: a plain callable (no FX-graph cache for it)
    CustomGraphPass, get_hash_for_files = object, None

_STATS: Counter = Counter()

# quant_linear's positional arguments (``compiled.quant_linear``)
_X, _SMOOTH_RECIP, _KEY, _TAIL, _ACT, _ACT_LO, _ACT_HI, _X_AMAX = 0, 2, 7, 8, 9, 10, 11, 12
_N_ARGS = 13


def fusion_stats() -> dict:
    """How many activations and concatenations this process's compiles fused (for logs and tests). A compile that
    inductor serves from its caches runs no pass, so it adds nothing here (the cached code has the fusions)."""
    return dict(_STATS)


def _is_quant_linear(n: fx.Node) -> bool:
    if n.op != "call_function":
        return False
    ops = getattr(torch.ops, "fourbit", None)
    op = getattr(ops, "quant_linear", None) if ops is not None else None
    return op is not None and n.target in (op, op.default) and len(n.args) == _N_ARGS and not n.kwargs


def _val(n) -> Optional[torch.Tensor]:
    v = n.meta.get("example_value") if isinstance(n, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _activation_kind(n: fx.Node) -> Optional[str]:
    """The output-activation kind of an activation call on its first argument, or None."""
    if n.op != "call_function" or not n.args:
        return None
    return activation_kind(n.target, n.args, n.kwargs)


_RESHAPES = {"reshape", "view", "flatten", "unflatten"}


def _row_reshape_of(n: fx.Node) -> Optional[fx.Node]:
    """If n only reshapes the rows of its source (the last dimension kept), that source."""
    src = None
    if n.op == "call_method" and n.target in _RESHAPES:
        src = n.args[0]
    elif n.op == "call_function" and n.target in (torch.reshape, torch.flatten):
        src = n.args[0]
    if not isinstance(src, fx.Node):
        return None
    a, b = _val(src), _val(n)
    if a is None or b is None or a.dim() < 1 or b.dim() < 1 or a.shape[-1] != b.shape[-1]:
        return None
    return src


def _column_range(n: fx.Node, width: int) -> Optional[tuple[int, int]]:
    """The columns [lo, hi) that ``n`` = ``src[..., lo:hi]`` takes from its source's last dimension."""
    if n.op != "call_function" or n.target is not operator.getitem or len(n.args) != 2:
        return None
    src, idx = n.args
    v = _val(src)
    if v is None:
        return None
    sl = last_dim_slice(idx, v.dim())
    if sl is None:
        return None
    lo, hi, _ = sl.indices(width)
    return lo, max(lo, hi)


def _readers(op: fx.Node) -> Optional[list[tuple[fx.Node, int, int, bool]]]:
    """Every consumer of the op's output (through row reshapes) as (node, lo, hi, sliced): the columns [lo, hi)
    it reads, and whether it is a column slice ``[..., lo:hi]``; None without shape information."""
    n_out = _val(op)
    if n_out is None:
        return None
    width = n_out.shape[-1]
    out = []
    frontier = [op]
    while frontier:
        src = frontier.pop()
        for u in src.users:
            if _row_reshape_of(u) is src:
                frontier.append(u)
                continue
            rng = _column_range(u, width)
            out.append((u, 0, width, False) if rng is None else (u, *rng, True))
    return out


_STRIDE_SAFE_METHODS = {"reshape", "contiguous", "flatten"}


def _accepts_strided(n: fx.Node) -> bool:
    """Whether consumer n reads a strided column slice as it would the contiguous tensor it got before."""
    if n.op == "call_function":
        return n.target in (torch.cat, torch.reshape, torch.flatten) or _is_quant_linear(n)
    return n.op == "call_method" and n.target in _STRIDE_SAFE_METHODS


def _activation_reader(reader: fx.Node, sliced: bool) -> Optional[tuple[fx.Node, fx.Node]]:
    """(activation node, its input) if this reader of an op's output is an activation of it, or a column slice
    read only by an activation."""
    if not sliced and _activation_kind(reader):
        return reader, reader.args[0]
    if sliced and len(reader.users) == 1:
        act = next(iter(reader.users))
        if _activation_kind(act) and act.args[0] is reader:
            return act, reader
    return None


def fuse_activations(graph: fx.Graph) -> int:
    """Rewrite 1 (module docstring). Returns how many activations moved into epilogues."""
    done = 0
    for op in [n for n in graph.nodes if _is_quant_linear(n)]:
        readers = _readers(op)
        if op.args[_ACT] or readers is None or str(op.args[_KEY]).endswith("|cublas"):
            continue  # a "triton-cublas" layer: cuBLAS has no such epilogue, its plan timed the activation apart
        width = _val(op).shape[-1]
        for reader, lo, hi, sliced in readers:
            found = _activation_reader(reader, sliced)
            if found is None or hi <= lo:
                continue
            act, src = found
            if any(r is not reader and lo2 < hi and lo < hi2 for r, lo2, hi2, _ in readers):
                continue  # another consumer reads these columns without the activation
            v_act, v_src = _val(act), _val(src)
            if v_act is None or v_src is None or v_act.dtype != v_src.dtype:
                continue
            strided = sliced and (lo, hi) != (0, width)
            if strided and not all(_accepts_strided(u) for u in act.users):
                continue
            args = list(op.args)
            args[_ACT], args[_ACT_LO], args[_ACT_HI] = _activation_kind(act), lo, hi
            op.args = tuple(args)
            act.replace_all_uses_with(src)
            graph.erase_node(act)
            done += 1
            break  # one activation range per op
    _STATS["activations"] += done
    return done


def _cat_parts(n: fx.Node) -> Optional[list[fx.Node]]:
    """The inputs of ``torch.cat([...], dim=-1)`` (last dimension), else None."""
    if n.op != "call_function" or n.target is not torch.cat or not n.args:
        return None
    parts = n.args[0]
    dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0)
    v = _val(n)
    if not isinstance(parts, (list, tuple)) or v is None or not isinstance(dim, int):
        return None
    if dim not in (-1, v.dim() - 1) or not all(isinstance(p, fx.Node) and _val(p) is not None for p in parts):
        return None
    return list(parts)


def fuse_concatenations(graph: fx.Graph) -> int:
    """Rewrite 2 (module docstring). Returns how many concatenations are no longer written."""
    done = 0
    for op in [n for n in graph.nodes if _is_quant_linear(n)]:
        x2 = op.args[_X]
        if op.args[_TAIL] is not None or not isinstance(x2, fx.Node) or len(x2.users) != 1:
            continue
        cat = x2 if _cat_parts(x2) is not None else _row_reshape_of(x2)  # cat(...) or cat(...).reshape(M, K)
        if cat is None or len(cat.users) != 1:
            continue
        parts = _cat_parts(cat)
        if parts is None or len(parts) != 2:
            continue
        vals = [_val(p) for p in parts]
        if any(v.dtype != vals[0].dtype or v.shape[:-1] != vals[0].shape[:-1] for v in vals):
            continue
        blocks = []
        with graph.inserting_before(op):
            for p, v in zip(parts, vals):
                b = graph.call_method("reshape", (p, -1, v.shape[-1]))  # (..., K_i) -> (M, K_i)
                try:
                    b.meta["example_value"] = v.reshape(-1, v.shape[-1])
                except Exception:  # noqa: BLE001 - the meta is a convenience for later passes
                    pass
                blocks.append(b)
        args = list(op.args)
        args[_X], args[_TAIL] = blocks
        op.args = tuple(args)
        if x2 is not cat:
            graph.erase_node(x2)
        graph.erase_node(cat)
        done += 1
    _STATS["concatenations"] += done
    return done


def lower_inline(graph: fx.Graph) -> int:
    """Rewrite 3 (module docstring). Returns how many layers now quantize their input in torch ops."""
    from .compiled import inlinable, quant_linear_inline

    done = 0
    for op in [n for n in graph.nodes if _is_quant_linear(n)]:
        x2, key = _val(op.args[_X]), op.args[_KEY]
        if x2 is None or not isinstance(key, str) or not inlinable(key, x2.shape[0]):
            continue
        op.target = quant_linear_inline  # same arguments; AOTAutograd traces it into aten ops + scaled_gemm
        done += 1
    _STATS["inline"] += done
    return done


_DROPOUTS = (torch.nn.functional.dropout, torch.dropout)


def _identity_dropout_of(n: fx.Node) -> Optional[fx.Node]:
    """If n is a dropout that returns its input unchanged (``training=False``, or p = 0: a model in eval mode, e.g.
    diffusers' FeedForward between its GELU and its output projection), that input."""
    if n.op != "call_function" or n.target not in _DROPOUTS or not n.args or not isinstance(n.args[0], fx.Node):
        return None
    names = ("input", "p", "training", "inplace") if n.target is torch.nn.functional.dropout else ("input", "p", "train")
    bound = dict(zip(names, n.args), **n.kwargs)
    training = bound.get("training", bound.get("train", True))
    if bound.get("inplace", False) or not (training is False or bound.get("p", 0.5) == 0):
        return None
    return n.args[0]


def _producer_columns(n: fx.Node) -> Optional[tuple[fx.Node, int, int]]:
    """(quant_linear node P, lo, hi) if n is P's output columns [lo, hi) through row reshapes, identity dropouts and
    at most one column slice (nothing that changes values), else None."""
    lo = hi = None
    while True:
        if _is_quant_linear(n):
            v = _val(n)
            if v is None:
                return None
            return (n, 0, v.shape[-1]) if lo is None else (n, lo, hi)
        src = _row_reshape_of(n) or _identity_dropout_of(n)
        if src is not None:
            n = src
            continue
        v_src = _val(n.args[0]) if n.op == "call_function" and n.args else None
        rng = None if lo is not None or v_src is None else _column_range(n, v_src.shape[-1])
        if rng is None:
            return None
        (lo, hi), n = rng, n.args[0]


def _row_maxima_consumer(op: fx.Node) -> bool:
    """Whether a quant_linear node can take its input's row maxima from the producer: a row-scaled activation
    format on the 'scaled' plan (``act_quant``'s path "given"), smoothing present, more rows than the GEMV takes."""
    from .act_spec import act_spec
    from .compiled import _SPECS
    from .linear import few_rows

    key, x = op.args[_KEY], _val(op.args[_X])
    spec_entry = _SPECS.get(key.rsplit("|", 1)[0]) if isinstance(key, str) else None
    if spec_entry is None or x is None or op.args[_X_AMAX] is not None or op.args[_SMOOTH_RECIP] is None:
        return False
    spec = act_spec(spec_entry[0])
    rows = x.shape[0]
    return (spec_entry[4] == "scaled" and spec is not None and spec.row_pass and spec.outer == 0
            and not (isinstance(rows, int) and few_rows(rows)))


def _epilogue_producer(p: fx.Node, rows) -> bool:
    """Whether quant_linear node p emits row maxima in its GEMM epilogue: the Triton GEMM ("|cublas" has none, the
    GEMV takes few rows) with the consumer's rows."""
    from .linear import few_rows

    key = p.args[_KEY]
    v = _val(p)
    return (isinstance(key, str) and not key.endswith("|cublas") and v is not None and v.shape[0] == rows
            and not (isinstance(rows, int) and few_rows(rows)))


def _set_val(n: fx.Node, v) -> fx.Node:
    if v is not None:
        n.meta["example_value"] = v
    return n


def _ask_producer(graph: fx.Graph, p: fx.Node, mult: fx.Node, lo: int, hi: int) -> fx.Node:
    """Replace producer p by ``quant_linear_amax`` (same arguments + the request); returns its row-maxima node."""
    from .compiled import quant_linear_amax  # noqa: F401 - registers the op

    op = torch.ops.fourbit.quant_linear_amax.default
    v = _val(p)
    with graph.inserting_after(p):
        both = graph.call_function(op, tuple(p.args) + (mult, lo, hi))
    with graph.inserting_after(both):
        y = _set_val(graph.call_function(operator.getitem, (both, 0)), v)
    with graph.inserting_after(y):
        amax = _set_val(graph.call_function(operator.getitem, (both, 1)),
                        None if v is None else v.new_empty((v.shape[0],), dtype=torch.float32))
    p.replace_all_uses_with(y)
    graph.erase_node(p)
    return amax


def _reduce_here(graph: fx.Graph, part: fx.Node, mult: fx.Node) -> fx.Node:
    """max |part * mult| over the last dimension as torch ops (inductor fuses it where it can)."""
    xf = graph.call_method("float", (part,))
    return graph.call_method("amax", (graph.call_method("abs", (graph.call_function(operator.mul, (xf, mult)),)), -1))


def hand_over_row_maxima(graph: fx.Graph) -> int:
    """Rewrite 4 (module docstring). Returns how many layers now take their input's row maxima from its producer."""
    done = 0
    order = {n: i for i, n in enumerate(graph.nodes)}
    asked: set = set()
    for op in [n for n in graph.nodes if _is_quant_linear(n)]:
        if not _row_maxima_consumer(op):
            continue
        recip = op.args[_SMOOTH_RECIP]
        parts = [op.args[_X]] + ([] if op.args[_TAIL] is None else [op.args[_TAIL]])
        vals = [_val(p) for p in parts]
        if any(v is None or v.dim() != 2 for v in vals):
            continue
        found = [_producer_columns(p) for p in parts]
        rows = vals[0].shape[0]
        found = [f if f is not None and f[0] not in asked and _epilogue_producer(f[0], rows)
                 and f[2] - f[1] == v.shape[1] and order.get(recip, len(order)) < order[f[0]] else None
                 for f, v in zip(found, vals)]
        if not any(found):
            continue  # no fourbit GEMM makes this input: the layer's own pass finds the maxima as before
        maxima, c0 = [], 0
        for part, v, f in zip(parts, vals, found):
            width = v.shape[1]
            if f is not None:
                p, lo, hi = f
                with graph.inserting_before(p):
                    mult = graph.call_function(operator.getitem, (recip, slice(c0, c0 + width)))
                maxima.append(_ask_producer(graph, p, mult, lo, hi))
                asked.add(p)
            else:
                with graph.inserting_before(op):
                    mult = graph.call_function(operator.getitem, (recip, slice(c0, c0 + width)))
                    maxima.append(_reduce_here(graph, part, mult))
            c0 += width
        with graph.inserting_before(op):
            x_amax = maxima[0]
            for m in maxima[1:]:
                x_amax = graph.call_function(torch.maximum, (x_amax, m))
        args = list(op.args)
        args[_X_AMAX] = x_amax
        op.args = tuple(args)
        order = {n: i for i, n in enumerate(graph.nodes)}
        done += 1
    _STATS["row_maxima"] += done
    return done


#: ``inductor_options(act_quant=...)``: "pass" (``act_quant``'s kernels inside the op: each layer finds its input's
#: row maxima), "given" (the same with rewrite 4: the row maxima handed over by the producing GEMM) or "inline"
#: (rewrite 3)
ACT_QUANT_LOWERINGS = ("pass", "given", "inline")


class FuseAroundQuantLinear(CustomGraphPass):
    """The inductor pre-grad pass: ``fuse_activations``, ``fuse_concatenations``, and with ``act_quant="inline"``
    ``lower_inline``, with ``act_quant="given"`` ``hand_over_row_maxima``."""

    def __init__(self, act_quant: str = "pass"):
        if act_quant not in ACT_QUANT_LOWERINGS:
            raise ValueError(f"act_quant must be one of {ACT_QUANT_LOWERINGS}, got {act_quant!r}")
        self.act_quant = act_quant

    def __call__(self, graph: fx.Graph) -> None:
        fuse_activations(graph)
        fuse_concatenations(graph)
        if self.act_quant == "inline":
            lower_inline(graph)
        if self.act_quant == "given":
            hand_over_row_maxima(graph)
        graph.lint()

    def uuid(self):
        if get_hash_for_files is None:
            return None
        here = os.path.dirname(os.path.abspath(__file__))
        files = (__file__,) + tuple(os.path.join(here, f) for f in ("compiled.py", "act_inline.py", "act_given.py",
                                                                    "row_amax.py"))
        return (get_hash_for_files(files), self.act_quant)


def inductor_options(act_quant: str = "pass") -> dict:
    """``torch.compile(..., options=fourbit.nn.inductor_options())``: inductor settings that install the pass.
    ``act_quant``: "pass" (default), "given" (rewrite 4) or "inline" (rewrite 3: each eligible layer's input
    quantized in torch ops)."""
    return {"pre_grad_custom_pass": FuseAroundQuantLinear(act_quant)}
