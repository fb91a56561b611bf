"""One dataclass per quantization method. A config says *what* to do; ``fourbit.quantize`` does it.

Common fields (every method):
    weights      weight format name ("int4", "fp4", "nvfp4", "mxfp4", "int4p2", "fp4p2", "int8", "nf4", ...)
    activations  activation format name, or None for 16-bit activations (weight-only)
    group_size   group size along the input dimension (None = the format's default: int4 64, fp4 32, ...)
    include / exclude   fnmatch patterns over module names selecting the layers to quantize
    overrides    {pattern: {field: value}} per-layer changes, applied in order; the special field
                 "keep": True keeps matching layers 16-bit. E.g. {"*.adaLN*": {"activations": None}} (W4A16)
    pad          what to do when a layer's input size is not a multiple of the group size:
                 "pad" (zero-pad the input dimension) or "skip" (keep the layer 16-bit); reported either way
    calib_rows   activation rows kept per layer during calibration (a bounded, seeded sample)
    seed         seed of that sample (and of anything else random)
    kernel       the kernel that runs the quantized layers ("reference" is the plain-torch emulation)
    weight_rounding  how weights (the residual, for SVDQuant) are rounded: "rtn" (nearest), "gptq"
                 (GPTQ on the calibration rows, group scales fixed as it reaches each group) or
                 "gptq_static" (GPTQ with every scale taken from the original weight). GPTQ needs
                 calibration data for any method (see ``needs_calibration_data``)
    gptq_damp    GPTQ's dampening, relative to the mean diagonal of the Hessian
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

CONFIG_VERSION = 1
_PAD_POLICIES = ("pad", "skip")
_SIXTEEN_BIT = (None, "none", "fp16", "bf16", "16", "a16")
_WEIGHT_ROUNDING = ("rtn", "gptq", "gptq_static")


@dataclass
class QuantConfig:
    """Fields shared by every method (see the module docstring)."""

    method: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = True

    weights: str = "int4"
    activations: Optional[str] = "int4"
    group_size: Optional[int] = None
    include: tuple = ("*",)
    exclude: tuple = ()
    overrides: dict = field(default_factory=dict)
    pad: str = "pad"
    calib_rows: int = 512
    seed: int = 0
    kernel: str = "reference"
    weight_rounding: str = "rtn"
    gptq_damp: float = 0.01

    def __post_init__(self):
        if isinstance(self.include, str):
            self.include = (self.include,)
        if isinstance(self.exclude, str):
            self.exclude = (self.exclude,)
        if not isinstance(self.include, (list, tuple)) or not isinstance(self.exclude, (list, tuple)):
            raise ValueError("include and exclude must be a pattern or a list of fnmatch patterns (strings)")
        self.include, self.exclude = tuple(self.include), tuple(self.exclude)
        _check_types(self)
        if self.activations in _SIXTEEN_BIT:
            self.activations = None
        if self.pad not in _PAD_POLICIES:
            raise ValueError(f"pad must be one of {_PAD_POLICIES}, got {self.pad!r}")
        if self.group_size is not None and self.group_size <= 0:
            raise ValueError(f"group_size must be positive, got {self.group_size}")
        if self.calib_rows < 1:
            raise ValueError(f"calib_rows must be >= 1, got {self.calib_rows}")
        if self.weight_rounding not in _WEIGHT_ROUNDING:
            raise ValueError(f"weight_rounding must be one of {_WEIGHT_ROUNDING}, got {self.weight_rounding!r}")
        if not self.gptq_damp > 0:
            raise ValueError(f"gptq_damp must be > 0, got {self.gptq_damp}")
        if not isinstance(self.overrides, dict):
            raise TypeError("overrides must be a dict {pattern: {field: value}}")
        known = {f.name for f in dataclasses.fields(self)} | {"keep"}
        for pattern, changes in self.overrides.items():
            if not isinstance(pattern, str) or not isinstance(changes, dict):
                raise ValueError(f"override {pattern!r}: overrides map a pattern (str) to a dict of field values")
            bad = set(changes) - known
            if bad:
                raise ValueError(
                    f"override for {pattern!r} sets unknown field(s) {sorted(bad)}; "
                    f"{type(self).__name__} fields are {sorted(known)}"
                )
        # building the formats validates names and group sizes early, with a clear message
        self.weight_format()
        self.activation_format()
        if self.group_size is not None and not any(_takes_group_size(n) for n in (self.weights, self.activations)):
            raise ValueError(f"group_size={self.group_size} would be ignored: {self.weights}"
                             f"{'' if self.activations is None else ' and ' + self.activations} keep their own "
                             f"grouping (fixed groups or one scale per row); leave group_size unset")
        from .kernels import available_kernels

        if self.kernel not in available_kernels():
            raise ValueError(f"unknown kernel {self.kernel!r}; known kernels: {', '.join(available_kernels())}")
        for pattern, changes in self.overrides.items():  # each override must make a valid config too
            fields = {k: v for k, v in changes.items() if k != "keep"}
            if fields and changes.get("keep") is not True:
                try:
                    dataclasses.replace(self, **fields, overrides={})
                except ValueError as err:
                    raise ValueError(f"override for {pattern!r}: {err}") from None

    def needs_calibration_data(self) -> bool:
        """Whether quantizing with this (per-layer) config needs calibration rows: the method's own need,
        or GPTQ weight rounding, which needs the inputs' Hessian whatever the method."""
        return type(self).needs_calibration or self.weight_rounding != "rtn"

    # ---- formats ---------------------------------------------------------------------------
    def weight_format(self):
        from .formats import make_format

        return make_format(self.weights, self._group_for(self.weights))

    def activation_format(self):
        from .formats import make_format

        if self.activations is None:
            return None
        return make_format(self.activations, self._group_for(self.activations))

    def _group_for(self, fmt_name: str) -> Optional[int]:
        from .formats import FORMATS

        cls = FORMATS.get(fmt_name)
        if cls is None:
            return self.group_size  # make_format reports the unknown name
        if cls.fixed_group_size or cls.default_group_size is None:
            return None  # per-row (int8) or fixed-group formats keep their own geometry
        return self.group_size

    # ---- per-layer resolution ---------------------------------------------------------------
    def for_layer(self, name: str) -> Optional["QuantConfig"]:
        """This config with the overrides matching ``name`` applied; None if the layer stays 16-bit."""
        from fnmatch import fnmatchcase

        changes: dict[str, Any] = {}
        for pattern, ch in self.overrides.items():
            if fnmatchcase(name, pattern):
                changes.update(ch)
        if changes.pop("keep", False):
            return None
        if not changes:
            return self
        return dataclasses.replace(self, **changes, overrides={})

    # ---- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["include"], d["exclude"] = list(self.include), list(self.exclude)
        return {"method": self.method, "version": CONFIG_VERSION, **d}

    @staticmethod
    def from_dict(d: dict) -> "QuantConfig":
        d = dict(d)
        method = d.pop("method", None)
        version = d.pop("version", CONFIG_VERSION)
        if type(version) is not int or version < 1:
            raise ValueError(f"config version must be a positive integer, got {version!r}")
        if version > CONFIG_VERSION:
            raise ValueError(f"config version {version} is newer than this fourbit understands ({CONFIG_VERSION})")
        cls = CONFIGS.get(method) if isinstance(method, str) else None
        if cls is None:
            raise ValueError(f"unknown method {method!r}; known: {', '.join(sorted(CONFIGS))}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"{cls.__name__} has no field(s) {', '.join(map(repr, unknown))}; "
                             f"its fields are {', '.join(sorted(fields))}")
        for key in ("alpha_grid",):
            if key in d and isinstance(d[key], list):
                d[key] = tuple(d[key])
        return cls(**d)


