"""``quantize_pipeline``: quantize a diffusers pipeline's denoiser by running the pipeline itself.

The calibration loop calls the pipeline over the prompts (``output_type="latent"``, a seeded CPU generator per
prompt), so the denoiser sees exactly what it sees in use: with classifier-free guidance both branches (the
pipelines batch them), every timestep of the schedule. Then ``fourbit.quantize`` converts layer by layer.

Under torchrun (``collective=ranks``) each process runs its share of the prompts, prompt i always with seed
``seed + i`` and always in its own pipeline call, so every call is the same as in one process; the statistics are
merged exactly by ``fourbit.quantize`` and every process ends with the same quantized denoiser.
"""
from __future__ import annotations

import hashlib
import json
import resource
import sys
from importlib import resources
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..api import architecture_fingerprint, quantize
from ..config import QuantConfig
from ..utils.progress import Progress
from . import compat
from .presets import Preset, apply_preset, find_preset, unmatched_patterns

#: pipeline components tried, in order, when ``component`` is not given
DENOISERS = ("transformer", "unet", "prior", "decoder")

Prompt = Union[str, dict]


def bundled_prompts(n: Optional[int] = None) -> list[str]:
    """The first ``n`` (all if None) of the bundled calibration prompts (varied subjects, styles, lighting)."""
    text = resources.files("fourbit.pipelines").joinpath("prompts.txt").read_text(encoding="utf-8")
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return prompts if n is None else prompts[:n]


def read_prompts(path) -> list[str]:
    """Prompts from a text file, one per line (blank lines and lines starting with # skipped)."""
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    if not prompts:
        raise ValueError(f"{path}: no prompts (one per line expected)")
    return prompts


def find_denoiser(pipe, component: Optional[str] = None) -> tuple[str, nn.Module]:
    """(name, module) of the pipeline's denoiser: ``component`` if given, else the first of ``DENOISERS``."""
    comps = getattr(pipe, "components", None)
    if not isinstance(comps, dict):
        raise TypeError(f"quantize_pipeline needs a diffusers pipeline (an object with .components), got "
                        f"{type(pipe).__name__}; quantize a single model with fourbit.quantize(model, config, loop)")
    if component is not None:
        if not isinstance(comps.get(component), nn.Module):
            raise ValueError(f"the pipeline has no model component {component!r}; its components: "
                             f"{', '.join(k for k, v in comps.items() if isinstance(v, nn.Module))}")
        return component, comps[component]
    for name in DENOISERS:
        if isinstance(comps.get(name), nn.Module):
            return name, comps[name]
    raise ValueError(f"found no denoiser ({', '.join(DENOISERS)}) among the pipeline's components "
                     f"({', '.join(comps)}); pass component=NAME")


def memory_note() -> str:
    """Peak memory so far: GPU (allocated by torch) when CUDA is in use, else the process's peak RSS."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    return f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"


def prompt_indices(n: int, ranks=None) -> list[int]:
    """The prompts (of ``n``) this process runs: all of them, or under torchrun its share of single-prompt
    batches (``Ranks.shard(n, 1)``: prompt i on rank i mod N)."""
    if ranks is None or ranks.world_size == 1:
        return list(range(n))
    return [s.start for s in ranks.shard(n, 1)]


def pipeline_forward_loop(pipe, prompts: Sequence[Prompt], *, num_inference_steps: int = 4,
                          guidance_scale: Optional[float] = None, seed: int = 0, call_kwargs: Optional[dict] = None,
                          progress: bool = True, ranks=None):
    """A ``forward_loop`` for ``fourbit.quantize`` that runs ``pipe`` once per prompt. A prompt is a string or a
    dict of pipeline arguments (``prompt_embeds=...``, ``negative_prompt_embeds=...``, ...). ``ranks``
    (``fourbit.distributed.Ranks``): run only this process's prompts, each still with its global seed."""
    if not prompts:
        raise ValueError("no calibration prompts; pass prompts=[...] (strings or dicts of pipeline arguments)")
    mine = prompt_indices(len(prompts), ranks)

    def loop(_model):
        saved = dict(getattr(pipe, "_progress_bar_config", {}))
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)
        try:
            with Progress(len(mine), "fourbit calibration prompts", enabled=progress) as bar:
                for i in mine:
                    p = prompts[i]
                    kw = {**(call_kwargs or {}), **(p if isinstance(p, dict) else {"prompt": p})}
                    kw.setdefault("num_inference_steps", num_inference_steps)
                    if guidance_scale is not None:
                        kw.setdefault("guidance_scale", guidance_scale)
                    kw["generator"] = torch.Generator().manual_seed(seed + i)
                    kw["output_type"] = "latent"
                    pipe(**kw)
                    bar.update(1, note=memory_note())
        finally:
            if hasattr(pipe, "_progress_bar_config"):
                pipe._progress_bar_config = saved
    return loop


