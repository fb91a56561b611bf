"""scripts/record_device_results.py: a device run's rows get free run ids; its logs land beside them."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_rows_get_free_run_ids_and_logs_are_copied(tmp_path):
    src, results = tmp_path / "out", tmp_path / "results"
    src.mkdir()
    (results / "logs").mkdir(parents=True)
    meta = {"device": "NVIDIA H200", "date": "2026-12-05"}
    (results / "models.jsonl").write_text(json.dumps({"run": "2026-12-05", "meta": meta}) + "\n")
    rows = [{"benchmark": "models", "run": "2026-12-05", "model": m, "meta": meta} for m in ("flux-dev", "sd3")]
    (src / "models.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (src / "models.log").write_text("log\n")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "record_device_results.py"), str(src), "--results",
                        str(results)], capture_output=True, text=True, check=True)
    got = [json.loads(line) for line in (results / "models.jsonl").read_text().splitlines()]
    assert [g["run"] for g in got] == ["2026-12-05", "2026-12-05b", "2026-12-05c"]
    assert [g.get("model") for g in got[1:]] == ["flux-dev", "sd3"]
    assert (results / "logs" / "models.h200.2026-12-05c.log").read_text() == "log\n"
    assert "2026-12-05b" in r.stdout