def _alpha_grid() -> tuple:
    return tuple(round(0.1 * i, 2) for i in range(11))


@dataclass
class RTNConfig(QuantConfig):
    """Round-to-nearest ("naive") W/A quantization; activations quantized dynamically per token group."""

    method: ClassVar[str] = "rtn"
    needs_calibration: ClassVar[bool] = False


@dataclass
class SmoothQuantConfig(QuantConfig):
    """SmoothQuant: per-channel smoothing X diag(l)^-1, diag(l) W, then RTN on both.

    alpha: migration strength; None = searched per layer over ``alpha_grid`` to minimise the output error.
    """

    method: ClassVar[str] = "smoothquant"
    alpha: Optional[float] = None
    alpha_grid: tuple = field(default_factory=_alpha_grid)

    def __post_init__(self):
        super().__post_init__()
        _check_alpha(self.alpha, self.alpha_grid)


@dataclass
class _LowRankConfig(QuantConfig):
    """A method with a 16-bit rank-r branch and no activation statistics."""

    needs_calibration: ClassVar[bool] = False
    rank: int = 32

    def __post_init__(self):
        super().__post_init__()
        _check_rank(self.rank)


@dataclass
class SVDConfig(_LowRankConfig):
    """SVD-only: a 16-bit rank-r branch of W plus the quantized residual; no smoothing."""

    method: ClassVar[str] = "svd"


