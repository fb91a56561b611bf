"""act_quant's single pass as the GPU would run it, read without a GPU: its SASS instruction mix for sm_90.

    python benchmarks/probes/act_sass_probe.py                       # any machine with Triton (~1 min on 2 CPUs)
    python benchmarks/probes/act_sass_probe.py --src /tmp/old/src    # another checkout's src/ (before / after)

Compiles ``_act_fused_kernel`` with the constexprs ``act_quant_single`` would launch (``single_pass_meta``, the
default ``ActConfig``, or ``config`` overrides) for each format and padded K, for a Hopper target (Triton's own
ptxas and nvdisasm; integer arguments specialised as divisible by 16, as Triton does at a launch with these shapes),
and counts its SASS:

- ``body``: instructions up to the kernel's last EXIT (the out-of-line slow path of IEEE division left out), and
  its ``loops`` (the chunk walks); ``executed``: an estimate per thread and row program, every loop run
  ceil(Kp / chunk) times and every other body instruction once (so ``executed x warps`` is a row's issue cost);
- ``conversions``: executed instructions of the conversion pipe (F2FP, F2I, I2F(P), FRND, MUFU, F2F; estimated as
  above), which on sm_90 issues 16 results per clock per SM against 128 for fp32 add/multiply (CUDA C programming
  guide, arithmetic instructions);
- per element: estimated lane-instructions per valid element, ``executed x 32 x warps / (rows x K)``;
- registers per thread and spill (local memory) bytes, from cuobjdump; ``--whole-rows`` adds rows of several
  chunks loaded once (``whole_row_k=8192``, 4 and 8 warps).

Static counts, not timings: they show where a pass that measures issue-bound spends its instructions (on the H200,
8192 x 1152 int4p2 before rint_small: ~14 us of issue at one warp-instruction per clock per scheduler, 17.6 us
measured). Appends a row to ``results/act_sass_probe.jsonl``.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
CONVERSION_OPS = ("F2FP", "F2I", "I2F", "I2FP", "FRND", "MUFU", "F2F")
DEFAULT_K = (640, 1152, 1536, 2240, 3072, 4608)


def _sig_type(dtype) -> str:
    import torch

    return {torch.float8_e4m3fn: "*fp8e4nv", torch.int8: "*i8", torch.bfloat16: "*bf16"}[dtype]


def compile_for_target(fn, signature: dict, constexprs: dict, arch: int = 90, num_warps: int = 4,
                       num_stages: int = 3, divisible=()):
    """``fn`` (a @triton.jit kernel) compiled for ``sm_{arch}`` without a GPU (Triton's bundled ptxas): ``signature``
    maps its runtime arguments to Triton types, ``divisible`` names those specialised as divisible by 16 (as a launch
    with such values and 16-byte-aligned pointers would)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource

    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    sig = dict(signature, **{k: "constexpr" for k in constexprs})
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def compile_single_pass(fmt_name: str, kp: int, arch: int = 90, fmt_kwargs=None, **config):
    """(compiled kernel, meta) of the single pass for activation format ``fmt_name`` (``make_format`` keywords
    ``fmt_kwargs``) at padded K ``kp``; ``config``: ``ActConfig`` fields that differ from the default."""
    from dataclasses import replace

    from fourbit.formats import make_format
    from fourbit.kernels.act_quant import DEFAULT_CONFIG, act_spec
    from fourbit.kernels.act_single import _act_fused_kernel, single_pass_meta

    spec = act_spec(make_format(fmt_name, **(fmt_kwargs or {})))
    meta = single_pass_meta(spec, kp, replace(DEFAULT_CONFIG, **config), hw=True)
    warps, stages = meta.pop("num_warps"), meta.pop("num_stages")
    sig = dict(x_ptr="*bf16", x2_ptr="*bf16", rsmooth_ptr="*fp32", q_ptr=_sig_type(spec.operand_dtype),
               rs_ptr="*fp32", gs_ptr="*fp32", t_ptr="*fp32", M="i32", K1="i32", K="i32", Kp="i32",
               stride_xm="i32", stride_x2m="i32", stride_qm="i32", stride_gs="i32")
    kernel = compile_for_target(_act_fused_kernel, sig, meta, arch, warps, stages,
                                divisible=[n for n in sig if n != "stride_gs"])
    return kernel, dict(meta, num_warps=warps, num_stages=stages)


def sass_counts(cubin: bytes) -> dict:
    """Opcode counts of the kernel body (up to its last EXIT), the whole listing's length, and the sizes of the
    body's loops (a backward branch to a label: the instructions from the label to the branch)."""
    import triton

    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        listing = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout
    ops, labels, branches = [], {}, []
    for line in listing.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(ops)
            continue
        m = re.match(r"\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m:
            target = re.search(r"`\((\.L_x_\d+)\)", line) if m.group(1) == "BRA" else None
            if target:
                branches.append((len(ops), target.group(1)))
            ops.append(m.group(1))
    last_exit = max(i for i, op in enumerate(ops) if op == "EXIT")
    body = collections.Counter(ops[:last_exit + 1])
    spans = [(labels[t], at + 1) for at, t in branches if t in labels and labels[t] <= at <= last_exit]
    usage = _resource_usage(cubin)
    return dict(total=len(ops), body=last_exit + 1, loops=[b - a for a, b in spans],
                conv=sum(body[o] for o in CONVERSION_OPS),
                loop_conv=sum(sum(op in CONVERSION_OPS for op in ops[a:b]) for a, b in spans),
                shfl=body["SHFL"], bar=body["BAR"], top=body.most_common(12), ops=dict(body), **usage)


def _resource_usage(cubin: bytes) -> dict:
    """Registers per thread and local-memory bytes (spills) of the kernel, from cuobjdump."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = {k: int(v) for k, v in re.findall(r"\b(REG|LOCAL):(\d+)", text)}
    return dict(registers=found.get("REG"), local_bytes=found.get("LOCAL"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--formats", default="int4p2,fp8")
    p.add_argument("--k", default=",".join(map(str, DEFAULT_K)), help="padded K values")
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--src", default=None, help="another checkout's src/ to compile instead of this one's")
    p.add_argument("--label", default=None, help="name of this source in the row (default: its git commit)")
    p.add_argument("--whole-rows", action="store_true", help="also rows loaded once up to K 8192 (4 and 8 warps)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "results"))
    args = p.parse_args(argv)
    if args.src:
        sys.path.insert(0, os.path.abspath(args.src))
    sys.path.insert(0, os.path.dirname(HERE))  # benchmarks/: _util
    from _util import environment, finish, git_commit, md_table

    import fourbit
    from fourbit.kernels.act_quant import DEFAULT_CONFIG

    whole_row_k = DEFAULT_CONFIG.whole_row_k
    rows, table = [], []
    configs = [dict(), dict(whole_row_k=8192), dict(whole_row_k=8192, warps=8)] if args.whole_rows else [dict()]
    for name, kp, config in ((n, int(k), c) for n in args.formats.split(",") for k in args.k.split(",")
                             for c in configs):
        kernel, meta = compile_single_pass(name, kp, args.arch, **config)
        if config and (kp <= whole_row_k or not meta["ONE_LOAD"]):
            continue  # the default already loads this row once (or it does not fit): nothing new to count
        c = sass_counts(kernel.asm["cubin"])
        lanes = 32 * meta["num_warps"] / (meta["BM"] * kp)  # lane-instructions per valid element, per count
        trips = -(-kp // meta["BK"])  # each loop's iterations per row (one-chunk rows: no loop)
        c["executed"] = c["body"] + (trips - 1) * sum(c["loops"])  # estimate: every other instruction once
        c["conv_executed"] = c["conv"] + (trips - 1) * c["loop_conv"]
        rows.append(dict(format=name, Kp=kp, config=config, meta=meta,
                         **{k: v for k, v in c.items() if k != "ops"}))
        chunk = meta["BK"]
        table.append([name, kp, chunk, meta["num_warps"], "yes" if meta["ONE_LOAD"] else "no", c["registers"],
                      c["local_bytes"], c["body"],
                      "+".join(map(str, c["loops"])) or "-", c["executed"], f"{c['executed'] * lanes:.1f}",
                      c["conv_executed"], f"{c['conv_executed'] * lanes:.2f}", c["shfl"],
                      " ".join(f"{op} {n}" for op, n in c["top"][:6])])
        print(f"{name} Kp {kp} (chunk {chunk}): body {c['body']}, conversions {c['conv']}", flush=True)
    env = dict(environment(), device=f"none (static SASS for sm_{args.arch})")
    source = args.label or (args.src and os.path.abspath(args.src)) or git_commit()
    md = (f"## act_quant single pass, static SASS (sm_{args.arch}, Triton {env['triton']}, source {source}, "
          f"fourbit from {os.path.dirname(fourbit.__file__)})\n\n"
          + md_table(["format", "Kp", "chunk", "warps", "one load", "registers", "spill bytes", "body instr", "loops",
                      "executed (est.)",
                      "per element", "conversions (est.)", "per element", "SHFL (body)", "most frequent"], table))
    return finish(args.out, "act_sass_probe", env, dict(source=source, arch=args.arch, rows=rows), md)


if __name__ == "__main__":
    sys.exit(main())
