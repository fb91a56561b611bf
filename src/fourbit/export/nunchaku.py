"""Export a fourbit SVDQuant W4A4 model (int4, group 64) to nunchaku's single-file safetensors layout, and a
decoder of that layout back to fourbit layers (for the round-trip test; ``docs/export.md``).

Per quantized layer ``<name>`` (nunchaku's ``SVDQW4A4Linear``; semantics as in its converter: the GEMM divides
the input by ``smooth_factor`` before quantizing it, and the low-rank branch reads the *unsmoothed* input):
    <name>.qweight             int8 (N, K/2)    packed 4-bit codes (``packing.pack_weight``)
    <name>.wscales             16-bit (K/64, N) weight group scales (``pack_scale``)
    <name>.smooth_factor       16-bit (K,)      the smoothing factors (input divided by them)
    <name>.smooth_factor_orig  16-bit (K,)      the same values (nunchaku keeps both; unused by its GEMM)
    <name>.proj_down           16-bit (K, r)    the branch's down factor with the smoothing folded in: (lr_down / smooth)^T
    <name>.proj_up             16-bit (N, r)    the branch's up factor
    <name>.bias                16-bit (N,)      (zeros when the layer has none)
Other tensors of the model are written unchanged under their ``state_dict`` names. Fused sibling groups
(``fourbit.siblings``) take nunchaku's fused names (``NAMES``). N and K are zero-padded to multiples of 128 and
the rank to a multiple of 16 (FLUX and SANA sizes need no padding). Metadata: ``config`` (the model's diffusers
config), ``quantization_config``, ``model_class``, and ``fourbit_export`` (what the decoder needs to strip padding).

Exactness: codes, weight scales, bias and the up factor are written bit-exact. nunchaku stores the smoothing
factors and the folded down factor in 16 bits, so fourbit's fp32 smoothing is rounded to the model dtype and
lr_down / smooth is rounded once (fp16: small values become subnormal); ``export`` counts the values that do
not come back exactly.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..formats import format_from_spec
from ..nn import QuantConv2d, QuantLinear, quantized_layers, set_module
from ..utils.files import atomic_write
from .packing import (K_UNIT, WARP_N, pack_lowrank, pack_scale, pack_weight, unpack_lowrank, unpack_scale,
                      unpack_weight)

#: fourbit name suffix of a fused sibling group's layer -> nunchaku's name for the fused layer
NAMES = (
    (".attn.to_q.group.linear", ".attn.to_qkv"),
    (".attn.add_q_proj.group.linear", ".attn.add_qkv_proj"),
)
#: diffusers class -> nunchaku's model class recorded in the metadata
MODEL_CLASSES = {"FluxTransformer2DModel": "NunchakuFluxTransformer2dModel",
                 "SanaTransformer2DModel": "NunchakuSanaTransformer2DModel"}
LAYER_TENSORS = ("qweight", "wscales", "smooth_factor", "smooth_factor_orig", "proj_down", "proj_up", "bias")


def nunchaku_name(name: str) -> str:
    for suffix, new in NAMES:
        if name.endswith(suffix):
            return name[: -len(suffix)] + new
    return name


def _ceil(x: int, m: int) -> int:
    return -(-x // m) * m


def _check_layer(name: str, layer: QuantLinear) -> None:
    wf, af = layer.weight_format, layer.act_format
    ok = (wf.name == "int4" and wf.group_size == 64 and af is not None and af.name == "int4"
          and af.group_size == 64 and layer.weight_row_scale is None)
    if not ok:
        raise ValueError(f"layer {name} is W={wf!r} A={af!r}; nunchaku export supports SVDQuant int4 weights and "
                         f"activations with group 64 only (SVDQuantConfig(weights='int4', activations='int4', "
                         f"group_size=64))")
    if isinstance(layer, QuantConv2d) and tuple(layer.kernel_size) != (1, 1):
        raise ValueError(f"layer {name} is a {tuple(layer.kernel_size)} conv; nunchaku export supports 1x1 convs "
                         f"(as linears) only")
    if layer.lr_down is not None and layer.lr_down.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"layer {name} keeps its branch in {layer.lr_down.dtype}; nunchaku needs a float16 or "
                         f"bfloat16 model: quantize the model in that dtype (model.to(torch.bfloat16))")


def layer_tensors(layer: QuantLinear, dtype: torch.dtype) -> tuple[dict, dict]:
    """The layer's nunchaku tensors (packed) and its record for the decoder."""
    n, kp = layer.out_features, layer.padded_in
    np_, kq = _ceil(n, WARP_N), _ceil(kp, K_UNIT)
    q = layer.quantized_weight()
    codes = F.pad(q.codes.to(torch.int32), (0, kq - kp, 0, np_ - n))  # (Np, Kq)
    scales = F.pad(q.scales, (0, (kq - kp) // 64, 0, np_ - n), value=1.0)  # (Np, Kq/64), fourbit's scale dtype
    smooth32 = torch.ones(kp) if layer.smooth is None else layer.smooth.float().cpu()
    smooth = F.pad(smooth32, (0, kq - kp), value=1.0).to(dtype)  # (Kq,)
    bias = torch.zeros(np_, dtype=dtype) if layer.bias is None else F.pad(layer.bias.cpu().to(dtype), (0, np_ - n))
    out = {"qweight": pack_weight(codes), "wscales": pack_scale(scales),
           "smooth_factor": pack_scale(smooth.reshape(-1, 1)), "smooth_factor_orig": pack_scale(smooth.reshape(-1, 1)),
           "bias": pack_scale(bias.reshape(-1, 1))}
    r = layer.rank
    if r:
        rp = _ceil(r, 16)
        down = (layer.lr_down.cpu().double() / smooth32.double()).to(dtype)  # (r, Kp): the unsmoothed input's factor
        down = F.pad(down, (0, kq - kp, 0, rp - r))  # (Rp, Kq)
        up = F.pad(layer.lr_up.cpu().to(dtype), (0, rp - r, 0, np_ - n))  # (Np, Rp)
        out["proj_down"], out["proj_up"] = pack_lowrank(down, True), pack_lowrank(up, False)
    record = {"kind": "conv2d" if isinstance(layer, QuantConv2d) else "linear", "in_features": layer.in_features,
              "out_features": n, "padded_in": kp, "rank": r, "weight_format": layer.weight_format.spec(),
              "act_format": layer.act_format.spec(), "has_bias": layer.bias is not None,
              "has_smooth": layer.smooth is not None}
    return out, record


def export(model: nn.Module, path: Union[str, Path]) -> dict:
    """Write ``model`` (quantized by fourbit with SVDQuant int4 g64 W4A4) to ``path`` in nunchaku's layout,
    atomically. Returns a report: layers written, and how many smoothing factors and lr_down values the 16-bit
    storage could not hold exactly (``smooth_values_rounded``, ``down_values_rounded``; 0 and 0: bit-exact)."""
    from safetensors.torch import save as st_save

    layers = dict(quantized_layers(model))
    if not layers:
        raise ValueError("the model has no fourbit-quantized layers; quantize it with fourbit.quantize first")
    for name, layer in layers.items():
        _check_layer(name, layer)
    if getattr(model, "fourbit_loras", None):
        raise ValueError("the model has LoRAs applied (fourbit.lora); remove them before exporting")
    dtype = next((l.lr_down.dtype for l in layers.values() if l.lr_down is not None), torch.bfloat16)
    scale_dtypes = {l.weight_format.scale_dtype for l in layers.values()}
    if scale_dtypes != {dtype}:
        raise ValueError(f"the weight scales are {sorted(map(str, scale_dtypes))} but the model is {dtype}; nunchaku "
                         f"reads scales in the model dtype: quantize with weight scales in {dtype}")
    tensors, records, inexact, down_inexact = {}, {}, 0, 0
    quantized_prefixes = tuple(n + "." for n in layers)
    for key, t in model.state_dict().items():
        if not key.startswith(quantized_prefixes):
            tensors[key] = t.detach().cpu().contiguous()
    for name, layer in layers.items():
        out, rec = layer_tensors(layer, dtype)
        target = nunchaku_name(name)
        rec["fourbit_name"] = name
        records[target] = rec
        if layer.smooth is not None:
            inexact += int((layer.smooth.float().cpu().to(dtype).float() != layer.smooth.float().cpu()).sum())
        if layer.rank:  # does lr_down come back from the stored 16-bit lr_down / smooth?
            s = layer.smooth.double().cpu() if layer.smooth is not None else 1.0
            back = ((layer.lr_down.cpu().double() / s).to(dtype).double() * s).to(layer.lr_down.dtype)
            down_inexact += int((back != layer.lr_down.cpu()).sum())
        for k, v in out.items():
            tensors[f"{target}.{k}"] = v.contiguous()
    wf = next(iter(layers.values())).weight_format
    config = getattr(model, "config", None)
    metadata = {
        "config": json.dumps(dict(config) if config is not None else {}, default=str),
        "quantization_config": json.dumps({"method": "svdquant", "weight": {"dtype": "int4", "scale_dtype":
                                           str(wf.scale_dtype).replace("torch.", ""), "group_size": 64},
                                           "activation": {"dtype": "int4", "scale_dtype": str(dtype).replace(
                                               "torch.", ""), "group_size": 64},
                                           "rank": max(l.rank for l in layers.values())}),
        "model_class": MODEL_CLASSES.get(type(model).__name__, type(model).__name__),
        "fourbit_export": json.dumps({"format": "nunchaku", "version": 1, "layers": records}),
    }
    blob = st_save(tensors, metadata=metadata)
    path = atomic_write(Path(path), blob)  # temp file + fsync + rename; mode follows umask / the replaced file
    return {"path": str(path), "layers": len(layers), "tensors": len(tensors), "dtype": str(dtype),
            "smooth_values_rounded": inexact, "down_values_rounded": down_inexact}


# ---- the decoder ---------------------------------------------------------------------------------
def read(path: Union[str, Path]) -> tuple[dict, dict]:
    """(tensors, metadata) of an exported file."""
    from ..utils.safetensors_io import read_safetensors

    return read_safetensors(path)


def decode_layer(tensors: dict, name: str, rec: dict) -> QuantLinear:
    """Unpack one exported layer into a fourbit QuantLinear (or QuantConv2d 1x1) with the reference numerics."""
    wf, af = format_from_spec(rec["weight_format"]), format_from_spec(rec["act_format"])
    n, kp, r = rec["out_features"], rec["padded_in"], rec["rank"]
    qweight = tensors[f"{name}.qweight"]
    np_, kq = qweight.shape[0], qweight.shape[1] * 2
    codes = unpack_weight(qweight)[:n, :kp]  # (N, Kp)
    scales = unpack_scale(tensors[f"{name}.wscales"], np_)[:n, : kp // 64].contiguous()
    smooth = unpack_scale(tensors[f"{name}.smooth_factor"], kq).reshape(-1)[:kp].float()
    bias = unpack_scale(tensors[f"{name}.bias"], np_).reshape(-1)[:n]
    lr_down = lr_up = None
    if r:
        down = unpack_lowrank(tensors[f"{name}.proj_down"], True)[:r, :kp]  # (r, Kp): (lr_down / smooth)
        dtype = down.dtype
        lr_down = (down.double() * smooth.double()).to(dtype).contiguous()  # back into the smoothed input's factor
        lr_up = unpack_lowrank(tensors[f"{name}.proj_up"], False)[:n, :r].contiguous()
    layer = QuantLinear(rec["in_features"], n, wf, af, weight_packed=wf.pack(codes), weight_scales=scales,
                        smooth=smooth.contiguous() if rec["has_smooth"] else None, lr_down=lr_down, lr_up=lr_up,
                        bias=bias.contiguous() if rec["has_bias"] else None,
                        compute_dtype=lr_down.dtype if lr_down is not None else bias.dtype)
    if rec["kind"] == "conv2d":
        return QuantConv2d._from_linear(layer, (1, 1), (1, 1), (0, 0), (1, 1))
    return layer


def load_decoded(model: nn.Module, path: Union[str, Path]) -> nn.Module:
    """Put the decoded layers of an exported file into ``model`` (a fourbit model of the same architecture, or
    one prepared the same way) at their fourbit names, and its other tensors into the model. Returns ``model``."""
    tensors, metadata = read(path)
    info = json.loads(metadata["fourbit_export"])
    for name, rec in info["layers"].items():
        set_module(model, rec["fourbit_name"], decode_layer(tensors, name, rec))
    state = model.state_dict()
    rest = {k: v for k, v in tensors.items() if k in state and not k.startswith(tuple(n + "." for n in info["layers"]))}
    model.load_state_dict(rest, strict=False)
    return model
