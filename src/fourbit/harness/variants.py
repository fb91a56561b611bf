"""Variant names of the harness: ``METHOD:wXaY[:rN][:key=value...]`` with optional ``+post`` suffixes.

Examples: ``fp16``, ``rtn:w4a4``, ``smoothquant:w4a4``, ``svdquant:w4a4:r32``, ``svdquant:w8a8:r16``,
``nf4:w4a16``, ``svdquant:w4a4:r32:fmt=int4p2:kernel=triton``, ``rtn:w4a4+ptqd``,
``svdquant:w4a4:r32:policy=paper`` (the model's "paper" override set, e.g. adaLN layers W4A16).

Bits map to formats: 4 -> int4 (group 64), 8 -> int8 (per channel / per token), 16 -> unquantized;
``fmt=NAME`` replaces the 4-bit format of weights and activations (``wfmt=``/``afmt=`` one side only),
``g=N`` sets the group size, ``alpha=A`` fixes SmoothQuant/SVDQuant's alpha, ``kernel=NAME`` the kernel.
Methods and ``+post`` processors are registries, so other components add their own
(``register_variant_method``, ``register_post``), each naming the ``key=value`` options it reads.

Validation happens once, in ``parse_variant``: an option no part of the variant reads (a typo, ``gg=32``; alpha
for RTN; a rank for a method without a low-rank branch), a value of the wrong type or out of range, and
``nf4`` with quantized activations are refused with the option named. ``Variant.config`` then builds the config,
whose own checks run before any work (``fourbit compare`` builds every variant's config first).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .. import config as C
from ..formats.quartz import alias_name

MethodBuilder = Callable[["Variant", tuple], C.QuantConfig]
_METHODS: dict[str, MethodBuilder] = {}
_METHOD_OPTIONS: dict[str, frozenset] = {}  # method -> the option keys its builder reads (besides COMMON)
_RANKED: set = set()  # methods with a low-rank branch (``rN`` allowed)
_POSTS: dict[str, Any] = {}
_POST_OPTIONS: dict[str, frozenset] = {}

#: options every quantization method reads (Variant.common_kwargs / config)
COMMON_OPTIONS = frozenset({"g", "fmt", "wfmt", "afmt", "kernel", "calib_rows", "policy", "rounding"})


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise ValueError
    return v


def _unit_float(text: str) -> float:
    v = float(text)
    if not 0.0 <= v <= 1.0:
        raise ValueError
    return v


#: how option values are read: key -> (parse, what the value must be); other keys stay strings
OPTION_VALUES = {
    "g": (_positive_int, "a positive integer"),
    "calib_rows": (_positive_int, "a positive integer"),
    "alpha": (_unit_float, "a number in [0, 1]"),
    "lzs": (_positive_int, "a positive integer"),
    "ptqd_samples": (_positive_int, "a positive integer"),
}

_BITS = re.compile(r"^w(\d+)a([\d\-]+)$")


@dataclass
class Variant:
    """A parsed variant name. ``abits`` is a string so mixed schemes like "4-8" can be expressed."""

    name: str
    method: str  # "fp16" for the unquantized model
    wbits: int = 16
    abits: str = "16"
    rank: Optional[int] = None
    options: dict = field(default_factory=dict)
    posts: list = field(default_factory=list)
    overrides: dict = field(default_factory=dict)  # per-layer overrides of a model policy (``policy=NAME``)

    @property
    def is_baseline(self) -> bool:
        return self.method == "fp16"

    def weight_format(self) -> str:
        if "wfmt" in self.options:
            return self.options["wfmt"]
        return _bits_format(self.wbits, self.options.get("fmt"), weights=True)

    def activation_format(self, bits: Optional[str] = None) -> Optional[str]:
        bits = self.abits if bits is None else bits
        if "afmt" in self.options:
            return self.options["afmt"]
        if "-" in bits:  # mixed: the base config uses the lowest width; a post-processor switches per step
            bits = bits.split("-")[0]
        return None if int(bits) >= 16 else _bits_format(int(bits), self.options.get("fmt"), weights=False)

    def common_kwargs(self, exclude: tuple) -> dict:
        kw: dict[str, Any] = dict(weights=self.weight_format(), activations=self.activation_format(),
                                  exclude=tuple(exclude), overrides=dict(self.overrides))
        if "g" in self.options:
            kw["group_size"] = int(self.options["g"])
        if "kernel" in self.options:
            kw["kernel"] = self.options["kernel"]
        if "calib_rows" in self.options:
            kw["calib_rows"] = int(self.options["calib_rows"])
        if "rounding" in self.options:
            kw["weight_rounding"] = self.options["rounding"]
        return kw

    def config(self, exclude: tuple = (), policies: Optional[dict] = None) -> C.QuantConfig:
        """The quantization config this variant means. exclude: layers the model keeps 16-bit; policies: the
        model's named override sets, of which ``policy=NAME`` picks one (e.g. "paper": adaLN layers W4A16)."""
        if self.is_baseline:
            raise ValueError("the fp16 baseline has no quantization config")
        if "policy" in self.options:
            name = self.options["policy"]
            if name not in (policies or {}):
                raise ValueError(f"{self.name!r}: this model has no policy {name!r}; "
                                 f"known: {', '.join(sorted(policies or {})) or 'none'}")
            self.overrides = dict(policies[name])
        try:
            return _METHODS[self.method](self, exclude)
        except ValueError as err:
            raise ValueError(f"{self.name!r}: {err}") from None


