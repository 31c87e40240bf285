"""Replay as a load generator: signed voice webhooks/s against a trivial local sink at concurrency 50,
next to autocannon (npm) sending the same kind of pre-signed request in the same run.

Replay signs every request itself (a new CallSid per run, as a fixture does); autocannon replays one
pre-signed request. Needs node + npm; without them the comparison is skipped and said so.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from twivapi_cli import signing

sys.path.insert(0, str(HERE := Path(__file__).resolve().parent))
from common import free_port, missing  # noqa: E402

TWIVAPI = str(Path(sys.executable).with_name("twivapi"))
TOKEN = "bench-auth-token-0123456789abcdef"
SINK_JS = """require('http').createServer((q, s) => { q.resume(); q.on('end', () => { s.writeHead(204); s.end(); }); })
  .listen(Number(process.env.PORT), '127.0.0.1', () => console.log('sink up'));"""


def run(quick: bool = False) -> list[dict]:
    lacking = missing(("node", "npm"))
    if lacking:
        print(f"bench_replay: missing {lacking}: skipping the comparison with autocannon")
        return []
    seconds = 3 if quick else 8
    runs = 1500 if quick else 6000
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "package.json").write_text('{"private": true, "dependencies": {"autocannon": "^8.0.0"}}')
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent"], cwd=tmp_path, check=True,
                       capture_output=True, timeout=300)
        (tmp_path / "sink.js").write_text(SINK_JS)
        port = free_port()
        sink = subprocess.Popen(["node", "sink.js"], cwd=tmp_path, env={**os.environ, "PORT": str(port)},
                                stdout=subprocess.PIPE, text=True)
        sink.stdout.readline()
        url = f"http://127.0.0.1:{port}"
        try:
            params = {"CallSid": "CA" + "0" * 32, "From": "+15550001111", "To": "+15550002222", "CallStatus": "ringing"}
            body = "&".join(f"{k}={v.replace('+', '%2B')}" for k, v in params.items())
            signature = signing.twilio_signature(TOKEN, url + "/twilio/voice", params)
            out = subprocess.run(["npx", "autocannon", "-c", "50", "-d", str(seconds), "-m", "POST", "-j",
                                  "-H", "content-type=application/x-www-form-urlencoded",
                                  "-H", f"x-twilio-signature={signature}", "-b", body, url + "/twilio/voice"],
                                 cwd=tmp_path, capture_output=True, text=True, check=True)
            cannon = json.loads(out.stdout)
            fixture = tmp_path / "voice.json"
            fixture.write_text(json.dumps({"name": "voice", "steps": [{"twilio": "voice",
                                                                        "expect": {"status": 204}}]}))
            proc = subprocess.Popen([TWIVAPI, "replay", str(fixture), "--target", url, "--repeat", str(runs),
                                     "--concurrency", "50", "--json"], env={**os.environ, "TWILIO_AUTH_TOKEN": TOKEN},
                                    stdout=subprocess.PIPE, text=True)
            lines, first = [], None
            for line in proc.stdout:   # timed from the first result: process start-up is not load
                first = first or time.monotonic()
                lines.append(json.loads(line))
            elapsed = time.monotonic() - first
            proc.wait()
        finally:
            sink.terminate()
    latencies = sorted(line["ms"] for line in lines)
    replay_rps = len(lines) / elapsed
    return [{"tool": "autocannon (pre-signed)", "requests": cannon["requests"]["total"],
             "rps": round(cannon["requests"]["average"]), "p50_ms": cannon["latency"]["p50"],
             "p99_ms": cannon["latency"]["p99"], "errors": cannon["errors"] + cannon["non2xx"]},
            {"tool": "twivapi replay (signs each)", "requests": len(lines), "rps": round(replay_rps),
             "p50_ms": round(latencies[len(latencies) // 2], 2), "p99_ms": round(latencies[int(len(latencies) * 0.99)], 2),
             "errors": sum(1 for line in lines if not line["ok"]),
             "vs_autocannon": round(replay_rps / max(cannon["requests"]["average"], 1), 3)}]


if __name__ == "__main__":
    rows = run(quick="--quick" in sys.argv)
    if rows:
        print(f"# machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
        cols = list(dict.fromkeys(k for row in rows for k in row))
        print(" | ".join(cols))
        for row in rows:
            print(" | ".join(str(row.get(c, "")) for c in cols))