def quantize_pipeline(pipe, config: QuantConfig, prompts: Optional[Sequence[Prompt]] = None, *,
                      num_inference_steps: int = 4, guidance_scale: Optional[float] = None,
                      component: Optional[str] = None, preset: Optional[str] = None, seed: int = 0,
                      call_kwargs: Optional[dict] = None, convert_device=None, work_dir=None, store=None,
                      progress: bool = True, verbose: bool = True, collective=None, siblings: bool = False):
    """Quantize ``pipe``'s denoiser in place by running ``pipe`` over ``prompts``; returns ``pipe``.

    prompts: strings, or dicts of pipeline arguments (precomputed ``prompt_embeds`` ...); None = 32 bundled
    prompts. component: "transformer"/"unet"/... (found automatically). preset: a name from
    ``fourbit.pipelines.PRESETS`` ("flux", ..., "generic", "none"; default: by the denoiser's class), merged
    into ``config`` (the config's own patterns win). call_kwargs: more arguments for every pipeline call
    (``height``, ``width``, ...). convert_device: run each layer's conversion there (e.g. "cuda"). work_dir:
    make the run resumable (see ``fourbit.pipelines.resume``); store: any other ``fourbit.quantize`` store
    instead. collective: ``fourbit.distributed.Ranks`` under torchrun: each process calibrates on its share of
    the prompts, the statistics are merged exactly and every process gets the same denoiser (only rank 0 reports;
    the caller lets rank 0 write). siblings: first fuse the layers that read one input (Q/K/V: one activation
    quantization and one wider GEMM; ``fuse_pipeline_siblings``), unless the denoiser is fused already. The
    report is at ``denoiser.fourbit_report``.
    """
    several = collective is not None and collective.world_size > 1
    if several and (work_dir is not None or store is not None):
        raise ValueError("a resumable work folder cannot be shared by several processes; run the resumable "
                         "quantization in one process, or drop work_dir/store under torchrun")
    if several and not collective.is_root:
        progress = verbose = False
    name, model = find_denoiser(pipe, component)
    chosen: Preset = find_preset(model, preset)
    full = apply_preset(config, chosen)
    say = (lambda msg: print(f"fourbit: {msg}", file=sys.stderr)) if verbose else (lambda msg: None)
    say(f"{name} ({type(model).__name__}): preset '{chosen.name}'"
        + ("" if chosen.classes or chosen.name == "none" else " (class not in the preset table: the safe default)")
        + f"; 16-bit: {', '.join(chosen.keep) or 'none'}; W4A16: {', '.join(chosen.w4a16) or 'none'}")
    prompts = bundled_prompts(32) if prompts is None else prompts if isinstance(prompts, list) else list(prompts)
    if siblings:  # first: a plan made on the fused denoiser names the fused layers
        fuse_pipeline_siblings(pipe, full, prompts[0] if prompts else None, component=name,
                               guidance_scale=guidance_scale, call_kwargs=call_kwargs, seed=seed, say=say)
    unmatched = unmatched_patterns((n for n, _ in model.named_modules()), config, chosen)
    for pattern, where in unmatched.items():
        say(f"pattern {pattern!r} ({where}) matches no layer of {type(model).__name__}")
    loop = pipeline_forward_loop(pipe, prompts, num_inference_steps=num_inference_steps,
                                 guidance_scale=guidance_scale, seed=seed, call_kwargs=call_kwargs,
                                 progress=progress, ranks=collective)
    if work_dir is not None and store is not None:
        raise ValueError("pass work_dir or store, not both")
    if work_dir is not None:
        from .resume import WorkFolder

        store = WorkFolder(work_dir, {
            "config": full.to_dict(), "architecture": architecture_fingerprint(model), "component": name,
            "calibration": {"prompts": _digest_prompts(prompts), "steps": num_inference_steps,
                            "guidance_scale": guidance_scale, "seed": seed,
                            "call_kwargs": _digest_prompts([call_kwargs or {}])}})
    quantize(model, full, forward_loop=loop, progress=progress, verbose=verbose, convert_device=convert_device,
             store=store, collective=collective)
    if work_dir is not None and (store.stats_loaded or store.layers_loaded):
        say(f"resumed from {work_dir}: " + ("calibration statistics and " if store.stats_loaded else "")
            + f"{store.layers_loaded} converted layer(s) reused")
    report = model.fourbit_report
    report.preset, report.unmatched_patterns = chosen.name, unmatched
    model.fourbit_header.setdefault("extra", {})["pipeline"] = {
        "component": name, "class": type(model).__name__, "preset": chosen.name, "prompts": len(prompts),
        "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale, "seed": seed}
    say(f"calibration {report.calibration_seconds:.1f}s, conversion {report.convert_seconds:.1f}s, {memory_note()}")
    compat.install(model)
    return pipe


def fuse_pipeline_siblings(pipe, config: Optional[QuantConfig] = None, prompt: Optional[Prompt] = None, *,
                           component: Optional[str] = None, guidance_scale: Optional[float] = None,
                           call_kwargs: Optional[dict] = None, seed: int = 0, say=None) -> list:
    """Fuse the denoiser's sibling linears (``fourbit.find_siblings`` over one one-step pipeline call, then
    ``fuse_siblings``; exact in 16 bits) and return the groups; nothing if it is fused already. ``config``: only
    layers it quantizes, grouped with layers it quantizes the same way."""
    from ..siblings import find_siblings, fuse_siblings

    name, model = find_denoiser(pipe, component)
    if getattr(model, "fourbit_siblings", None):
        return []
    loop = pipeline_forward_loop(pipe, [bundled_prompts(1)[0] if prompt is None else prompt], num_inference_steps=1,
                                 guidance_scale=guidance_scale, seed=seed, call_kwargs=call_kwargs, progress=False)
    with torch.no_grad():
        groups = find_siblings(model, loop, config=config)
    fuse_siblings(model, groups)
    if say is not None:
        say(f"{name}: fused {len(groups)} sibling groups ({sum(len(g) for g in groups)} layers)")
    return groups


def _digest_prompts(prompts: Sequence) -> str:
    """A hash of the prompts (strings, or dicts holding tensors) identifying a calibration set."""
    h = hashlib.sha256()
    for p in prompts:
        items = p.items() if isinstance(p, dict) else [("prompt", p)]
        for k, v in sorted(items, key=lambda kv: kv[0]):
            h.update(k.encode())
            if isinstance(v, torch.Tensor):
                t = v.detach().contiguous().cpu()
                h.update(str((t.dtype, list(t.shape))).encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            else:
                h.update(json.dumps(v, default=str).encode())
    return h.hexdigest()[:16]
