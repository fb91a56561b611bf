"""Guard against a quantized model's own ``save_pretrained`` (diffusers, transformers): it would write the
packed 4-bit buffers under names the library's loader drops, and a reload would re-initialise those layers
randomly, silently. Set on the instance by ``fourbit.quantize`` and ``fourbit.load``."""
from __future__ import annotations


def _refuse(*_args, **_kwargs):
    raise ValueError("this model is quantized by fourbit and its own save_pretrained would lose the 4-bit layers; "
                     "save it with fourbit.save_pretrained(model, directory) (or fourbit.save(model, path))")


_refuse.fourbit_guard = True


def guard_foreign_save(model) -> None:
    """Make ``model.save_pretrained(...)`` refuse in one sentence, if the model has such a method and fourbit
    has not already put its own there."""
    current = getattr(model, "save_pretrained", None)
    if callable(current) and not getattr(current, "fourbit_guard", False):
        model.save_pretrained = _refuse
