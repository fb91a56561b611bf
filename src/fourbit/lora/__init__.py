"""LoRAs on quantized models without re-quantization (``docs/lora.md``).

    import fourbit.lora
    fourbit.lora.apply(model, "style.safetensors", name="style", strength=0.8)
    fourbit.lora.set_strength(model, "style", 0.5)
    fourbit.lora.list(model)     # [{"name": "style", "strength": 0.5, ...}]
    fourbit.lora.remove(model, "style")
"""
from .api import apply, list, remove, set_strength  # noqa: A004
from .keys import LoraModule, parse_lora, read_lora
from .names import ALIASES

__all__ = ["apply", "set_strength", "remove", "list", "parse_lora", "read_lora", "LoraModule", "ALIASES"]
