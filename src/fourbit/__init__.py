"""fourbit: 4-bit post-training quantization (weights and activations) for diffusion models.

    import fourbit
    cfg = fourbit.SVDQuantConfig(weights="int4", activations="int4", group_size=64, rank=32)
    fourbit.quantize(model, cfg, forward_loop=run_calibration)
    fourbit.save(model, "model.fourbit.safetensors")
    fourbit.load(build_model(), "model.fourbit.safetensors")
"""
__version__ = "0.1.0"

from .config import (LoRCConfig, NF4Config, QuantConfig, RTNConfig, SmoothQuantConfig,  # noqa: E402
                     SVDConfig, SVDQuantConfig)
from .config import QuaRTZConfig, SVDQuantQuaRTZConfig  # noqa: E402
from .api import quantize  # noqa: E402
from .checkpoint import CheckpointError, load, read_header, save  # noqa: E402
from .siblings import find_siblings, fuse_siblings  # noqa: E402
from .precision_plan import PrecisionPlan, plan_precision  # noqa: E402

_PIPELINES = ("quantize_pipeline", "plan_pipeline", "compile_pipeline", "save_pretrained", "from_pretrained")


def __getattr__(name):  # the diffusers entry points load on first use: `import fourbit` stays light
    if name in _PIPELINES or name == "pipelines":
        import importlib

        pipelines = importlib.import_module(f"{__name__}.pipelines")
        return pipelines if name == "pipelines" else getattr(pipelines, name)
    raise AttributeError(f"module 'fourbit' has no attribute {name!r}")


__all__ = ["quantize", "quantize_pipeline", "plan_pipeline", "compile_pipeline", "save_pretrained", "from_pretrained", "save", "load", "read_header", "CheckpointError", "find_siblings", "fuse_siblings", "plan_precision", "PrecisionPlan", "QuantConfig", "RTNConfig",
           "SmoothQuantConfig", "SVDConfig", "LoRCConfig", "SVDQuantConfig", "NF4Config", "QuaRTZConfig",
           "SVDQuantQuaRTZConfig", "__version__"]
