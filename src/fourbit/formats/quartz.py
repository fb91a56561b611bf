"""QuaRTZ: 8-bit quantization compressed to 4 bits by leading-zero suppression (arXiv 2509.26436).

Stage 1, symmetric 8-bit:  q = clamp(round(x / s), -127, 127) (round half to even), with either
  stage1="group" (default, the authors' code): s = max|x_group| / 127 per row and group of ``group_size``
                 (64) input channels, stored in fp16 (nearest; next value up only where a subnormal scale
                 would clip the group maximum by more than half a step), or
  stage1="token": s = max|x_row| / 127 in fp32, one per row (per token / output channel).
Stage 2, leading-zero suppression (LZS) over groups of ``lzs_group`` = G_s (16 or 32) consecutive elements:
  m = |q|;  M = OR of the group's m;  FLAG = max(floor(log2 M) - 2, 0) in {0..4};
  mode="trunc" (default, the paper):  c = m >> FLAG            (drop the low FLAG bits)
  mode="round" (the authors' code):   c = min(round(|x / s| / 2^FLAG), 7)   (nearest at the kept precision,
                                       ties to even, computed from the stage-1 quotient, saturating at 7)
  code = sign(q) * c in [-7, 7];  decode: q~ = code << FLAG;  x~ = q~ * s.
The highest set bit of an OR is the highest set bit of the maximum, so FLAG is computed from max(m).
A group whose magnitudes all fit in 3 bits (M <= 7) has FLAG 0 and is lossless.
Unsigned variant (signed=False), for non-negative inputs (after ReLU/GELU; negative inputs are clipped to
0): stage 1 is q = clamp(round(x / s), 0, 255) with s = max(x) / 255, and LZS keeps 4 magnitude bits:
FLAG = max(floor(log2 M) - 3, 0) in {0..4}, c in [0, 15] (round mode saturates at 15), no sign.

Exactness: every decoded value q~ = c << FLAG has at most 3 (unsigned: 4) significant bits and
|q~| <= 7 << 4 = 112 (unsigned: 15 << 4 = 240), so it is exact in int8 (unsigned: uint8) and in FP8 e4m3.
With stage1="token" the format therefore folds into a plain row/column-scaled FP8 (or int8) GEMM:
``to_fp8_operand(q)`` returns (e4m3 q~, s) with dequantize(q) == q~ * s bit for bit.

Storage (what ``quantize`` returns; ``pack``/``unpack`` are the default two-codes-per-byte nibbles):
  codes      (R, K) int8 sign * c (two's complement nibble at rest; -8 never occurs); unsigned: uint8 c.
  stage1="group":  scales (R, K / group_size) int32 *header words*, one per stage-1 group:
                   bits 0-15 = the fp16 bit pattern of s, bits 16 + 3j .. 18 + 3j = FLAG of the j-th LZS
                   group inside it (n = group_size / G_s flags; int64 words when 16 + 3n > 31; when
                   G_s > group_size each word carries the FLAG of the LZS group containing it).
                   row_scale None.
  stage1="token":  scales (R, K / G_s) uint8 FLAG (a power-of-two exponent per group, like E8M0 scales),
                   row_scale (R, 1) fp32 = s. Here group_size *is* G_s (the only grouping along K).
Bits per element (``bits_per_element``: the format's information content, as in the paper):
  group:  4 + 3 / G_s + 16 / group_size     (4.4375 at G_s = 16, 4.34375 at G_s = 32, group 64)
  token:  4 + 3 / G_s + 32 / K              (4.1875 + 32 / K at G_s = 16)
At rest the header words take 32 bits per stage-1 group (4.5 bits per element at group 64) and the token
variant's flags one byte each; ``pack_flags`` gives the dense 3-bit layout.

Names (all also reachable as options of "quartz"): quartz[_tok][_s32][_round]
  e.g. "quartz" = group 64 fp16 stage 1, G_s 16, truncation; "quartz_s32_round" = G_s 32, round-to-nearest;
  "quartz_tok" = per-token fp32 stage 1 (FP8-exact). The unsigned variant is an option (signed=False), not a
  registered name, because it is only valid for non-negative inputs (see QuaRTZConfig.act_signed).
Runs fast on: stage1="token" -> Hopper/Ada/Blackwell FP8 tensor cores (or int8 ones) through a plain
row/column-scaled GEMM; stage1="group" -> a kernel applying fp16 scales per 64-group (see hopper.md).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .base import Format, QuantizedTensor, cast_scale, grouped, safe_divisor

STAGE1 = ("group", "token")
MODES = ("trunc", "round")
#: largest FLAG (3 bits are stored; values 5..7 never occur)
FLAG_MAX = 4
_DEFAULTS = {"lzs_group": 16, "mode": "trunc", "stage1": "group", "signed": True}


class QuaRTZ(Format):
    """QuaRTZ activations (or weights): 8-bit stage 1, leading-zero suppression to 4-bit codes + 3-bit flags."""

    name = "quartz"
    code_bits = 4
    default_group_size = 64
    code_dtype = torch.int8
    scale_dtype = torch.int32
    #: quantize does not always return the nearest representable value (truncation; saturation at 7)
    picks_nearest = False
    #: floor of the shared Gaussian SQNR test (tests/formats): truncation drops up to 2^FLAG - 1 stage-1
    #: steps, and on dense Gaussian data nearly every group reaches FLAG 4, so SQNR is ~13-14 dB (int4 RTN:
    #: ~19 dB). QuaRTZ pays off on heavy-tailed data, not here. None = the shared 4-bit floor (round mode).
    sqnr_floor_db: Optional[float] = None
    #: option defaults of this registered name (aliases override some)
    _defaults: dict = _DEFAULTS

    def __init__(self, group_size: Optional[int] = None, *, lzs_group: Optional[int] = None,
                 mode: Optional[str] = None, stage1: Optional[str] = None, signed: Optional[bool] = None):
        given = {"lzs_group": lzs_group, "mode": mode, "stage1": stage1, "signed": signed}
        opts = {k: (self._defaults[k] if v is None else v) for k, v in given.items()}
        lzs_group, mode, stage1, signed = opts["lzs_group"], opts["mode"], opts["stage1"], opts["signed"]
        if not isinstance(lzs_group, int) or isinstance(lzs_group, bool) or lzs_group <= 0:
            raise ValueError(f"quartz: lzs_group must be a positive int, got {lzs_group!r}")
        if mode not in MODES:
            raise ValueError(f"quartz: mode must be one of {MODES}, got {mode!r}")
        if stage1 not in STAGE1:
            raise ValueError(f"quartz: stage1 must be one of {STAGE1}, got {stage1!r}")
        if not isinstance(signed, bool):
            raise ValueError(f"quartz: signed must be True or False, got {signed!r}")
        if stage1 == "token":
            # the only grouping along K is the LZS group: group_size is G_s
            if group_size is None:
                group_size = lzs_group
            elif group_size != lzs_group:
                raise ValueError(f"quartz with stage1='token' has a fixed group size, the LZS group "
                                 f"(lzs_group={lzs_group}); got group_size={group_size}. Leave group_size unset.")
        super().__init__(group_size, **opts)
        g = self.group_size
        if stage1 == "group" and g % lzs_group and lzs_group % g:
            raise ValueError(f"quartz: lzs_group={lzs_group} and group_size={g} must divide one another")
        self.lzs_group, self.mode, self.stage1, self.signed = lzs_group, mode, stage1, signed
        self.sqnr_floor_db = 12.0 if mode == "trunc" else None
        self.code_dtype = torch.int8 if signed else torch.uint8
        self.qmax = 127 if signed else 255  # stage-1 code range
        self.mag_bits = 3 if signed else 4  # magnitude bits kept by LZS
        self.cmax = (1 << self.mag_bits) - 1
        if stage1 == "token":
            self.has_row_scale, self.fp8_exact, self.scale_dtype = True, True, torch.uint8
        else:
            self.has_row_scale, self.fp8_exact = False, False
            n = self.flags_per_word
            if 16 + 3 * n > 63:
                raise ValueError(f"quartz: group_size / lzs_group = {n} flags do not fit a 64-bit header word; "
                                 f"use group_size <= 15 * lzs_group")
            self.scale_dtype = torch.int32 if 16 + 3 * n <= 31 else torch.int64

    # ---- geometry ----------------------------------------------------------------------------
    @property
    def flags_per_word(self) -> int:
        """LZS flags carried by one stage-1 header word (stage1="group")."""
        return max(1, self.group_size // self.lzs_group)

    def check_input(self, x: Tensor) -> Tensor:
        xf = super().check_input(x)
        if xf.shape[1] % self.lzs_group:
            raise ValueError(f"{self.name}: K={xf.shape[1]} is not a multiple of the LZS group "
                             f"{self.lzs_group}; pad K first")
        return xf

    def scale_bits(self) -> float:
        """Bits per group of ``group_size``: fp16 scale + 3-bit flags (group); 3-bit flag (token)."""
        if self.stage1 == "token":
            return 3.0
        return 16.0 + 3.0 * self.group_size / self.lzs_group

    def stored_bits_per_element(self, k: int = 4096) -> float:
        """Bits per element as ``quantize`` stores them (header words / one byte per flag), not densely packed."""
        g = self.group_for(k)
        bits = self.code_bits + torch.iinfo(self.scale_dtype).bits / g
        if self.has_row_scale:
            bits += 32.0 / k
        return bits

    # ---- the reference numerics ---------------------------------------------------------------
    def quantize(self, x: Tensor) -> QuantizedTensor:
        xf = self.check_input(x)
        r, k = xf.shape
        if not self.signed:
            xf = xf.clamp_min(0.0)
        if self.stage1 == "token":
            amax = xf.abs().amax(dim=1, keepdim=True)  # (R, 1)
            s = amax / torch.full_like(amax, self.qmax)  # fp32; a tensor divisor: IEEE division on every device
            y = xf / safe_divisor(s)  # (R, K) stage-1 quotient
        else:
            xg = grouped(xf, self.group_size)  # (R, K/g, g)
            amax = xg.abs().amax(dim=-1, keepdim=True)  # (R, K/g, 1)
            s = cast_scale(amax, self.qmax, self.qmax + 0.5, torch.float16)  # (R, K/g, 1) fp16
            y = (xg / safe_divisor(s.float())).reshape(r, k)
        q = torch.clamp(torch.round(y), -self.qmax if self.signed else 0, self.qmax).to(torch.int32)
        codes, flags = lzs_encode(q, y, self.lzs_group, self.mode, self.mag_bits)
        codes = codes.to(self.code_dtype)
        if self.stage1 == "token":
            return QuantizedTensor(codes, flags, s)
        return QuantizedTensor(codes, self._words(s.reshape(r, -1), flags))

    def dequantize(self, q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> Tensor:
        r, k = q.codes.shape
        qt = self.decode_int(q).float()  # (R, K) exact stage-1 integers
        if self.stage1 == "token":
            return (qt * q.row_scale.float()).to(dtype)
        s = self.stage1_scales(q).float()  # (R, K/g)
        return (grouped(qt, self.group_size) * s.unsqueeze(-1)).reshape(r, k).to(dtype)

    def valid_codes(self) -> Tensor:
        """Every code quantize can produce: -7..7 (unsigned: 0..15); -8 never occurs."""
        if self.signed:
            return torch.arange(-self.cmax, self.cmax + 1, dtype=torch.int8)
        return torch.arange(0, self.cmax + 1, dtype=torch.int16).to(torch.uint8)

    # ---- decoding helpers (what a kernel's quantize step produces) -------------------------------
    def flags(self, q: QuantizedTensor) -> Tensor:
        """(R, K / G_s) uint8 LZS flags."""
        if self.stage1 == "token":
            return q.scales
        r = q.scales.shape[0]
        w = q.scales.to(torch.int64)
        n = self.flags_per_word
        shifts = 16 + 3 * torch.arange(n, device=w.device)
        f = ((w.unsqueeze(-1) >> shifts) & 0x7).reshape(r, -1)  # (R, K/g * n)
        if self.lzs_group > self.group_size:  # one flag per word, repeated across the LZS group
            f = f[:, :: self.lzs_group // self.group_size]
        return f.to(torch.uint8)

    def stage1_scales(self, q: QuantizedTensor) -> Tensor:
        """The stage-1 scales: (R, K / group_size) fp16 (group) or (R, 1) fp32 (token)."""
        if self.stage1 == "token":
            return q.row_scale
        bits = (q.scales.to(torch.int32) & 0xFFFF)
        bits = torch.where(bits >= 0x8000, bits - 0x10000, bits).to(torch.int16)
        return bits.view(torch.float16)

    def decode_int(self, q: QuantizedTensor) -> Tensor:
        """(R, K) int32 decoded stage-1 integers q~ = code << FLAG (exact; |q~| <= 112, unsigned <= 240)."""
        f = self.flags(q).to(torch.int32).repeat_interleave(self.lzs_group, dim=1)  # (R, K)
        return q.codes.to(torch.int32) * _pow2(f)

    def decode_int8(self, q: QuantizedTensor) -> Tensor:
        """(R, K) q~ as int8 (unsigned variant: uint8): the integer GEMM operand."""
        return self.decode_int(q).to(self.code_dtype)

    def fp8_values(self, q: QuantizedTensor) -> Tensor:
        """q~ as fp32 (R, K); every entry is exactly representable in float8_e4m3fn."""
        return self.decode_int(q).float()

    def to_fp8_operand(self, q: QuantizedTensor) -> tuple[Tensor, Tensor]:
        """(q~ as float8_e4m3fn (R, K), s (R, 1) fp32) with dequantize(q) == fp8.float() * s exactly.

        Only for stage1="token": with per-group fp16 stage-1 scales the GEMM has to apply group scales.
        """
        if self.stage1 != "token":
            raise ValueError(f"{self!r}: only stage1='token' folds into an FP8 GEMM with row scales; use "
                             f"decode_int8(q) with stage1_scales(q) for the per-group variant")
        return self.fp8_values(q).to(torch.float8_e4m3fn), q.row_scale.float()

    # ---- header words ---------------------------------------------------------------------------
    def _words(self, s16: Tensor, flags: Tensor) -> Tensor:
        """fp16 scales (R, K/g) + flags (R, K/G_s) -> header words (R, K/g) int32/int64 (module docstring)."""
        r, ng = s16.shape
        if self.lzs_group > self.group_size:
            flags = flags.repeat_interleave(self.lzs_group // self.group_size, dim=1)  # (R, K/g)
        f = flags.to(torch.int64).reshape(r, ng, self.flags_per_word)
        shifts = 16 + 3 * torch.arange(self.flags_per_word, device=f.device)
        w = (s16.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF) | (f << shifts).sum(dim=-1)
        return w.to(self.scale_dtype)


def lzs_flags(m: Tensor, lzs_group: int, mag_bits: int = 3) -> Tensor:
    """FLAG = max(floor(log2 M) - (mag_bits - 1), 0) per group of ``lzs_group``, M = OR of the magnitudes.

    m: (R, K) non-negative int magnitudes (< 2^(mag_bits + 4)). Returns (R, K / lzs_group) uint8 in {0..4}.
    The highest set bit of an OR equals that of the maximum, so max(m) is used.
    """
    big = grouped(m, lzs_group).amax(dim=-1)  # (R, K/G)
    f = torch.zeros_like(big)
    for t in range(FLAG_MAX):  # thresholds 8, 16, 32, 64 (unsigned: 16, 32, 64, 128)
        f += (big >= (1 << (mag_bits + t))).to(f.dtype)
    return f.to(torch.uint8)


def lzs_encode(q: Tensor, y: Tensor, lzs_group: int, mode: str = "trunc", mag_bits: int = 3
               ) -> tuple[Tensor, Tensor]:
    """Leading-zero suppression of stage-1 integers.

    q: (R, K) int32 stage-1 codes; y: (R, K) fp32 stage-1 quotients x / s (used by mode="round").
    Returns (codes (R, K) int32 = sign * c with 0 <= c < 2^mag_bits, flags (R, K / lzs_group) uint8).
    """
    m = q.abs()
    flags = lzs_flags(m, lzs_group, mag_bits)
    f = flags.to(torch.int32).repeat_interleave(lzs_group, dim=1)  # (R, K)
    if mode == "trunc":
        c = m >> f
    else:
        cmax = (1 << mag_bits) - 1
        c = torch.round(y.abs() / _pow2(f).float()).clamp_max(cmax).to(torch.int32)  # exact: division by 2^f
    return torch.where(q < 0, -c, c), flags


def _pow2(f: Tensor) -> Tensor:
    """2^f for small non-negative int32 f (same dtype)."""
    return torch.bitwise_left_shift(torch.ones_like(f), f)


def pack_flags(flags: Tensor) -> Tensor:
    """(R, n) flags in 0..7 -> (R, ceil(3n / 8)) uint8, 3 bits each, little-endian bit order.

    Flag j occupies bits 3j .. 3j + 2 of the row's bit string, and bit b of the string is bit b % 8 of byte b // 8
    (so a flag may straddle two bytes). This is the dense form counted by ``bits_per_element``.
    """
    r, n = flags.shape
    bits = (flags.to(torch.int32).unsqueeze(-1) >> torch.arange(3, device=flags.device)) & 1  # (R, n, 3)
    bits = bits.reshape(r, 3 * n)
    pad = (-bits.shape[1]) % 8
    bits = torch.nn.functional.pad(bits, (0, pad)).reshape(r, -1, 8)  # (R, bytes, 8)
    return (bits << torch.arange(8, device=flags.device)).sum(dim=-1).to(torch.uint8)


def unpack_flags(packed: Tensor, n: int) -> Tensor:
    """Inverse of ``pack_flags``: (R, ceil(3n / 8)) uint8 -> (R, n) uint8 flags."""
    r = packed.shape[0]
    bits = (packed.to(torch.int32).unsqueeze(-1) >> torch.arange(8, device=packed.device)) & 1  # (R, B, 8)
    bits = bits.reshape(r, -1)[:, : 3 * n].reshape(r, n, 3)
    return (bits << torch.arange(3, device=packed.device)).sum(dim=-1).to(torch.uint8)


def _alias(name: str, **defaults) -> type[QuaRTZ]:
    """A registered name for a QuaRTZ variant: the same class with other option defaults."""
    opts = {**_DEFAULTS, **defaults}
    attrs = {"name": name, "_defaults": opts, "__module__": __name__,
             "__doc__": f"QuaRTZ with {', '.join(f'{k}={v!r}' for k, v in opts.items())}."}
    if opts["stage1"] == "token":
        attrs.update(default_group_size=opts["lzs_group"], fixed_group_size=True, has_row_scale=True,
                     fp8_exact=True, scale_dtype=torch.uint8)
    cls_name = "QuaRTZ_" + name[len("quartz_"):] if name != "quartz" else "QuaRTZ"
    return type(cls_name, (QuaRTZ,), attrs)


def alias_name(lzs_group: int = 16, mode: str = "trunc", stage1: str = "group") -> str:
    """The registered name of a signed variant, e.g. (32, "round", "token") -> "quartz_tok_s32_round"."""
    return ("quartz" + ("_tok" if stage1 == "token" else "") + ("" if lzs_group == 16 else f"_s{lzs_group}")
            + ("_round" if mode == "round" else ""))


#: every registered QuaRTZ class: "quartz" plus its aliases (signed; G_s 16/32; trunc/round; group/token)
VARIANTS: dict[str, type[QuaRTZ]] = {"quartz": QuaRTZ}
for _stage1 in STAGE1:
    for _g in (16, 32):
        for _mode in MODES:
            _n = alias_name(_g, _mode, _stage1)
            if _n != "quartz":
                VARIANTS[_n] = _alias(_n, lzs_group=_g, mode=_mode, stage1=_stage1)