def _bits_format(bits: int, fmt: Optional[str], weights: bool) -> str:
    if bits == 4:
        return fmt or "int4"
    if bits == 8:
        return "int8"
    raise ValueError(f"no default {bits}-bit format; name one with wfmt=/afmt=")


def register_variant_method(name: str, builder: MethodBuilder, options: tuple = (), rank: bool = False) -> None:
    """Make ``name:...`` variants build their config with ``builder(variant, exclude)``. ``options``: the
    ``key=value`` options the builder reads besides ``COMMON_OPTIONS``; ``rank``: whether ``rN`` is read."""
    _METHODS[name] = builder
    _METHOD_OPTIONS[name] = frozenset(options)
    if rank:
        _RANKED.add(name)


def register_post(name: str, post: Any, options: tuple = ()) -> None:
    """Make ``...+name`` available: ``post`` provides sampler hooks for a quantized model (see compare.py);
    ``options``: the ``key=value`` options it reads."""
    _POSTS[name] = post
    _POST_OPTIONS[name] = frozenset(options)


def get_post(name: str) -> Any:
    return _POSTS[name]


def parse_variant(text: str) -> Variant:
    """Parse a variant name; raises ValueError naming the problem and the accepted grammar."""
    text = text.strip()
    grammar = "expected METHOD:wXaY[:rN][:key=value] (e.g. svdquant:w4a4:r32) or fp16"
    if not text:
        raise ValueError(f"empty variant name; {grammar}")
    tokens = text.split(":")
    method, posts = tokens[0], []
    rest = []
    for tok in tokens[1:]:
        base, *p = tok.split("+")
        rest.append(base)
        posts += p
    if method in ("fp16", "bf16", "16bit"):
        if rest:
            raise ValueError(f"{text!r}: the fp16 baseline takes no options")
        return Variant(text, "fp16")
    _load_plugins()
    if method not in _METHODS:
        raise ValueError(f"{text!r}: unknown method {method!r}; known: fp16, {', '.join(sorted(_METHODS))}")
    v = Variant(text, method, posts=posts)
    if not rest or not _BITS.match(rest[0]):
        raise ValueError(f"{text!r}: missing or malformed bit-widths; {grammar}")
    m = _BITS.match(rest[0])
    v.wbits, v.abits = int(m.group(1)), m.group(2)
    for tok in rest[1:]:
        if re.fullmatch(r"r\d+", tok):
            v.rank = int(tok[1:])
        elif "=" in tok:
            k, val = tok.split("=", 1)
            if k in v.options:
                raise ValueError(f"{text!r}: option {k!r} given twice")
            v.options[k] = val
        else:
            raise ValueError(f"{text!r}: unexpected token {tok!r}; {grammar}")
    for p in v.posts:
        if p not in _POSTS:
            raise ValueError(f"{text!r}: unknown suffix +{p}; known: {', '.join(sorted(_POSTS)) or 'none'}")
    _check_options(v)
    return v


