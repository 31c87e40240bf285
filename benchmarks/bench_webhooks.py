"""Signed /twilio/voice webhooks at 50 connections: twivapi (stream, bypass) vs the seed's reference.

Each webhook carries a new CallSid and a valid signature. A webhook is done only when its Vapi call
exists, so besides the answer rate we report the end-to-end rate: answered / (load time + the time
the background Vapi calls take to catch up), read from the Vapi stand-in's `GET /count`, and the
server's CPU per call made (its process and children, from /proc: steadier than a rate when the load
generator and the server share two cores).

Needs node + npm (the reference server and autocannon come from ../shared/anchors/seed-express);
without one of them, or without that directory, the benchmark says which is missing and skips.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from common import free_port, missing, print_table, tree_cpu_seconds, wait_http  # noqa: F401 (bench_scaleout uses them via bw)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SEED = ROOT.parent / "shared" / "anchors" / "seed-express"
TOKEN = "bench-auth-token-0123456789abcdef"
PUBLIC = "https://bench.example.test"


def node_missing(seed: Path | None = None) -> str | None:
    """Which of node, npm and the seed's reference server (``seed``, default SEED) is missing, named;
    None when all are there."""
    return missing(("node", "npm"), [("the seed's reference server", seed or SEED)])


def skip_line(bench: str, seed: Path | None = None, skipping: str = "skipping") -> str | None:
    """The line a benchmark prints when it cannot run its node side, naming what is missing."""
    lacking = node_missing(seed)
    return f"{bench}: missing {lacking}: {skipping}" if lacking else None


def prepare_node(workdir: Path, seed: Path | None = None) -> Path | None:
    """A copy of the reference with its npm dependencies installed, or None when node, npm or the
    reference is missing (``node_missing`` says which)."""
    seed = seed or SEED
    if node_missing(seed):
        return None
    target = workdir / "seed-express"
    shutil.copytree(seed, target)
    shutil.copy(HERE / "fake_vapi.js", target / "fake_vapi_bench.js")
    subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent"], cwd=target, check=True,
                   capture_output=True, timeout=300)
    return target


def count(vapi_port: int) -> int:
    return httpx.get(f"http://127.0.0.1:{vapi_port}/count").json()["calls"]


def load(node_dir: Path, port: int, sign_base: str, seconds: int, connections: int = 50) -> dict:
    out = subprocess.run(["node", "load.js", str(port), sign_base, str(connections), str(seconds)], cwd=node_dir,
                         env={**os.environ, "TWILIO_AUTH_TOKEN": TOKEN}, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(node_dir: Path, name: str, server_cmd: list[str], env: dict, sign_base_fn, seconds: int,
            cwd: Path | None = None) -> dict:
    vapi_port, port = free_port(), free_port()
    vapi = subprocess.Popen(["node", "fake_vapi_bench.js"], cwd=node_dir, env={**os.environ, "PORT": str(vapi_port)},
                            stdout=subprocess.DEVNULL)
    server = None
    try:
        wait_http(f"http://127.0.0.1:{vapi_port}/count")
        env = {**os.environ, **env, "VAPI_BASE_URL": f"http://127.0.0.1:{vapi_port}", "PORT": str(port),
               "TWIVAPI_PORT": str(port)}
        server = subprocess.Popen(server_cmd, cwd=cwd or node_dir, env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE)
        wait_http(f"http://127.0.0.1:{port}/health")
        cpu_before = tree_cpu_seconds(server.pid)
        started = time.monotonic()
        result = load(node_dir, port, sign_base_fn(port), seconds)
        load_time = time.monotonic() - started
        answered = result["total"] - result["non2xx"]
        # Catch-up: until every answered webhook has its Vapi call, or the count stops moving (the
        # rest got the fallback: queue full or setup deadline passed).
        deadline, last, last_change = time.monotonic() + 120, -1, time.monotonic()
        while time.monotonic() < deadline:
            created = count(vapi_port)
            if created >= answered:
                break
            if created != last:
                last, last_change = created, time.monotonic()
            elif time.monotonic() - last_change > 1.0:
                break
            time.sleep(0.02)
        catch_up = max(0.0, (last_change if created < answered else time.monotonic()) - started - load_time)
        created = count(vapi_port)
        cpu = tree_cpu_seconds(server.pid) - cpu_before   # the server's, webhooks and their setups
        return {"server": name, "answer_rps": round(result["rps"]), "p50_ms": result["p50"], "p99_ms": result["p99"],
                "errors": result["errors"] + result["non2xx"], "answered": answered, "vapi_calls": created,
                "fallbacks": max(answered - created, 0), "catch_up_s": round(catch_up, 2),
                "e2e_rps": round(min(answered, created) / (load_time + catch_up)),
                "cpu_ms_per_call": round(cpu * 1000 / max(min(answered, created), 1), 3)}
    finally:
        for proc in (server, vapi):
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()


def run(quick: bool = False) -> list[dict]:
    seconds = 3 if quick else 8
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        node_dir = prepare_node(tmp_path)
        if node_dir is None:
            print(skip_line("bench_webhooks", skipping="skipping (the reference server and the load tool need them)"))
            return []
        twivapi = str(Path(sys.executable).with_name("twivapi"))
        rows = [measure(node_dir, "seed reference (express)", ["node", "server.js"],
                        {"TWILIO_AUTH_TOKEN": TOKEN, "VAPI_API_KEY": "x"}, lambda p: f"https://127.0.0.1:{p}", seconds)]
        for mode in ("stream", "bypass"):
            env = {"TWILIO_AUTH_TOKEN": TOKEN, "VAPI_API_KEY": "bench-key", "VAPI_WEBHOOK_SECRET": "s",
                   "VAPI_ASSISTANT_ID": "asst", "VAPI_PHONE_NUMBER_ID": "pn", "TWIVAPI_PUBLIC_URL": PUBLIC,
                   "TWIVAPI_MODE": mode, "TWIVAPI_STORE": f"sqlite:///{tmp_path}/{mode}.db",
                   "TWIVAPI_DRAIN_TIMEOUT": "1"}   # its calls never stream: do not wait for them at the end
            rows.append(measure(node_dir, f"twivapi {mode} (SQLite)", [twivapi, "serve", "--log-level", "warning"],
                                env, lambda p: PUBLIC, seconds, cwd=tmp_path))
    ref = rows[0]
    for row in rows[1:]:
        row["e2e_vs_ref"] = round(row["e2e_rps"] / max(ref["e2e_rps"], 1), 2)
        row["p99_vs_ref"] = round(row["p99_ms"] / max(ref["p99_ms"], 1), 2)
    return rows


if __name__ == "__main__":
    print_table(run(quick="--quick" in sys.argv))
