"""Quantized Linear and Conv2d modules.

The modules hold packed 4/8-bit codes and scales as buffers and run through a *kernel* chosen by name
(``layer.kernel``): "reference" is the plain-torch emulation in ``fourbit.kernels.reference``; GPU kernels
register themselves in ``fourbit.kernels`` under other names and must match the reference.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..formats import Format, QuantizedTensor, format_from_spec
from ..kernels import get_linear_kernel
from .state import QuantizedLinearState


_GENERATION = [0]  # bumped by every attribute set on a quantized layer (see ``state_generation``)


def state_generation() -> int:
    """A counter that changes whenever an attribute of any quantized layer is set (a LoRA's ``set_branch``, a kernel
    or activation-format switch, ``.to()``): what was captured before (a CUDA graph) may be stale. In-place
    changes of a buffer's values are not seen."""
    return _GENERATION[0]


class QuantLinear(nn.Module):
    """A quantized ``nn.Linear``: y = x W^T + b with W stored in ``weight_format``.

    Buffers (N = out_features, Kp = padded in_features, r = rank):
        weight_packed (N, Kp * bits / 8) uint8, weight_scales (N, Kp / g), weight_row_scale (N|1, 1) fp32 [opt],
        smooth (Kp,) fp32 [opt], lr_down (r, Kp), lr_up (N, r) [opt], bias (N,) [opt].
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        weight_format: Format,
        act_format: Optional[Format],
        weight_packed: Tensor,
        weight_scales: Tensor,
        weight_row_scale: Optional[Tensor] = None,
        smooth: Optional[Tensor] = None,
        lr_down: Optional[Tensor] = None,
        lr_up: Optional[Tensor] = None,
        bias: Optional[Tensor] = None,
        kernel: str = "reference",
        compute_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.padded_in = _kp_guess(weight_packed, weight_format)
        self.weight_format = weight_format
        self.act_format = act_format
        self.kernel = kernel
        self.compute_dtype = compute_dtype
        for name, value in (
            ("weight_packed", weight_packed),
            ("weight_scales", weight_scales),
            ("weight_row_scale", weight_row_scale),
            ("smooth", smooth),
            ("lr_down", lr_down),
            ("lr_up", lr_up),
            ("bias", bias),
        ):
            self.register_buffer(name, value)
        self._cache: dict = {}

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_state(cls, state: QuantizedLinearState, in_features: int, bias: Optional[Tensor],
                   kernel: str = "reference", dtype: torch.dtype = torch.float32) -> "QuantLinear":
        q = state.weight
        lr = (lambda t: None if t is None else t.to(dtype).contiguous())
        return cls(
            in_features, q.codes.shape[0], state.weight_format, state.act_format,
            weight_packed=state.weight_format.pack(q.codes),
            weight_scales=q.scales.contiguous(),
            weight_row_scale=None if q.row_scale is None else q.row_scale.float().contiguous(),
            smooth=None if state.smooth is None else state.smooth.float().contiguous(),
            lr_down=lr(state.lr_down), lr_up=lr(state.lr_up),
            bias=None if bias is None else bias.detach().to(dtype).clone(),
            kernel=kernel, compute_dtype=dtype,
        )

    def layer_spec(self) -> dict:
        """JSON-able description recorded in checkpoints (enough to rebuild the empty module)."""
        return {
            "kind": "linear",
            "in_features": self.in_features,
            "out_features": self.out_features,
            "padded_in": self.padded_in,
            "weight_format": self.weight_format.spec(),
            "act_format": None if self.act_format is None else self.act_format.spec(),
            "rank": self.rank,
            "kernel": self.kernel,
        }

    @property
    def rank(self) -> int:
        return 0 if self.lr_down is None else int(self.lr_down.shape[0])

    # ---- weights -------------------------------------------------------------------------------
    def __getattr__(self, name: str):
        if name == "weight":  # code written for nn.Linear (diffusers' fuse_qkv_projections, PEFT) reads .weight
            raise AttributeError(
                f"{type(self).__name__} has no 16-bit .weight: its weight is stored in 4/8 bits (weight_packed); "
                f"read it with .dequantized_weight(), and fuse projections or attach adapters before quantizing "
                f"(fourbit.fuse_siblings fuses q/k/v)")
        return super().__getattr__(name)

    def quantized_weight(self) -> QuantizedTensor:
        """The residual weight as codes + scales, (N, Kp)."""
        codes = self.weight_format.unpack(self.weight_packed, self.padded_in)
        return QuantizedTensor(codes, self.weight_scales, self.weight_row_scale)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """(N, Kp) dequantized residual weight, cached per (device, dtype) until buffers change. Under
        ``torch.compile`` it is computed in the graph instead: a cache keyed by each layer's buffer address would make
        dynamo compile the block again for every layer."""
        if torch.compiler.is_compiling():
            return self.weight_format.dequantize(self.quantized_weight(), dtype=dtype)
        key = (self.weight_packed.device, dtype, self.weight_packed.data_ptr())
        w = self._cache.get(key)
        if w is None:
            self._cache.clear()
            w = self.weight_format.dequantize(self.quantized_weight(), dtype=dtype)
            self._cache[key] = w
        return w

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        _GENERATION[0] += 1

    def set_branch(self, lr_down: Optional[Tensor], lr_up: Optional[Tensor]) -> None:
        """Replace the low-rank branch, (r, Kp) and (N, r) (both None: no branch), e.g. grown by a LoRA.

        Drops the kernels' cached per-layer state (it folds the branch and cannot tell a new tensor at a
        reused address from the old one); the dequantized residual weight stays cached."""
        if (lr_down is None) != (lr_up is None):
            raise ValueError("set_branch needs both lr_down and lr_up, or neither")
        if lr_down is not None and (lr_down.shape[1] != self.padded_in or lr_up.shape[0] != self.out_features
                                    or lr_down.shape[0] != lr_up.shape[1]):
            raise ValueError(f"set_branch: lr_down must be (r, {self.padded_in}) and lr_up ({self.out_features}, r), "
                             f"got {tuple(lr_down.shape)} and {tuple(lr_up.shape)}")
        self.lr_down, self.lr_up = lr_down, lr_up
        self._cache = {k: v for k, v in self._cache.items() if isinstance(k, tuple)}  # keep dequantized_weight's

    def _apply(self, fn, *args, **kwargs):  # .to()/.cuda() invalidate the cache
        self._cache = {}
        return super()._apply(fn, *args, **kwargs)

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])  # (M, K)
        y = get_linear_kernel(self.kernel)(self, x2)  # (M, N)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        a = "16-bit" if self.act_format is None else repr(self.act_format)
        return (f"in={self.in_features}, out={self.out_features}, W={self.weight_format!r}, A={a}, "
                f"rank={self.rank}, smooth={self.smooth is not None}, kernel={self.kernel!r}")


class QuantConv2d(QuantLinear):
    """A quantized ``nn.Conv2d`` (groups=1): im2col, then the QuantLinear math along Cin*kh*kw."""

    def __init__(self, *args, kernel_size=(1, 1), stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                 padding_mode="zeros", **kwargs):
        super().__init__(*args, **kwargs)
        self.kernel_size, self.stride = tuple(kernel_size), tuple(stride)
        self.padding, self.dilation = tuple(padding), tuple(dilation)
        if padding_mode != "zeros":
            raise ValueError(f"QuantConv2d supports padding_mode='zeros' only, got {padding_mode!r}")
        self.padding_mode = padding_mode
        self.out_channels = self.out_features
        self.in_channels = self.in_features // (self.kernel_size[0] * self.kernel_size[1])
        self.groups = 1

    @classmethod
    def from_conv_state(cls, state: QuantizedLinearState, conv: nn.Conv2d, kernel: str = "reference",
                        dtype: torch.dtype = torch.float32) -> "QuantConv2d":
        lin = QuantLinear.from_state(state, conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1],
                                     conv.bias, kernel=kernel, dtype=dtype)
        return cls._from_linear(lin, conv.kernel_size, conv.stride, conv.padding, conv.dilation)

    @classmethod
    def _from_linear(cls, lin: QuantLinear, kernel_size, stride, padding, dilation) -> "QuantConv2d":
        buffers = {n: getattr(lin, n) for n in ("weight_packed", "weight_scales", "weight_row_scale",
                                                "smooth", "lr_down", "lr_up", "bias")}
        return cls(lin.in_features, lin.out_features, lin.weight_format, lin.act_format, **buffers,
                   kernel=lin.kernel, compute_dtype=lin.compute_dtype, kernel_size=kernel_size,
                   stride=stride, padding=padding, dilation=dilation)

    def layer_spec(self) -> dict:
        spec = super().layer_spec()
        spec.update(kind="conv2d", kernel_size=list(self.kernel_size), stride=list(self.stride),
                    padding=list(self.padding), dilation=list(self.dilation))
        return spec

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        cols = F.unfold(x, self.kernel_size, dilation=self.dilation, padding=self.padding, stride=self.stride)
        # cols: (B, Cin*kh*kw, L) -> rows (B*L, Cin*kh*kw)
        rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
        y = super().forward(rows)  # (B*L, Cout)
        ho = (h + 2 * self.padding[0] - self.dilation[0] * (self.kernel_size[0] - 1) - 1) // self.stride[0] + 1
        wo = (w + 2 * self.padding[1] - self.dilation[1] * (self.kernel_size[1] - 1) - 1) // self.stride[1] + 1
        return y.reshape(b, ho * wo, self.out_features).transpose(1, 2).reshape(b, self.out_features, ho, wo)


def conv_rows(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """The im2col rows (B*L, Cin*kh*kw) a conv multiplies with its (Cout, Cin*kh*kw) weight."""
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _kp_guess(packed: Tensor, fmt: Format) -> int:
    """Padded K from the packed width (codes per byte = 8 / code_bits)."""
    return packed.shape[1] * 8 // fmt.code_bits


def build_empty(spec: dict, tensors: dict[str, Tensor]) -> QuantLinear:
    """Rebuild a quantized layer from its checkpoint spec and its tensors (used by ``fourbit.load``)."""
    wf = format_from_spec(spec["weight_format"])
    af = format_from_spec(spec["act_format"])
    dtype = tensors["lr_down"].dtype if tensors.get("lr_down") is not None else (
        tensors["bias"].dtype if tensors.get("bias") is not None else torch.float32)
    lin = QuantLinear(spec["in_features"], spec["out_features"], wf, af, kernel=spec.get("kernel", "reference"),
                      compute_dtype=dtype, **tensors)
    if spec["kind"] == "conv2d":
        return QuantConv2d._from_linear(lin, spec["kernel_size"], spec["stride"], spec["padding"], spec["dilation"])
    return lin
