"""Record a device run's result rows and logs in benchmarks/results/.

A run on the GPU machine writes its rows to an empty ``$OUT`` folder, so each row's run id is the bare date (the
first of the day there). This appends every ``*.jsonl`` row of DIR to ``benchmarks/results/<same name>`` with a
run id free in that file (date, then date + b, c, ...: ``_util.next_run``), and copies DIR's ``*.log`` files to
``benchmarks/results/logs/<stem>.<device>.<run id>.log`` (read-only for everyone else: 644). Prints what it wrote.

    python scripts/record_device_results.py /path/to/files_at            # the device tool's files_at folder
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from _util import next_run  # noqa: E402


def device_tag(meta: dict) -> str:
    """'h200' from 'NVIDIA H200', 'h100' from 'NVIDIA H100 80GB HBM3'; 'gpu' if unknown."""
    words = str(meta.get("device", "")).lower().split()
    return next((w for w in words if w[:1] in "abhl" and any(c.isdigit() for c in w)), "gpu")


def record(src: Path, results: Path) -> list[str]:
    written, runs = [], {}
    for jsonl in sorted(src.glob("*.jsonl")):
        dest = results / jsonl.name
        for line in jsonl.read_text().splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            meta = row.get("meta") or {}
            row["run"] = next_run(str(dest), meta.get("date") or row.get("run", "undated"))
            with open(dest, "a") as f:
                f.write(json.dumps(row) + "\n")
            runs[jsonl.stem] = (row["run"], device_tag(meta))
            written.append(f"{dest}: run {row['run']} ({row.get('model', row.get('benchmark'))})")
    logs = results / "logs"
    for log in sorted(src.glob("*.log")):
        stem = log.stem.replace("_", "-")
        run, tag = runs.get(log.stem, runs.get(stem, next(iter(runs.values()), ("undated", "gpu"))))
        dest = logs / f"{stem}.{tag}.{run}.log"
        n = 1
        while dest.exists():
            n += 1
            dest = logs / f"{stem}.{tag}.{run}-{n}.log"
        shutil.copyfile(log, dest)
        os.chmod(dest, 0o644)
        written.append(str(dest))
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path, help="the folder the device run's $OUT files came back to")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    if not args.src.is_dir():
        p.error(f"{args.src} is not a folder")
    for line in record(args.src, args.results):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
