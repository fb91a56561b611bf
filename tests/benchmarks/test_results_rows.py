"""benchmarks/_util.py's result rows, and the committed results: one JSONL file per benchmark, every row with meta."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
META_KEYS = {"device", "date", "torch", "git_commit", "command"}


@pytest.fixture(scope="module")
def util():
    spec = importlib.util.spec_from_file_location("bench_util", ROOT / "benchmarks" / "_util.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_append_row_fills_meta_and_numbers_runs(util, tmp_path, monkeypatch):
    monkeypatch.setenv("FOURBIT_GIT_COMMIT", "abc1234")
    env = {"device": "cpu", "date": "2026-12-04", "torch": "2.13.0", "triton": "3.9.0", "cuda": None}
    runs = [util.append_row(str(tmp_path), "linear", {"result": {"x": i}}, util.run_meta(env, "python x.py"))[1]
            for i in range(3)]
    assert runs == ["2026-12-04", "2026-12-04b", "2026-12-04c"]
    rows = [json.loads(line) for line in (tmp_path / "linear.jsonl").read_text().splitlines()]
    assert [r["result"]["x"] for r in rows] == [0, 1, 2]
    assert rows[0]["benchmark"] == "linear" and rows[0]["meta"]["git_commit"] == "abc1234"
    assert rows[0]["meta"]["command"] == "python x.py" and META_KEYS <= set(rows[0]["meta"])


def test_run_ids_go_on_after_z_in_order(util, tmp_path):
    """A busy day's runs: after date + z come za, zb, ... (each sorting after the ones before), then zza."""
    path = tmp_path / "models.jsonl"
    ids = []
    for _ in range(1 + 25 + 26 + 1):
        ids.append(util.next_run(str(path), "2026-12-05"))
        with open(path, "a") as f:
            f.write(json.dumps({"run": ids[-1]}) + "\n")
    assert ids[:3] == ["2026-12-05", "2026-12-05b", "2026-12-05c"]
    assert ids[25:28] == ["2026-12-05z", "2026-12-05za", "2026-12-05zb"] and ids[-1] == "2026-12-05zza"
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


def test_git_commit_without_the_env_var_is_this_checkout_or_unknown(util, monkeypatch):
    monkeypatch.delenv("FOURBIT_GIT_COMMIT", raising=False)
    c = util.git_commit()
    assert c == "unknown" or (4 <= len(c) <= 40 and all(ch in "0123456789abcdef" for ch in c))


def test_write_results_maps_stems_to_the_script(util, tmp_path, monkeypatch):
    monkeypatch.setenv("FOURBIT_GIT_COMMIT", "abc1234")
    assert util.benchmark_of("act_quant-lrmm") == ("act_quant", "lrmm")
    assert util.benchmark_of("accum-probe") == ("accum_probe", None)  # a probe, in benchmarks/probes/
    assert util.benchmark_of("transformer.tiny") == ("transformer", "tiny")
    env = {"device": "cpu", "date": "2026-12-04", "torch": "2.13.0", "triton": "3.9.0", "cuda": None}
    path, run = util.write_results(str(tmp_path), "step-shapes", env, {"rows": [1]}, "| a |")
    row = json.loads(Path(path).read_text())
    assert Path(path).name == "step_shapes.jsonl" and run == "run 2026-12-04"
    assert (row["result"], row["markdown"], row["variant"]) == ({"rows": [1]}, "| a |", None)


def test_committed_results_are_rows_with_meta():
    files = sorted(RESULTS.glob("*.jsonl"))
    assert files, "no results"
    assert not [p.name for p in RESULTS.iterdir() if p.is_file() and p.suffix not in (".jsonl", ".md")]
    runs = set()
    for f in files:
        for i, line in enumerate(f.read_text().splitlines()):
            row = json.loads(line)
            assert META_KEYS <= set(row["meta"]), f"{f.name}:{i + 1} lacks meta keys"
            assert row.get("run"), f"{f.name}:{i + 1} has no run id"
            runs.add((f.stem, row["run"]))
            for g in row.get("grids") or ():
                assert (ROOT / g).is_file(), f"{f.name}:{i + 1} names a missing grid {g}"
    assert ("linear", "2026-11-22g") in runs and ("transformer", "2026-11-22r") in runs  # runs cited by the docs
