"""Start-up time: `twivapi --help` next to `twilio --help` from npm's twilio-cli, in one run.

Both are run as a user runs them (the installed console script; twilio-cli's `bin/run` through
node), alternately, N times each after one warm-up run of each (page cache warm for both), stdout to
/dev/null; wall time from spawn to exit. Target: twivapi's median under 0.2x twilio-cli's.

twilio-cli is installed once into benchmarks/.cache/twilio-cli (`npm install --prefix`); its HOME
is a directory in that cache, and its auto-update, new-version check and analytics are switched
off, so a run reaches nothing outside this machine. Without node/npm the comparison is skipped and
said so; twivapi is still measured. `python -c pass` is measured alongside as the interpreter floor.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import missing, pct, print_table  # noqa: E402

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "twilio-cli"
TWIVAPI = str(Path(sys.executable).with_name("twivapi"))
TARGET_RATIO = 0.2


def twilio_cli() -> tuple[list[str], dict[str, str], str] | None:
    """(command, environment, version) of a cached twilio-cli, installing it first; None without npm."""
    if not (shutil.which("node") and shutil.which("npm")):
        return None
    package = CACHE / "node_modules" / "twilio-cli"
    if not (package / "bin" / "run").exists():
        print(f"bench_startup: installing twilio-cli into {CACHE} (once)", flush=True)
        subprocess.run(["npm", "install", "--prefix", str(CACHE), "--no-audit", "--no-fund", "--silent", "twilio-cli"],
                       check=True, capture_output=True, timeout=600)
    home = CACHE / "home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWILIO_")}
    env.update({"HOME": str(home), "TWILIO_DISABLE_AUTOUPDATE": "true", "TWILIO_SKIP_NEW_VERSION_CHECK": "true",
                "TWILIO_SKIP_ANALYTICS": "1", "PATH": f"{CACHE / 'node_modules' / '.bin'}{os.pathsep}{env['PATH']}"})
    version = json.loads((package / "package.json").read_text())["version"]
    return [str(CACHE / "node_modules" / ".bin" / "twilio"), "--help"], env, version


def wall_ms(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return (time.perf_counter() - started) * 1000


def check(command: list[str], env: dict[str, str], expect: str) -> None:
    """The warm-up run: it must work and print its help, or the timings mean nothing."""
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    if out.returncode != 0 or expect not in out.stdout:
        raise RuntimeError(f"{' '.join(command)} failed (exit {out.returncode}): {out.stderr[-500:]}")


def run(quick: bool = False) -> list[dict]:
    n = 5 if quick else 20
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TWILIO_", "VAPI_", "TWIVAPI_", "NGROK_"))}
    commands = {"twivapi --help": ([TWIVAPI, "--help"], env, "Usage: twivapi"),
                "python -c pass (interpreter floor)": ([sys.executable, "-c", "pass"], env, "")}
    twilio = twilio_cli()
    if twilio is None:
        print(f"bench_startup: missing {missing(('node', 'npm'))}: skipping the comparison with twilio-cli")
    else:
        command, twilio_env, version = twilio
        commands[f"twilio --help (twilio-cli {version})"] = (command, twilio_env, "USAGE")
    for command, cmd_env, expect in commands.values():
        check(command, cmd_env, expect)
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(n):   # interleaved: a noisy moment lands on every command alike
        for name, (command, cmd_env, _expect) in commands.items():
            times[name].append(wall_ms(command, cmd_env))
    rows = [{"command": name, "runs": n, "median_ms": round(statistics.median(values), 1),
             "p90_ms": pct(values, 0.9), "min_ms": round(min(values), 1)} for name, values in times.items()]
    if twilio is not None:
        reference = rows[-1]["median_ms"]
        for row in rows[:-1]:
            row["vs_twilio_cli"] = round(row["median_ms"] / reference, 3)
        rows[0]["target"] = f"< {TARGET_RATIO}x"
        rows[0]["met"] = rows[0]["vs_twilio_cli"] < TARGET_RATIO
    return rows


if __name__ == "__main__":
    print_table(run(quick="--quick" in sys.argv))
