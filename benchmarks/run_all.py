"""Every benchmark in one run: one table per benchmark on stdout, the same figures as JSON.

    .venv/bin/python benchmarks/run_all.py [--quick] [--json benchmarks/results/latest.json]
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

BENCHMARKS = ("bench_codec", "bench_webhooks", "bench_bridge", "bench_replay", "bench_tail", "bench_scaleout")


def print_rows(name: str, rows: list[dict]) -> None:
    print(f"\n## {name}")
    if not rows:
        print("(skipped: see the message above)")
        return
    cols = list(dict.fromkeys(k for row in rows for k in row))
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "")) for c in cols) + " |")


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    out = Path(argv[argv.index("--json") + 1]) if "--json" in argv else Path(__file__).parent / "results" / "latest.json"
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
               "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"# twivapi benchmarks ({'quick' if quick else 'full'}): {machine}")
    results = {"machine": machine, "quick": quick, "benchmarks": {}}
    for name in BENCHMARKS:
        started = time.monotonic()
        rows = importlib.import_module(name).run(quick=quick)
        results["benchmarks"][name] = {"rows": rows, "seconds": round(time.monotonic() - started, 1)}
        print_rows(name, rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nfigures written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
