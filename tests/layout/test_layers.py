"""The package's layers point only down: ``import fourbit`` loads no harness, bundled model or CLI module, and the
subpackages import each other without a cycle (imports inside functions counted too)."""
from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "fourbit"

#: what the core may never import, even lazily: the research harness, bundled models/data/metrics, the CLI
UPPER = {"harness", "models", "data", "eval", "training", "cli", "sampling", "pipelines", "__main__"}
CORE = {"config", "formats", "kernels", "nn", "calibration", "methods", "api", "checkpoint", "siblings", "utils"}


def _unit(module: str) -> str:
    """fourbit.nn.linear -> "nn"; fourbit.api -> "api"; fourbit -> "__init__"."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def package_edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        module = ".".join(rel.parts)
        is_pkg = path.name == "__init__.py"
        if is_pkg:
            module = module.rpartition(".")[0]
        base = module if is_pkg else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                anchor = base.split(".")[: len(base.split(".")) - (node.level - 1)]
                stem = ".".join(anchor + ([node.module] if node.module else []))
                targets = [stem] if node.module else [f"{stem}.{a.name}" for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fourbit"):
                targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("fourbit")]
            for t in targets:
                src, dst = _unit(module), _unit(t)
                if src != dst and dst != "__version__":
                    edges[src].add(dst)
    return edges


def test_core_never_imports_the_upper_layers():
    edges = package_edges()
    bad = sorted(f"{a} -> {b}" for a in CORE for b in edges.get(a, ()) if b in UPPER)
    assert not bad, f"core modules import the harness/models/CLI: {bad}"


def test_no_import_cycle_between_subpackages():
    edges = package_edges()
    edges.pop("__init__", None)  # the package root re-exports; it is imported by nobody inside
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if nxt == "__init__":
                continue
            if state.get(nxt) == 1:
                cycle.extend(stack[stack.index(nxt):] + [node, nxt] if nxt in stack else [node, nxt])
                return True
            if state.get(nxt) is None and visit(nxt, stack + [node]):
                return True
        state[node] = 2
        return False

    for n in sorted(edges):
        if state.get(n) is None and visit(n, []):
            break
    assert not cycle, f"import cycle between subpackages: {' -> '.join(cycle)}"


def test_import_fourbit_loads_no_harness():
    code = ("import sys, fourbit; bad = sorted(m for m in sys.modules if m.split('.')[:2] and len(m.split('.')) > 1 "
            f"and m.split('.')[0] == 'fourbit' and m.split('.')[1] in {sorted(UPPER)!r}); print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"import fourbit loaded {out}"
    code = "import sys, fourbit; print('triton' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