def _check_options(v: Variant) -> None:
    """Refuse options nothing in the variant reads and values of the wrong type or range (see module docstring)."""
    if v.rank is not None and v.method not in _RANKED:
        raise ValueError(f"{v.name!r}: {v.method} has no low-rank branch, so r{v.rank} would be ignored; "
                         f"drop it (methods with a rank: {', '.join(sorted(_RANKED))})")
    known = COMMON_OPTIONS | _METHOD_OPTIONS.get(v.method, frozenset())
    for p in v.posts:
        known |= _POST_OPTIONS.get(p, frozenset())
    for key, val in v.options.items():
        if key not in known:
            raise ValueError(f"{v.name!r}: option {key!r} is not read by {v.method}"
                             f"{''.join('+' + p for p in v.posts)}; its options: {', '.join(sorted(known))}")
        if key in OPTION_VALUES:
            parse, what = OPTION_VALUES[key]
            try:
                parse(val)
            except ValueError:
                raise ValueError(f"{v.name!r}: option {key} must be {what}, got {val!r}") from None
    abits = v.abits.split("-")
    if not all(abits) or any(int(b) not in (4, 8, 16) for b in abits) or v.wbits not in (4, 8, 16):
        raise ValueError(f"{v.name!r}: bit widths are 4, 8 or 16 (w{v.wbits}a{v.abits}); name other formats "
                         f"with wfmt=/afmt=")
    if v.wbits >= 16:
        raise ValueError(f"{v.name!r}: 16-bit weights are the fp16 baseline; quantized variants use w4 or w8")


def _load_plugins() -> None:
    """Import optional components that register variant methods / posts (kept lazy)."""
    from ..utils import import_optional

    for mod in ("fourbit.harness.ptqd_variants",):
        import_optional(mod)


# ---- the core methods ----------------------------------------------------------------------
def _rank(v: Variant, default: int) -> int:
    return default if v.rank is None else v.rank


def _alpha(v: Variant) -> dict:
    return {"alpha": float(v.options["alpha"])} if "alpha" in v.options else {}


def _nf4(v: Variant, exclude: tuple) -> C.QuantConfig:
    if v.abits != "16" or v.wbits != 4 or any(k in v.options for k in ("fmt", "wfmt", "afmt")):
        raise ValueError("nf4 is 4-bit weight-only with NF4 weights: write nf4:w4a16 (no fmt/wfmt/afmt)")
    return C.NF4Config(**{**v.common_kwargs(exclude), "weights": "nf4", "activations": None})


register_variant_method("rtn", lambda v, ex: C.RTNConfig(**v.common_kwargs(ex)))
register_variant_method("nf4", _nf4)
register_variant_method("smoothquant", lambda v, ex: C.SmoothQuantConfig(**v.common_kwargs(ex), **_alpha(v)),
                        options=("alpha",))
register_variant_method("svd", lambda v, ex: C.SVDConfig(**v.common_kwargs(ex), rank=_rank(v, 32)), rank=True)
register_variant_method("lorc", lambda v, ex: C.LoRCConfig(**v.common_kwargs(ex), rank=_rank(v, 32)), rank=True)
register_variant_method("svdquant", lambda v, ex: C.SVDQuantConfig(**v.common_kwargs(ex), rank=v.rank, **_alpha(v)),
                        options=("alpha",), rank=True)


# ---- QuaRTZ: quartz:w4a4 and svdquant+quartz:w4a4:r32, options lzs=16|32, mode=trunc|round, stage1=group|token
#      (or afmt=NAME) and rounding=rtn|gptq|gptq_static; e.g. quartz:w4a4:lzs=32:mode=round
def _activation_name(v) -> str:
    if v.abits != "4":
        raise ValueError(f"{v.name!r}: QuaRTZ activations are 4-bit (a4); got a{v.abits}")
    if "afmt" in v.options:
        return v.options["afmt"]
    opts = v.options
    return alias_name(int(opts.get("lzs", 16)), opts.get("mode", "trunc"), opts.get("stage1", "group"))


def _variant_kwargs(v, exclude) -> dict:
    return {**v.common_kwargs(exclude), "activations": _activation_name(v)}


_QUARTZ_OPTIONS = ("lzs", "mode", "stage1")
register_variant_method("quartz", lambda v, ex: C.QuaRTZConfig(**_variant_kwargs(v, ex)), options=_QUARTZ_OPTIONS)
register_variant_method("svdquant+quartz", lambda v, ex: C.SVDQuantQuaRTZConfig(
    **_variant_kwargs(v, ex), rank=v.rank, **_alpha(v)), options=_QUARTZ_OPTIONS + ("alpha",), rank=True)
