"""Every README example runs: python blocks are executed, cheap shell blocks are run, every `fourbit ...` command
line in the README is parsed by the real CLI parser (so a renamed option or command fails here).

A block may be preceded by a directive comment, ``<!-- readme-test: KEY[=VALUE]; ... -->``:
- ``needs=fourbit.NAME`` (comma-separated): skipped until that attribute exists (a feature on its way to main);
- ``skip=REASON``: never executed (e.g. it downloads a model); its `fourbit` lines are still parsed;
- ``run``: a shell block whose lines are run (each `fourbit ...` as `python -m fourbit ...`), in order, in one
  temporary directory;
- ``fixture=NAME``: the block runs against a tiny local stand-in (``FIXTURES``) after the listed substitutions
  (model folder, device, image size); each substituted text must be in the block, so an edit of the README
  cannot silently skip them.
Python blocks run in a temporary directory, each in a fresh namespace.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import fourbit

README = Path(__file__).resolve().parents[2] / "README.md"
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
_DIRECTIVE = re.compile(r"<!--\s*readme-test:\s*(.*?)\s*-->")


@dataclass
class Block:
    lang: str
    code: str
    line: int  # 1-based line of the opening fence
    options: dict

    @property
    def id(self) -> str:
        return f"{self.lang}-line{self.line}"


def readme_blocks(text: str) -> list[Block]:
    """Fenced blocks of the README with the directive on the line before the fence (if any)."""
    blocks = []
    for m in _FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        options = {}
        d = _DIRECTIVE.search(before)
        if d:
            for part in filter(None, (p.strip() for p in d.group(1).split(";"))):
                key, _, value = part.partition("=")
                options[key.strip()] = value.strip() or True
        blocks.append(Block(m.group(1), m.group(2), line, options))
    return blocks


BLOCKS = readme_blocks(README.read_text())


def _missing_needs(block: Block) -> list[str]:
    needs = block.options.get("needs")
    if not needs:
        return []
    missing = []
    for name in needs.split(","):
        obj, ok = None, True
        for i, part in enumerate(name.strip().split(".")):
            try:
                obj = fourbit if i == 0 and part == "fourbit" else getattr(obj, part)
            except AttributeError:
                ok = False
                break
        if not ok:
            missing.append(name.strip())
    return missing


def _skip_unless_runnable(block: Block, execute: bool = True) -> None:
    missing = _missing_needs(block)
    if missing:
        pytest.skip(f"README line {block.line} needs {', '.join(missing)} (not on this branch yet)")
    if execute and "skip" in block.options:
        pytest.skip(f"README line {block.line}: {block.options['skip']}")


def _command_lines(text: str) -> list[str]:
    """`fourbit ...` invocations: whole lines of shell blocks (comments stripped) and inline code in tables."""
    lines = []
    for raw in text.splitlines():
        s = raw.split(" #", 1)[0].strip()
        if s.startswith("fourbit "):
            lines.append(s)
    return lines


PYTHON = [b for b in BLOCKS if b.lang == "python"]
SHELL = [b for b in BLOCKS if b.lang == "bash"]
TABLE_COMMANDS = [c for c in re.findall(r"`(fourbit [^`]+)`", README.read_text()) if "COMMAND" not in c
                  and "..." != c.split(" ", 1)[1]]


def test_readme_has_the_expected_examples():
    """Guards the parser of this test: a README without python examples would make the others vacuous."""
    assert len(PYTHON) >= 3 and any("run" in b.options for b in SHELL) and len(TABLE_COMMANDS) >= 5
    assert BLOCKS[0].lang == "bash" and BLOCKS[0].code.split()[:2] == ["make", "demo"]  # the two commands first


def _tiny_flux(tmp_path: Path) -> list[tuple[str, str]]:
    pytest.importorskip("diffusers")
    from .tiny_flux import build_tiny_flux

    folder = build_tiny_flux(tmp_path / "tiny-flux")
    return [('"black-forest-labs/FLUX.1-dev"', repr(str(folder))), ('"cuda"', '"cpu"'),
            ("guidance_scale=3.5)", "guidance_scale=3.5, call_kwargs=dict(height=32, width=32))"),
            ("num_inference_steps=28)", "num_inference_steps=2, height=32, width=32)"),
            ("call_kwargs=dict(height=1024, width=1024))",  # dynamo without inductor's C++ build: 52 -> ~10 s
             "call_kwargs=dict(height=32, width=32), backend='eager')")]


FIXTURES = {"tiny_flux": _tiny_flux}


@pytest.mark.parametrize("block", PYTHON, ids=[b.id for b in PYTHON])
def test_python_example_runs(block, tmp_path, monkeypatch):
    _skip_unless_runnable(block)
    monkeypatch.chdir(tmp_path)
    source = block.code
    if "fixture" in block.options:
        for old, new in FIXTURES[block.options["fixture"]](tmp_path):
            assert old in source, f"README line {block.line}: the test substitutes {old!r}, which is gone; update FIXTURES"
            source = source.replace(old, new)
    code = compile(source, f"README.md:{block.line}", "exec")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        exec(code, {"__name__": "__readme__"})


def _parse(argv: list[str]) -> None:
    from fourbit.cli import build_parser

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            build_parser().parse_args(argv)
        except SystemExit as e:
            if e.code:
                pytest.fail(f"README command `fourbit {shlex.join(argv)}` is rejected by the CLI: {err.getvalue()}")


@pytest.mark.parametrize("block", SHELL, ids=[b.id for b in SHELL])
def test_shell_example_commands_parse(block):
    lines = _command_lines(block.code)
    if not lines:
        pytest.skip("no fourbit command in this block")
    _skip_unless_runnable(block, execute=False)
    for line in lines:
        argv = shlex.split(line)[1:]
        if argv[0] != "train":  # `fourbit train` hands everything to the trainer's own parser
            _parse(argv)


@pytest.mark.parametrize("cmd", TABLE_COMMANDS)
def test_table_commands_parse(cmd):
    argv = shlex.split(cmd)[1:]
    if argv[0] == "generate" and not hasattr(fourbit, "quantize_pipeline"):
        pytest.skip("`fourbit generate` comes with the diffusers pipeline support (not on this branch yet)")
    if argv[0] != "train":
        _parse(argv)


@pytest.mark.parametrize("block", [b for b in SHELL if "run" in b.options],
                         ids=[b.id for b in SHELL if "run" in b.options])
def test_shell_example_runs(block, tmp_path):
    _skip_unless_runnable(block)
    src = str(Path(fourbit.__file__).resolve().parents[1])  # this checkout's fourbit, whatever the cwd
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    for line in _command_lines(block.code):
        argv = [sys.executable, "-m", "fourbit", *shlex.split(line)[1:]]
        res = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"README `{line}` failed:\n{res.stderr[-2000:]}"


def _relative_links(md: Path) -> list[str]:
    text = _FENCE.sub("", md.read_text())  # links inside code blocks are not links
    return [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", t) and t[0] != "#"]


DOCS = [README, *sorted((README.parent / "docs").rglob("*.md")), README.parent / "benchmarks" / "README.md",
        README.parent / "benchmarks" / "results" / "README.md"]


@pytest.mark.parametrize("md", DOCS, ids=[str(p.relative_to(README.parent)) for p in DOCS])
def test_relative_links_resolve(md):
    pending = set() if hasattr(fourbit, "quantize_pipeline") else {"pipelines.md"}  # lands with the pipelines
    broken = [t for t in _relative_links(md) if not (md.parent / t).exists() and Path(t).name not in pending]
    assert not broken, f"{md.name}: links to missing files {broken}"