@dataclass
class LoRCConfig(_LowRankConfig):
    """LoRC: quantize W, then add a rank-r 16-bit approximation of the error W - Q(W)."""

    method: ClassVar[str] = "lorc"


@dataclass
class SVDQuantConfig(QuantConfig):
    """SVDQuant: smoothing, a 16-bit rank-r SVD branch of the smoothed weight, 4-bit residual.

    alpha: smoothing strength; None = searched per layer (``alpha_grid``) to minimise the layer output
           error after the low-rank step and quantization.
    refine_iters: extra iterations re-decomposing W^ - Q(R) and re-quantizing R, keeping the best.
    smooth: False gives "SVDQuant without smoothing" (the paper's ablation).
    rank: None picks the paper's setting: 32 for 4-bit weights, 16 for 8-bit weights.
    search_split: how the alpha search splits each candidate W^ into branch + residual: "exact" (default) or
           "randomized" (a seeded randomized range finder, rank + 16 columns, two power iterations: one small
           eigen-decomposition per alpha instead of a full one). Either way the chosen alpha's split is exact.
           Measured (CPU): a 3072 x 3072 layer 246 s -> 30 s; on the bundled models it picked another alpha in 18 of
           35 (DiT) and 45 of 56 (UNet) layers, per-layer calibration error up to 7% higher: opt-in.
    """

    method: ClassVar[str] = "svdquant"
    rank: Optional[int] = None  # None: 32 with 4-bit weights, 16 with 8-bit weights (the paper's settings)
    alpha: Optional[float] = None
    alpha_grid: tuple = field(default_factory=_alpha_grid)
    refine_iters: int = 0
    smooth: bool = True
    search_split: str = "exact"

    def __post_init__(self):
        super().__post_init__()
        if self.search_split not in ("randomized", "exact"):
            raise ValueError(f"search_split must be 'randomized' or 'exact', got {self.search_split!r}")
        if self.rank is None:
            self.rank = 16 if self.weight_format().code_bits == 8 else 32
        _check_rank(self.rank)
        _check_alpha(self.alpha, self.alpha_grid)
        if self.refine_iters < 0:
            raise ValueError(f"refine_iters must be >= 0, got {self.refine_iters}")


@dataclass
class NF4Config(QuantConfig):
    """Weight-only NF4 (W4A16), the common community baseline (bitsandbytes-style, absmax per group)."""

    method: ClassVar[str] = "nf4"
    needs_calibration: ClassVar[bool] = False
    weights: str = "nf4"
    activations: Optional[str] = None

    def __post_init__(self):
        super().__post_init__()
        if self.activations is not None:
            raise ValueError("NF4Config is weight-only: leave activations=None")


@dataclass
class QuaRTZConfig(QuantConfig):
    """QuaRTZ W4A4 (arXiv 2509.26436): activations quantized to 8 bits, then leading-zero suppressed to 4-bit
    codes with a 3-bit flag per group; weights int4 group 64 RTN (the paper's W4A4).

    activations: a QuaRTZ format name (``fourbit.formats.quartz``): "quartz" (stage 1 per token per 64
                 channels with fp16 scales as in the authors' code, LZS groups of 16, truncation as in the
                 paper), "quartz_s32" (groups of 32), "quartz_round" (the authors' round-to-nearest),
                 "quartz_tok" (one fp32 scale per token: exact in FP8 on Hopper), ... or None (16-bit).
    weights:     any weight format; a QuaRTZ name puts leading-zero suppression on the weights too
                 (weights="quartz_tok": per-output-channel, FP8-exact). weight_rounding="gptq" for GPTQ.
    act_signed:  False selects the unsigned variant (4 magnitude bits, negative inputs clipped to 0) for layers
                 whose inputs are non-negative; set it per layer, e.g. overrides={"*.fc2": {"act_signed": False}}.
    """

    method: ClassVar[str] = "quartz"
    needs_calibration: ClassVar[bool] = False
    activations: Optional[str] = "quartz"
    act_signed: bool = True

    def activation_format(self):
        return _quartz_activation_format(self, super().activation_format())


