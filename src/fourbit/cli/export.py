"""``fourbit export``: write a fourbit checkpoint in another engine's layout."""
from __future__ import annotations

from . import command


@command("export", "write a fourbit checkpoint in another engine's layout (nunchaku)")
def _export(p):
    p.add_argument("--format", required=True, choices=["nunchaku"], help="the target layout")
    p.add_argument("--model-config", required=True,
                   help="the 16-bit model's diffusers config.json (with _class_name), to build the skeleton")
    p.add_argument("input", help="a fourbit checkpoint (fourbit.save)")
    p.add_argument("output", help="the .safetensors file to write")


def _run_export(args) -> int:
    import json
    from pathlib import Path

    import torch

    import fourbit
    from ..export import export_nunchaku

    cfg = json.loads(Path(args.model_config).read_text())
    cls_name = cfg.get("_class_name")
    try:
        import diffusers

        cls = getattr(diffusers, cls_name)
    except (ImportError, AttributeError, TypeError):
        raise ValueError(f"{args.model_config}: _class_name {cls_name!r} is not a diffusers model class; pass the "
                         f"diffusers config.json of the model the checkpoint was quantized from") from None
    with torch.device("meta"):
        model = cls.from_config(cfg)
    fourbit.load(model, args.input)
    report = export_nunchaku(model, args.output)
    print(f"wrote {report['path']}: {report['layers']} quantized layers, {report['tensors']} tensors ({report['dtype']}); "
          f"16-bit storage rounded {report['smooth_values_rounded']} smoothing factors and "
          f"{report['down_values_rounded']} lr_down values")
    return 0


_export.run = _run_export
