"""One denoising step of the full-size FLUX.1 transformer at 1024x1024: bf16 vs fourbit W4A4.

    python benchmarks/transformer.py            # H100/H200; needs diffusers (carry its wheel to the GPU box)
    python benchmarks/transformer.py --tiny     # a few-layer model on CPU with the reference kernel (smoke test)

Model: diffusers' ``FluxTransformer2DModel`` with FLUX.1-dev's published config (19 double blocks, 38 single
blocks, 24 heads x 128, in_channels 64, joint_attention_dim 4096, pooled_projection_dim 768, guidance
embeddings), random bf16 weights. Inputs: 4096 image tokens (64x64 latent patches) + 512 text tokens, batch 1.
Random weights say nothing about image quality, only about speed and memory.

Quantization: ``fourbit.quantize(model, RTNConfig(weights="int4p2", activations="int4p2"))`` on every
nn.Linear (RTN needs no calibration, so it runs on the GPU in seconds). RTN has no low-rank branch; to time
what an SVDQuant checkpoint runs, each layer then gets synthetic rank-32 factors and smoothing factors
(``--rank 0`` skips them). Then the step is timed in memory mode ("triton-memory": 4-bit weights at rest,
expanded per layer) and speed mode ("triton": FP8 weights cached).
Reported: median step latency (CUDA events, after warm-up) of eager calls and of CUDA-graph replays (no
Python launch overhead: what ``torch.compile(mode="reduce-overhead")`` or a captured sampler loop runs), peak
allocated memory during an eager step, and the bytes of weights (parameters + buffers; speed mode adds the
cached FP8 operands). With ``--compile`` every model is also timed with its blocks under ``torch.compile``, and each
W4A4 model a second time with ``fourbit.nn.inductor_options()`` (the fusion pass: GELU in the GEMM epilogue,
concatenations read in place; ``--no-fusion`` skips that); ``--profile`` adds CUDA time by kernel kind and the top
kernels of each compiled step. Those timings run one model after the other; the headline ratio is then re-measured
with both resident: a fresh bf16 model and the W4A4 model (speed mode, fusion pass), both compiled, their CUDA graphs
replayed in alternation (``interleaved_headline``), so clock and temperature drift touch both alike.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import (KERNEL_CATEGORY_NAMES, ClockSampler, InterleavedGraphs, add_synthetic_branch,  # noqa: E402
                   capture_graph, environment, md_table, profile_step, replay_median, time_graph, write_results)

FLUX_DEV = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
                attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
TINY = dict(patch_size=1, in_channels=16, out_channels=None, num_layers=1, num_single_layers=1,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32,
            guidance_embeds=True, axes_dims_rope=(4, 6, 6))


def build(cfg, device, dtype=torch.bfloat16, seed=0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in bf16 directly on the device: no fp32 copy of 12B parameters
    try:
        with torch.device(device):
            model = FluxTransformer2DModel(**cfg)
    finally:
        torch.set_default_dtype(old)
    return model.to(device=device, dtype=dtype).eval()


def make_inputs(cfg, device, image_tokens, text_tokens, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    side = int(image_tokens ** 0.5)
    img_ids = torch.zeros(side, side, 3, device=device)
    img_ids[..., 1] = torch.arange(side, device=device)[:, None]
    img_ids[..., 2] = torch.arange(side, device=device)[None, :]
    return dict(
        hidden_states=torch.randn(1, image_tokens, cfg["in_channels"], device=device, generator=g).to(dtype),
        encoder_hidden_states=torch.randn(1, text_tokens, cfg["joint_attention_dim"], device=device,
                                          generator=g).to(dtype),
        pooled_projections=torch.randn(1, cfg["pooled_projection_dim"], device=device, generator=g).to(dtype),
        timestep=torch.tensor([0.5], device=device, dtype=dtype),
        guidance=torch.tensor([3.5], device=device, dtype=dtype),
        img_ids=img_ids.reshape(-1, 3),
        txt_ids=torch.zeros(text_tokens, 3, device=device),
        return_dict=False,
    )


def model_bytes(model) -> int:
    """Parameters + buffers (the quantized layers' codes, scales, smoothing and low-rank factors)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def cached_operand_bytes(model) -> int:
    """Bytes of the speed-mode caches (FP8 weight operands) held by the quantized layers."""
    from fourbit.nn import quantized_layers

    total = 0
    for _, layer in quantized_layers(model):
        st = layer._cache.get("fourbit.kernels.linear")
        if st is not None and st.weight is not None:
            total += st.weight.nbytes()
    return total


def linear_bytes_bf16(model) -> int:
    return sum(m.weight.numel() * m.weight.element_size() + (0 if m.bias is None else m.bias.numel() * 2)
               for m in model.modules() if isinstance(m, torch.nn.Linear))


@torch.inference_mode()
def time_step(model, inputs, warmup=2, steps=5, device="cuda"):
    if device != "cuda":
        t0 = time.perf_counter()
        out = model(**inputs)[0]
        return (time.perf_counter() - t0) * 1e3, 0, out
    for _ in range(warmup):
        out = model(**inputs)[0]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        out = model(**inputs)[0]
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    peak = torch.cuda.max_memory_allocated()
    return statistics.median(times), peak, out


@torch.inference_mode()
def time_step_graph(model, inputs, steps=5):
    """Median ms of CUDA-graph replays of one step (``_util.time_graph``: no Python/launch overhead), or None if
    capture fails."""
    try:
        return time_graph([lambda: model(**inputs)], replays=steps, min_calls=1)
    except Exception as e:  # report, do not lose the eager numbers
        print(f"CUDA graph capture failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
        return None
    finally:
        torch.cuda.empty_cache()


def compile_blocks(model, on=True, options=None, reset=True):
    """Regional torch.compile (inductor, default mode) of every transformer block, or undo it. The blocks of a
    kind share one compiled graph; fourbit's quantized layers are custom ops in it (``prepare_kernels``; formats
    without a Triton path break the graph), and inductor fuses the code around them: norms, modulation, GELU,
    RoPE, gates, residuals. ``options``: inductor options (``fourbit.nn.inductor_options()``: the fusion pass).
    ``reset=False`` keeps what dynamo compiled before (another model compiled and in use beside this one)."""
    import torch._dynamo

    from fourbit.nn.compiling import raise_compile_cache_limits

    if reset:
        torch._dynamo.reset()
    raise_compile_cache_limits()
    for blocks in (model.transformer_blocks, model.single_transformer_blocks):
        for blk in blocks:
            if on:
                blk.compile(options=options) if options else blk.compile()
            else:
                blk._compiled_call_impl = None


def timed_compile(model, inputs, device, options=None, reset=True):
    """Compile the blocks and run one step (compilation happens here); returns the seconds it took."""
    from fourbit.nn import prepare_kernels

    t0 = time.perf_counter()
    # quantized layers become custom ops in the graphs (no graph breaks); the step seen once, so that the single-row
    # (GEMV) layers keep no FP8 operand
    prepare_kernels(model, forward_loop=lambda m: m(**inputs))
    compile_blocks(model, True, options, reset)
    with torch.inference_mode():
        model(**inputs)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def compiled(model, inputs, args, device, log, name, options=None):
    """Step times with the blocks compiled (then uncompiled again): eager, CUDA graph, optional profile (with the
    top kernels). ``options``: inductor options."""
    from fourbit.kernels.fusion import fusion_stats

    try:
        before = fusion_stats()
        secs = timed_compile(model, inputs, device, options)
        ms, _, _ = time_step(model, inputs, steps=args.steps, device=device)
        graph_ms = None if device != "cuda" else time_step_graph(model, inputs, steps=args.steps)
        out = dict(compile_seconds=secs, compiled_step_ms=ms, compiled_graph_step_ms=graph_ms,
                   compiled_cached_operand_bytes=cached_operand_bytes(model))
        if options:
            after = fusion_stats()
            out["fused_in_graphs"] = {k: after.get(k, 0) - before.get(k, 0) for k in after}
            log(f"{name}: fusion pass rewrites in the compiled graphs: {out['fused_in_graphs']}")
        if args.profile and device == "cuda":
            top = []
            out["compiled_profile_ms"] = profile_step(model, inputs, top)
            out["compiled_top_kernels"] = top
            log(f"{name} compiled profile (ms): "
                f"{json.dumps({k: round(v, 2) for k, v in out['compiled_profile_ms'].items()})}")
            log(f"{name} compiled, top kernels (name, ms, calls): " + "; ".join(f"{k} {v} {c}" for k, v, c in top))
        log(f"{name} compiled (blocks, inductor; compile+first step {secs:.0f}s): {ms:.1f} ms/step eager, "
            f"{graph_ms} ms/step CUDA graph, speed-mode operands {out['compiled_cached_operand_bytes'] / 2**30:.2f} GiB")
    except Exception as e:  # torch.compile failing must not lose the other numbers
        log(f"{name}: torch.compile FAILED: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
        out = dict(compile_error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
    finally:
        compile_blocks(model, False)
    return out


def interleaved_headline(model, inputs, cfg, log, rounds=10):
    """The headline ratio with both models resident: the W4A4 model (its current mode) compiled with the fusion pass,
    and a fresh bf16 model (the same seed: the same weights) compiled the default way; their CUDA graphs of one step
    replayed in alternation for ``rounds`` rounds (median ms each), so GPU clock and temperature drift touch both
    alike (the per-model timings above run one model after the other). Then each graph alone (back to back, as the
    sequential tables time it) and the alternation again, with the SM clock and power sampled in each phase."""
    from fourbit.nn import inductor_options

    models, graphs = {"w4a4": model}, {}  # emptied at the end, so that empty_cache can give their memory back
    try:
        timed_compile(model, inputs, "cuda", inductor_options())
        models["bf16"] = build(cfg, "cuda")
        timed_compile(models["bf16"], inputs, "cuda", reset=False)  # keeps the W4A4 model's compiled code
        with torch.inference_mode():
            for key in ("bf16", "w4a4"):
                graphs[key] = capture_graph([lambda m=models[key]: m(**inputs)], min_calls=1)
        phases = {}

        def interleave(name):
            timer = InterleavedGraphs()
            for g, calls in graphs.values():
                timer.add_captured(g, calls, keep=models)
            with ClockSampler() as clocks:
                times = timer.run(rounds)
            phases[name] = dict(zip(graphs, times), gpu=clocks.summary)  # (summary: filled on leaving the block)

        def alone(key):  # the same graph replayed back to back, as the sequential tables above time it
            with ClockSampler() as clocks:
                ms = replay_median(*graphs[key], rounds)
            phases[f"{key} alone"] = {key: ms, "gpu": clocks.summary}

        interleave("interleaved")
        alone("w4a4")
        alone("bf16")
        interleave("interleaved again")
        ms_bf16, ms_w4 = phases["interleaved"]["bf16"], phases["interleaved"]["w4a4"]
        out = dict(rounds=rounds, bf16_compiled_graph_ms=ms_bf16, w4a4_fusion_compiled_graph_ms=ms_w4,
                   speedup=ms_bf16 / ms_w4, phases=phases)
        for name, ph in phases.items():
            sm = ph["gpu"].get("clocks.sm", {})
            pw = ph["gpu"].get("power.draw", {})
            log(f"{name}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in ph.items() if k != "gpu")
                + (f"; SM clock mean {sm['mean']:.0f} MHz (min {sm['min']:.0f}), power mean {pw.get('mean', 0):.0f} W"
                   if sm else ""))
    except Exception as e:  # report, do not lose the other numbers
        log(f"interleaved timing FAILED: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
        out = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
    finally:
        compile_blocks(model, False)
        if "bf16" in models:
            compile_blocks(models["bf16"], False, reset=False)
        graphs.clear()
        models.clear()
        torch.cuda.empty_cache()
    return out


def main(argv=None):
    import fourbit
    from fourbit.nn import set_kernel

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--tiny", action="store_true", help="tiny model, CPU, reference kernel (smoke test)")
    p.add_argument("--weights", default="int4p2")
    p.add_argument("--activations", default="int4p2")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="also break one step's CUDA time down by kernel kind")
    p.add_argument("--compile", action="store_true", help="also time every model with its blocks under "
                   "torch.compile (inductor; quantized layers kept out of the graph)")
    p.add_argument("--fuse-siblings", action="store_true",
                   help="fuse linears that read the same input (Q/K/V, single-block proj_mlp) into one layer "
                        "before quantizing (fourbit.fuse_siblings); bf16 is also timed fused, as the fair baseline")
    p.add_argument("--no-fusion", action="store_true", help="with --compile: do not also time the W4A4 models "
                   "compiled with fourbit.nn.inductor_options() (GELU into the GEMM epilogue, concatenations read "
                   "in place)")
    p.add_argument("--blocks", default=None, help="D,S: only D double and S single blocks (a quick check; "
                   "its rows carry variant <D>x<S>)")
    args = p.parse_args(argv)
    env = environment()
    print(json.dumps(env), flush=True)
    tiny = args.tiny or not torch.cuda.is_available()
    cfg, device = (TINY, "cpu") if tiny else (FLUX_DEV, "cuda")
    if args.blocks:
        d, s_ = (int(v) for v in args.blocks.split(","))
        cfg = dict(cfg, num_layers=d, num_single_layers=s_)
    img, txt = (64, 8) if tiny else (4096, 512)
    log = lambda s: print(s, flush=True)  # noqa: E731

    t0 = time.perf_counter()
    model = build(cfg, device)
    inputs = make_inputs(cfg, device, img, txt)
    log(f"built FluxTransformer2DModel ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params) "
        f"in {time.perf_counter() - t0:.1f}s")
    res = {"config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
           "image_tokens": img, "text_tokens": txt, "weights": args.weights, "activations": args.activations,
           "rank": args.rank}
    bf16_bytes = model_bytes(model)
    res["bf16"] = dict(bytes=bf16_bytes, linear_bytes=linear_bytes_bf16(model))
    ms, peak, y_bf16 = time_step(model, inputs, steps=args.steps, device=device)
    graph_ms = None if tiny else time_step_graph(model, inputs, steps=args.steps)
    res["bf16"].update(step_ms=ms, peak_bytes=peak, graph_step_ms=graph_ms)
    if args.profile and not tiny:
        res["bf16"]["profile_ms"] = profile_step(model, inputs)
        log(f"bf16 profile (ms): {json.dumps({k: round(v, 2) for k, v in res['bf16']['profile_ms'].items()})}")
    log(f"bf16: {ms:.1f} ms/step eager, {graph_ms} ms/step CUDA graph, peak {peak / 2**30:.2f} GiB, "
        f"weights {bf16_bytes / 2**30:.2f} GiB")
    if args.compile:
        res["bf16"].update(compiled(model, inputs, args, device, log, "bf16"))

    qcfg = fourbit.RTNConfig(weights=args.weights, activations=args.activations,
                             kernel="reference" if tiny else "triton-memory")
    if args.fuse_siblings:
        with torch.inference_mode():
            groups = fourbit.find_siblings(model, lambda m: m(**inputs), config=qcfg)
        fourbit.fuse_siblings(model, groups)
        res["sibling_groups"] = len(groups)
        ms, peak, y_fused = time_step(model, inputs, steps=args.steps, device=device)
        graph_ms = None if tiny else time_step_graph(model, inputs, steps=args.steps)
        err = float((y_fused.float() - y_bf16.float()).norm() / y_bf16.float().norm())
        res["bf16_fused"] = dict(step_ms=ms, graph_step_ms=graph_ms, peak_bytes=peak, rel_diff_vs_bf16=err)
        log(f"bf16 with {len(groups)} sibling groups fused: {ms:.1f} ms/step eager, {graph_ms} ms/step CUDA graph "
            f"(rel. diff vs unfused {err:.1e})")
        if args.compile:
            res["bf16_fused"].update(compiled(model, inputs, args, device, log, "bf16 fused"))
    t0 = time.perf_counter()
    fourbit.quantize(model, qcfg, progress=False, verbose=False)
    if device == "cuda":
        torch.cuda.synchronize()
    res["quantize_seconds"] = time.perf_counter() - t0
    log(f"fourbit.quantize (RTN, {len(model.fourbit_report.layers)} layers) took {res['quantize_seconds']:.1f}s")
    if args.rank:
        add_synthetic_branch(model, args.rank)
    if device == "cuda":
        torch.cuda.empty_cache()
    q_bytes = model_bytes(model)
    modes = [("memory", "triton-memory"), ("speed", "triton")] if not tiny else [("reference", "reference")]
    for mode, kernel in modes:
        set_kernel(model, kernel)
        ms, peak, y = time_step(model, inputs, steps=args.steps, device=device)
        cache = cached_operand_bytes(model)
        graph_ms = None if tiny else time_step_graph(model, inputs, steps=args.steps)
        err = float((y.float() - y_bf16.float()).norm() / y_bf16.float().norm())
        prof = profile_step(model, inputs) if args.profile and not tiny else None
        if prof:
            log(f"{mode} profile (ms): {json.dumps({k: round(v, 2) for k, v in prof.items()})}")
        base_graph = res["bf16"]["graph_step_ms"]
        comp = compiled(model, inputs, args, device, log, mode) if args.compile else {}
        if args.compile and not args.no_fusion and not tiny:
            from fourbit.nn import inductor_options

            res[f"{mode}_fusion"] = compiled(model, inputs, args, device, log, f"{mode} + fusion", inductor_options())
        res[mode] = dict(**comp, kernel=kernel, step_ms=ms, graph_step_ms=graph_ms, peak_bytes=peak, bytes=q_bytes + cache,
                         cached_operand_bytes=cache, speedup=res["bf16"]["step_ms"] / ms,
                         graph_speedup=None if not (graph_ms and base_graph) else base_graph / graph_ms,
                         weight_ratio=bf16_bytes / (q_bytes + cache), finite=bool(torch.isfinite(y).all()),
                         rel_diff_vs_bf16_random_weights=err, profile_ms=prof)
        log(f"{mode} ({kernel}): {ms:.1f} ms/step eager ({res[mode]['speedup']:.2f}x), {graph_ms} ms/step graph "
            f"({res[mode]['graph_speedup']}x), peak {peak / 2**30:.2f} GiB, "
            f"weights {(q_bytes + cache) / 2**30:.2f} GiB (1/{res[mode]['weight_ratio']:.2f} of bf16)")

    if args.compile and not args.no_fusion and not tiny:
        res["interleaved"] = interleaved_headline(model, inputs, cfg, log)

    def f(v, spec=".1f"):
        return "-" if v is None else format(v, spec)

    rows = [["bf16", f(res["bf16"]["graph_step_ms"]), "1.00", f(res["bf16"]["step_ms"]), "1.00",
             f"{res['bf16']['peak_bytes'] / 2**30:.2f}", f"{bf16_bytes / 2**30:.2f}", "1"]]
    if "bf16_fused" in res:
        r = res["bf16_fused"]
        rows.append([f"bf16, {res['sibling_groups']} sibling groups fused", f(r["graph_step_ms"]),
                     f(None if not (r["graph_step_ms"] and res["bf16"]["graph_step_ms"])
                       else res["bf16"]["graph_step_ms"] / r["graph_step_ms"], ".2f"), f(r["step_ms"]),
                     f(res["bf16"]["step_ms"] / r["step_ms"], ".2f"), f"{r['peak_bytes'] / 2**30:.2f}", "-", "-"])
    for mode, _ in modes:
        r = res[mode]
        rows.append([f"W4A4 {args.weights}/{args.activations} r{args.rank}, {mode} mode", f(r["graph_step_ms"]),
                     f(r["graph_speedup"], ".2f"), f(r["step_ms"]), f(r["speedup"], ".2f"),
                     f"{r['peak_bytes'] / 2**30:.2f}", f"{r['bytes'] / 2**30:.2f}", f"1/{r['weight_ratio']:.2f}"])
    md = (f"FLUX.1-dev transformer, random bf16 weights, 1 step at 1024x1024 ({img} image + {txt} text tokens), "
          f"fourbit.quantize RTN took {res['quantize_seconds']:.1f}s. Step time: median of {args.steps} CUDA-graph "
          f"replays ('graph') and of {args.steps} eager calls ('eager'); peak = max allocated during eager steps.\n\n"
          + md_table(["model", "graph ms", "graph speed-up", "eager ms", "eager speed-up", "peak GiB",
                      "weights GiB", "weights vs bf16"], rows))
    if args.compile:
        b = res["bf16"]
        crow = []
        names = [mode for mode, _ in modes] + [f"{mode}_fusion" for mode, _ in modes if f"{mode}_fusion" in res]
        for name in ["bf16"] + (["bf16_fused"] if "bf16_fused" in res else []) + names:
            r = res[name]
            cg = r.get("compiled_graph_step_ms")
            crow.append([name, f(r.get("graph_step_ms")), f(cg), f(r.get("compiled_step_ms")),
                         f(None if not (cg and b.get("graph_step_ms")) else b["graph_step_ms"] / cg, ".2f"),
                         f(None if not (cg and b.get("compiled_graph_step_ms")) else b["compiled_graph_step_ms"] / cg,
                           ".2f"), f(r.get("compile_seconds"), ".0f"), r.get("compile_error", "")])
        md += ("\nWith every transformer block under torch.compile (inductor, default mode; fourbit's layers are "
               "custom ops in the graphs), step time in ms:\n\n"
               + md_table(["model", "graph (not compiled)", "compiled + graph", "compiled eager",
                           "speed-up vs bf16 graph", "speed-up vs bf16 compiled + graph", "compile s", "error"], crow))
    il = res.get("interleaved")
    if il and "speedup" in il:
        md += (f"\nBoth resident, CUDA graphs of one compiled step replayed in alternation ({il['rounds']} rounds, "
               f"medians): bf16 {il['bf16_compiled_graph_ms']:.1f} ms, W4A4 {modes[-1][0]} mode + fusion pass "
               f"{il['w4a4_fusion_compiled_graph_ms']:.1f} ms: **{il['speedup']:.2f}x**. The same two graphs in "
               f"phases, in this order:\n\n")
        sampled = any("clocks.sm" in ph["gpu"] for ph in il["phases"].values())
        prow = []
        for name, ph in il["phases"].items():
            sm, pw = ph["gpu"].get("clocks.sm", {}), ph["gpu"].get("power.draw", {})
            prow.append([name, f(ph.get("bf16")), f(ph.get("w4a4")),
                         f(ph["bf16"] / ph["w4a4"], ".3f") if "bf16" in ph and "w4a4" in ph else "-"]
                        + ([f(sm.get("mean"), ".0f"), f(sm.get("min"), ".0f"), f(pw.get("mean"), ".0f")]
                           if sampled else []))
        md += md_table(["phase", "bf16 ms", "W4A4 ms", "ratio"]
                       + (["SM MHz mean", "SM MHz min", "power W mean"] if sampled else []), prow)
        why = next(iter(il["phases"].values()))["gpu"].get("error", "")
        md += "\n" if sampled else f"\n\n(no clock samples: {why})\n"
    elif il:
        md += f"\nInterleaved timing failed: {il.get('error')}\n"
    if args.profile and not tiny:
        cats = list(KERNEL_CATEGORY_NAMES)
        prow = [["bf16"] + [f"{res['bf16']['profile_ms'][c]:.1f}" for c in cats]]
        prow += [[mode] + [f"{res[mode]['profile_ms'][c]:.1f}" for c in cats] for mode, _ in modes]
        md += "\nCUDA time of one eager step by kernel kind (ms, torch.profiler):\n\n" + md_table(["model"] + cats, prow)
        cprow = [[name] + [f"{res[name]['compiled_profile_ms'][c]:.1f}" for c in cats]
                 for name in ["bf16", "bf16_fused"] + [m for mode, _ in modes for m in (mode, f"{mode}_fusion")]
                 if name in res and res[name].get("compiled_profile_ms")]
        if cprow:
            md += "\nSame, blocks compiled:\n\n" + md_table(["model"] + cats, cprow)
    stem = "transformer.tiny" if tiny else "transformer"
    if args.blocks:
        stem += "-" + args.blocks.replace(",", "x")
    jp, mp = write_results(args.out, stem, env, res, md)
    log(md)
    log(f"wrote {jp} and {mp}")


if __name__ == "__main__":
    main()
