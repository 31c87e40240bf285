"""Every benchmark in one run: one table per benchmark on stdout, then one summary table with the
headline figure of each (a ratio or a distribution, measured side by side in this run, on the
machine the header names); the same figures, summary included, as JSON.

    .venv/bin/python benchmarks/run_all.py [--quick] [--only bench_a,bench_b] [--json benchmarks/results/latest.json]
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

BENCHMARKS = ("bench_startup", "bench_codec", "bench_webhooks", "bench_bridge", "bench_replay", "bench_tail",
              "bench_scaleout", "bench_burst", "bench_forward")


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


# --- the summary: one headline per benchmark, read from its rows ------------------------------------

def _by(rows: list[dict], key: str, value: str) -> dict:
    return next(row for row in rows if row.get(key) == value)


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "n/a"


def _codec(rows: list[dict]) -> list[dict]:
    out = []
    for direction in dict.fromkeys(row["direction"] for row in rows):
        here = [row for row in rows if row["direction"] == direction]
        ours = _by(here, "method", "twivapi FIR-63")
        others = [row for row in here if row is not ours]
        out.append({"figure": f"codec {direction}: µs per 20 ms frame (median), SINAD",
                    "twivapi": f"{ours['median_us']} µs, {ours['sinad_db']} dB",
                    "side by side with": "; ".join(f"{o['method']} {o['median_us']} µs, {o['sinad_db']} dB"
                                                   for o in others),
                    "ratio": "; ".join(f"{_ratio(ours['median_us'], o['median_us'])} {o['method'].split()[0]}"
                                       for o in others)})
    return out


def _webhooks(rows: list[dict]) -> list[dict]:
    ref = _by(rows, "server", "seed reference (express)")
    return [{"figure": f"signed voice webhooks, 50 connections: {row['server']}, end-to-end/s and p99",
             "twivapi": f"{row['e2e_rps']}/s, p99 {row['p99_ms']} ms",
             "side by side with": f"seed reference {ref['e2e_rps']}/s, p99 {ref['p99_ms']} ms",
             "ratio": f"{row['e2e_vs_ref']}x rate, {row['p99_vs_ref']}x p99"}
            for row in rows if row is not ref]


def _bridge(rows: list[dict]) -> list[dict]:
    ours = [row for row in rows if row.get("server", "twivapi") == "twivapi"]
    mulaw = max((row for row in ours if row["format"] == "mulaw-8k"), key=lambda row: row["calls"])
    pcm = [row for row in ours if row["format"] == "pcm16-16k"]
    peers = [row for row in rows if row.get("server", "twivapi") != "twivapi"]
    out = [{"figure": f"concurrent calls per core (mu-law passthrough, {mulaw['calls']} calls at real time)",
            "twivapi": f"{mulaw['calls_per_core']} calls/core, {mulaw['frames_lost']} frames lost",
            "side by side with": "; ".join(f"pcm16-16k (transcoded) {row['calls_per_core']} calls/core" for row in pcm),
            "ratio": "; ".join(f"{_ratio(row['calls_per_core'], mulaw['calls_per_core'])} pcm16/mu-law" for row in pcm)}]
    for row in ours:   # CPU per call-second beside the bare relay (the floor) and pipecat, same calls
        same = [p for p in peers if p["format"] == row["format"] and p["calls"] == row["calls"]]
        if same:
            out.append({"figure": f"media CPU ms per call-second, {row['format']}, {row['calls']} calls "
                                  "(server CPU only), audio returned",
                        "twivapi": f"{row['cpu_ms_per_call_s']} ms, {row['audio_returned_pct']}%",
                        "side by side with": "; ".join(f"{p['server']} {p['cpu_ms_per_call_s']} ms, "
                                                       f"{p['audio_returned_pct']}%" for p in same),
                        "ratio": "; ".join(f"{_ratio(row['cpu_ms_per_call_s'], p['cpu_ms_per_call_s'])} "
                                           f"{p['server']}" for p in same)})
    out.append({"figure": f"barge-in webhook -> clear at the caller ({mulaw['calls']} calls)",
                "twivapi": f"p50 {mulaw['bargein_clear_p50_ms']} ms, p99 {mulaw['bargein_clear_p99_ms']} ms",
                "side by side with": f"the bridge's own signal-to-clear p99 {mulaw['bridge_signal_to_clear_p99_ms']} ms",
                "ratio": f"{mulaw['clears']} calls cleared"})
    return out


def _replay(rows: list[dict]) -> list[dict]:
    ours, cannon = _by(rows, "tool", "twivapi replay (signs each)"), _by(rows, "tool", "autocannon (pre-signed)")
    return [{"figure": "replay as a load tool: signed voice webhooks/s at concurrency 50",
             "twivapi": f"{ours['rps']}/s, p99 {ours.get('p99_ms')} ms",
             "side by side with": f"autocannon {cannon['rps']}/s, p99 {cannon['p99_ms']} ms",
             "ratio": f"{ours['vs_autocannon']}x"}]


def _tail(rows: list[dict]) -> list[dict]:
    row = rows[0]
    return [{"figure": f"tail lag, event recorded -> line printed, at {row['events_per_s']} events/s",
             "twivapi": f"p50 {row['lag_p50_ms']} ms, p99 {row['lag_p99_ms']} ms",
             "side by side with": f"{row['received']}/{row['events']} events received",
             "ratio": f"tail used {row['tail_cpu_share']} of a core"}]


def _scaleout(rows: list[dict]) -> list[dict]:
    out = []
    setups = {row["setup"]: row for row in rows if "setup" in row}
    if "1 instance, SQLite" in setups and "2 instances, Redis" in setups:
        one, two = setups["1 instance, SQLite"], setups["2 instances, Redis"]
        out.append({"figure": "signed voice webhooks/s: 2 instances on Redis vs 1 on SQLite",
                    "twivapi": f"2 x Redis {two['rps']}/s, p99 {two['p99_ms']} ms",
                    "side by side with": f"1 x SQLite {one['rps']}/s, p99 {one['p99_ms']} ms",
                    "ratio": _ratio(two["rps"], one["rps"])})
    by_workers = {row["workers"]: row for row in rows if "workers" in row}
    if 1 in by_workers and 2 in by_workers:
        one, two = by_workers[1], by_workers[2]
        out.append({"figure": "serve --workers 2 vs 1 (Redis): webhooks/s at 50 connections; media calls per machine",
                    "twivapi": f"2 workers {two.get('webhooks_per_s')}/s; {two['media_calls_per_machine']} calls",
                    "side by side with": f"1 worker {one.get('webhooks_per_s')}/s; {one['media_calls_per_machine']} calls",
                    "ratio": f"{_ratio(two.get('webhooks_per_s'), one.get('webhooks_per_s'))} webhooks, "
                             f"{_ratio(two['media_calls_per_machine'], one['media_calls_per_machine'])} calls"})
    for row in rows:
        if "figure" in row:
            out.append({"figure": row["figure"], "twivapi": f"p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms",
                        "side by side with": "", "ratio": f"n={row['n']}"})
    return out


def _burst(rows: list[dict]) -> list[dict]:
    out = []
    for row in rows:
        if not row["server"].startswith("twivapi"):
            continue
        seed = next((r for r in rows if r["server"].startswith("seed") and r["calls"] == row["calls"]
                     and r["rate_target"] == row["rate_target"]), None)
        out.append({"figure": f"burst of {row['calls']} calls at {row['rate_target']}/s, Vapi POST /call at 800 ms: "
                              "set up, within 2 s of the webhook, ack p99",
                    "twivapi": f"{row['set_up']} set up, {row['within_2s']} within 2 s, {row['fallbacks']} fallbacks, "
                               f"ack p99 {row['ack_p99_ms']} ms",
                    "side by side with": f"seed {seed['set_up']} set up, {seed['within_2s']} within 2 s, "
                                         f"ack p99 {seed['ack_p99_ms']} ms" if seed else "(seed skipped: see its message)",
                    "ratio": f"goal (all set up within 2 s, ack p99 <= 50 ms): {row['goal']}"})
    return out


def _forward(rows: list[dict]) -> list[dict]:
    builtin = _by(rows, "setup", "built-in tool (lookup_order)")
    forwarded = _by(rows, "setup", "--forward-to the app")
    app = _by(rows, "setup", "the app alone (no bridge)")
    return [{"figure": "tool-call round trip through `serve`: --forward-to an app on loopback vs the built-in tool",
             "twivapi": f"--forward-to p50 {forwarded['p50_ms']} ms, p99 {forwarded['p99_ms']} ms",
             "side by side with": f"built-in p50 {builtin['p50_ms']} ms, p99 {builtin['p99_ms']} ms; the app alone "
                                  f"p50 {app['p50_ms']} ms",
             "ratio": f"+{forwarded['added_p50_ms']} ms p50, +{forwarded['added_p99_ms']} ms p99"}]


def _startup(rows: list[dict]) -> list[dict]:
    ours = next(row for row in rows if row["command"].startswith("twivapi"))
    twilio = next((row for row in rows if row["command"].startswith("twilio")), None)
    return [{"figure": f"start-up: `twivapi --help` wall time, median and p90 of {ours['runs']}",
             "twivapi": f"{ours['median_ms']} ms, p90 {ours['p90_ms']} ms",
             "side by side with": f"{twilio['command']}: {twilio['median_ms']} ms, p90 {twilio['p90_ms']} ms"
             if twilio else "(twilio-cli skipped: no node/npm)",
             "ratio": f"{ours['vs_twilio_cli']}x (target < 0.2x: {'met' if ours['met'] else 'NOT met'})"
             if twilio else "n/a"}]


HEADLINES = {"bench_startup": _startup, "bench_codec": _codec, "bench_webhooks": _webhooks, "bench_bridge": _bridge,
             "bench_replay": _replay, "bench_tail": _tail, "bench_scaleout": _scaleout, "bench_burst": _burst,
             "bench_forward": _forward}


def summary(benchmarks: dict[str, dict]) -> list[dict]:
    """One row (or a few) per benchmark, its headline figure; a benchmark that was skipped or whose
    rows no longer have the expected shape says so instead of stopping the summary."""
    out = []
    for name, result in benchmarks.items():
        rows = result["rows"]
        if not rows:
            out.append({"benchmark": name, "figure": "(skipped: see its message above)"})
            continue
        try:
            lines = HEADLINES[name](rows) if name in HEADLINES else [
                {"figure": ", ".join(f"{k}={v}" for k, v in list(rows[0].items())[:6])}]
        except (KeyError, StopIteration, TypeError, ValueError, ZeroDivisionError) as exc:
            lines = [{"figure": f"(no headline: its rows changed shape: {exc!r})"}]
        out += [{"benchmark": name, **line} for line in lines]
    return out


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(),
            "when": time.strftime("%Y-%m-%d %H:%M:%S")}


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    out = Path(argv[argv.index("--json") + 1]) if "--json" in argv else Path(__file__).parent / "results" / "latest.json"
    names = argv[argv.index("--only") + 1].split(",") if "--only" in argv else list(BENCHMARKS)
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        print(f"run_all: unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    machine = machine_info()
    print(f"# twivapi benchmarks ({'quick' if quick else 'full'}): {machine}")
    results = {"machine": machine, "quick": quick, "benchmarks": {}}
    for name in names:
        started = time.monotonic()
        rows = importlib.import_module(name).run(quick=quick)
        results["benchmarks"][name] = {"rows": rows, "seconds": round(time.monotonic() - started, 1)}
        print_rows(name, rows)
    results["summary"] = {"machine": machine, "rows": summary(results["benchmarks"])}
    print(f"\n# summary: the headline figure of each benchmark, measured side by side in this run\n"
          f"# machine: {machine['cpu']}, {machine['cpus']} CPUs, {machine['platform']}, Python {machine['python']}, "
          f"{machine['when']}{' (quick run)' if quick else ''}")
    print_rows("summary", results["summary"]["rows"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nfigures written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