@dataclass
class SVDQuantQuaRTZConfig(SVDQuantConfig):
    """SVDQuant's smoothing and 16-bit low-rank branch with QuaRTZ activations on the residual ("svdquant+quartz").

    Same fields as SVDQuantConfig (alpha is searched with QuaRTZ in the loop) plus ``act_signed`` as in
    QuaRTZConfig. ``SVDQuantConfig(activations="quartz")`` computes the same thing; this class names the
    combination and defaults to it.
    """

    method: ClassVar[str] = "svdquant+quartz"
    activations: Optional[str] = "quartz"
    act_signed: bool = True

    def activation_format(self):
        return _quartz_activation_format(self, super().activation_format())


def _quartz_activation_format(cfg, fmt):
    """The QuaRTZ configs' activation format: must be a QuaRTZ one; the unsigned variant when act_signed=False."""
    from .formats import QuaRTZ, format_from_spec

    if fmt is None:
        return None
    if not isinstance(fmt, QuaRTZ):
        raise ValueError(f"{type(cfg).__name__} quantizes activations with a QuaRTZ format (quartz, quartz_s32, "
                         f"quartz_round, quartz_tok, ...), got {cfg.activations!r}")
    if not isinstance(cfg.act_signed, bool):
        raise ValueError(f"act_signed must be True or False, got {cfg.act_signed!r}")
    return fmt if cfg.act_signed else format_from_spec({**fmt.spec(), "signed": False})


def _takes_group_size(fmt_name: Optional[str]) -> bool:
    from .formats import FORMATS

    cls = FORMATS.get(fmt_name)
    return cls is not None and not cls.fixed_group_size and cls.default_group_size is not None


def _check_rank(rank: int) -> None:
    if type(rank) is not int or rank < 0:
        raise ValueError(f"rank must be a non-negative integer, got {rank!r}")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_alpha(alpha, grid) -> None:
    if alpha is not None and not (_is_number(alpha) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must be in [0, 1] or None (searched), got {alpha!r}")
    if not isinstance(grid, (tuple, list)) or not all(_is_number(a) and 0.0 <= a <= 1.0 for a in grid):
        raise ValueError(f"alpha_grid must be a tuple of alphas in [0, 1], got {grid!r}")
    if alpha is None and not grid:
        raise ValueError("alpha=None needs a non-empty alpha_grid to search")


def _int(v) -> bool:
    return type(v) is int


#: the type of each common field: name -> (check, what it must be)
_FIELD_TYPES = {
    "weights": (lambda v: isinstance(v, str), "a format name"),
    "activations": (lambda v: v is None or isinstance(v, str), "a format name or None"),
    "group_size": (lambda v: v is None or _int(v), "a positive integer or None"),
    "pad": (lambda v: isinstance(v, str), "'pad' or 'skip'"),
    "calib_rows": (_int, "a positive integer"),
    "seed": (_int, "an integer"),
    "kernel": (lambda v: isinstance(v, str), "a kernel name"),
    "weight_rounding": (lambda v: isinstance(v, str), "'rtn', 'gptq' or 'gptq_static'"),
    "gptq_damp": (_is_number, "a number > 0"),
    "include": (lambda v: all(isinstance(p, str) for p in v), "fnmatch patterns (strings)"),
    "exclude": (lambda v: all(isinstance(p, str) for p in v), "fnmatch patterns (strings)"),
    "overrides": (lambda v: isinstance(v, dict), "a dict {pattern: {field: value}}"),
    "refine_iters": (_int, "an integer >= 0"),
    "smooth": (lambda v: isinstance(v, bool), "True or False"),
    "act_signed": (lambda v: isinstance(v, bool), "True or False"),
}


def _check_types(cfg: "QuantConfig") -> None:
    for f in dataclasses.fields(cfg):
        check = _FIELD_TYPES.get(f.name)
        if check is not None and not check[0](getattr(cfg, f.name)):
            raise ValueError(f"{f.name} must be {check[1]}, got {getattr(cfg, f.name)!r}")


CONFIGS: dict[str, type[QuantConfig]] = {}


def register_config(cls: type[QuantConfig]) -> type[QuantConfig]:
    """Make a config class known to ``QuantConfig.from_dict`` (used when loading checkpoints)."""
    CONFIGS[cls.method] = cls
    return cls


for _cls in (RTNConfig, SmoothQuantConfig, SVDConfig, LoRCConfig, SVDQuantConfig, NF4Config, QuaRTZConfig,
             SVDQuantQuaRTZConfig):
    register_config(_cls)
