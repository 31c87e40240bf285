"""Secrets never leak, from anything twivapi does.

One run (module scope, ~20 s) of the whole demo and every command with known fake secrets for
TWILIO_AUTH_TOKEN, VAPI_API_KEY, VAPI_WEBHOOK_SECRET and NGROK_AUTHTOKEN:

- `twivapi sim` (a subprocess, uvicorn at debug): the accounts everything below talks to;
- `config` (and `--table`), `provision --dry-run` (table and `--json`), `provision --yes`, `doctor`;
- `fixtures record` (a real bridge subprocess) fed by `replay --target` (bundled fixtures, media
  included) and by the simulated Vapi's own server messages; `tail --once --json` and `tail --once`
  against it; the admin endpoints probed on both ports;
- `serve --tunnel --log-level debug` through a stand-in ngrok, with a call replayed through it;
- `teardown`, `replay --in-process`, `demo` (its own simulated accounts: their demo credentials are
  checked too), `fixtures validate` / `schema`, `--help`, `--version`;
- failing invocations: a malformed setting, a wrong Twilio token, a wrong Vapi key, dead APIs, a
  dead target, a dead admin URL, no bridge, a bad fixture, a busy port, an ngrok that prints its
  authtoken in its error (as ngrok's ERR_NGROK_105 does).

Collected: stdout and stderr of every command, every log record emitted in this process (root
logger at DEBUG, including loggers that do not propagate) and the subprocesses' stderr, the
recorded fixtures, every file of the state dir while each bridge runs and after. Each test below
checks one claim against that.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from twivapi_cli.cli import app
from twivapi_cli.sim.state import DEMO_AUTH_TOKEN, DEMO_VAPI_API_KEY, DEMO_WEBHOOK_SECRET

ROOT = Path(__file__).resolve().parents[1]
TWIVAPI = str(Path(sys.executable).with_name("twivapi"))
ACCOUNT_SID = "AC" + "5ec2e75" * 4 + "5ec2"   # not a secret (it is shown); just not the demo one

SECRETS = {
    "TWILIO_AUTH_TOKEN": "twtok-9f3c1a7e5b2d4860c4e1",
    "VAPI_API_KEY": "vapikey-2b8e6d4f0a9c1e3577d2",
    "VAPI_WEBHOOK_SECRET": "vapihook-7d1f5b3e9c0a2e46b8f3",
    "NGROK_AUTHTOKEN": "ngroktok-4a6c8e0b2d1f3a59e7c5",
}
WRONG = {   # secrets the failing invocations use: a wrong secret must not be echoed either
    "TWILIO_AUTH_TOKEN": "twtok-wrong-0e2c4a6b8d1f3e5a7c9b",
    "VAPI_API_KEY": "vapikey-wrong-6f4d2b0e8c1a3f5d7b9e",
}
DEMO = {"demo auth token": DEMO_AUTH_TOKEN, "demo Vapi key": DEMO_VAPI_API_KEY,
        "demo webhook secret": DEMO_WEBHOOK_SECRET}


def _needles() -> dict[str, str]:
    """Every form a secret could leak in: whole, a 16-character head or tail (a truncated or
    half-masked value), base64 (alone, and as HTTP Basic auth with the account SID)."""
    out: dict[str, str] = {}
    values = {**SECRETS, **{f"wrong {k}": v for k, v in WRONG.items()}, **DEMO}
    for name, value in values.items():
        out[name] = value
        out[f"{name} (base64)"] = base64.b64encode(value.encode()).decode().rstrip("=")
        if name not in DEMO:   # the demo values are mostly zeros: a fragment of one is no secret
            out[f"{name} (head)"] = value[:16]
            out[f"{name} (tail)"] = value[-16:]
    for name in ("TWILIO_AUTH_TOKEN", "wrong TWILIO_AUTH_TOKEN"):
        for sid in (ACCOUNT_SID, "AC" + "0" * 32):
            out[f"{name} (basic auth)"] = base64.b64encode(f"{sid}:{values[name]}".encode()).decode()[:40]
    return out


NEEDLES = _needles()


def leaks(text: str | bytes) -> list[str]:
    if isinstance(text, bytes):
        return [name for name, needle in NEEDLES.items() if needle.encode() in text]
    return [name for name, needle in NEEDLES.items() if needle in text]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Run:
    """Everything the run produced, by label."""
    outputs: dict[str, str] = field(default_factory=dict)      # stdout + stderr of successful commands
    errors: dict[str, str] = field(default_factory=dict)       # stdout + stderr of failing commands
    exit_codes: dict[str, int | None] = field(default_factory=dict)
    logs: list[str] = field(default_factory=list)              # formatted records from this process
    files: dict[str, bytes] = field(default_factory=dict)      # "<when>: <path>" -> bytes
    modes: dict[str, int] = field(default_factory=dict)        # "<when>: <path>" -> permission bits
    recorded: dict[str, str] = field(default_factory=dict)     # recorded fixtures
    admin: dict[str, int] = field(default_factory=dict)        # "<port> <path> <auth>" -> status
    admin_urls: dict[str, str] = field(default_factory=dict)


class LogCapture(logging.Handler):
    """Sees every record any logger hands to its handlers, whether or not it propagates to root."""

    def __init__(self, sink: list[str]):
        super().__init__(logging.DEBUG)
        self.sink = sink
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sink.append(self.format(record))
        except Exception:   # a record that cannot be formatted cannot be printed either
            self.sink.append(f"{record.name} {record.levelname} {record.msg!r} {record.args!r}")


class Proc:
    """A `twivapi` subprocess whose stdout and stderr are read as they come (pipes never fill)."""

    def __init__(self, label: str, args: list[str], env: dict[str, str]):
        self.label = label
        self.proc = subprocess.Popen([TWIVAPI, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, errors="replace")
        self.out: list[str] = []
        self.err: list[str] = []
        self.readers = [threading.Thread(target=self._read, args=(self.proc.stdout, self.out), daemon=True),
                        threading.Thread(target=self._read, args=(self.proc.stderr, self.err), daemon=True)]
        for reader in self.readers:
            reader.start()

    @staticmethod
    def _read(stream, sink: list[str]) -> None:
        for line in stream:
            sink.append(line)

    def wait_for(self, predicate, what: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{self.label}: {what} never happened\n{self.text()}")
            time.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        for reader in self.readers:
            reader.join(5)
        return code

    def text(self) -> str:
        return "".join(self.out) + "".join(self.err)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    result = Run()
    work = tmp_path_factory.mktemp("secrets")
    state = work / "state"
    runner = CliRunner()
    capture = LogCapture(result.logs)
    original_call_handlers = logging.Logger.callHandlers

    def call_handlers(self, record):
        capture.handle(record)
        original_call_handlers(self, record)

    with pytest.MonkeyPatch.context() as mp:
        # The session's autouse isolation is function-scoped; this module-scoped run does its own.
        for name in list(os.environ):
            if name.startswith(("TWILIO_", "VAPI_", "TWIVAPI_", "NGROK_")):
                mp.delenv(name)
        mp.chdir(work)   # no ./.env of the developer's
        mp.setattr(logging.Logger, "callHandlers", call_handlers)
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.DEBUG)
        try:
            _everything(result, work, state, runner)
        finally:
            root.setLevel(level)
    return result


def _snapshot(result: Run, when: str, *dirs: Path) -> None:
    for base in dirs:
        for path in sorted(p for p in base.rglob("*") if p.is_file()):
            key = f"{when}: {path.relative_to(base.parent)}"
            result.files[key] = path.read_bytes()
            result.modes[key] = stat.S_IMODE(path.stat().st_mode)


def _everything(result: Run, work: Path, state: Path, runner: CliRunner) -> None:
    base = {**SECRETS, "TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWIVAPI_STATE_DIR": str(state), "COLUMNS": "200"}
    sub_env = {**{k: v for k, v in os.environ.items() if not k.startswith(("TWILIO_", "VAPI_", "TWIVAPI_", "NGROK_"))},
               **base, "PYTHONUNBUFFERED": "1"}

    def cli(label: str, args: list[str], env: dict, expect: int, *, failing: bool = False) -> str:
        outcome = runner.invoke(app, args, env=env)
        text = outcome.stdout + outcome.stderr
        if outcome.exception is not None and not isinstance(outcome.exception, SystemExit):
            text += "".join(traceback.format_exception(outcome.exception))
        (result.errors if failing else result.outputs)[label] = text
        result.exit_codes[label] = outcome.exit_code
        assert outcome.exit_code == expect, f"{label}: exit {outcome.exit_code}, expected {expect}\n{text}"
        return outcome.stdout

    def finish(proc: Proc, label: str, *, failing: bool = False) -> int:
        code = proc.stop()
        (result.errors if failing else result.outputs)[label] = proc.text()
        result.exit_codes[label] = code
        return code

    procs: list[Proc] = []
    try:
        # --- the simulated accounts, as `twivapi sim` runs them -------------------------------------
        sim = Proc("sim", ["sim", "--twilio-port", "0", "--vapi-port", "0", "--log-level", "debug"], sub_env)
        procs.append(sim)
        # stdout and stderr are read by two threads: wait for both (the settings come on stdout)
        sim.wait_for(lambda: "Ctrl-C to stop" in "".join(sim.err) and "VAPI_BASE_URL=" in "".join(sim.out),
                     "the simulators starting")
        printed = dict(line.strip().partition("=")[::2] for line in sim.out if "=" in line and not line.startswith("#"))
        accounts = {"TWILIO_API_BASE_URL": printed["TWILIO_API_BASE_URL"], "VAPI_BASE_URL": printed["VAPI_BASE_URL"]}
        port = free_port()
        public = f"http://127.0.0.1:{port}"
        env = {**base, **accounts, "TWIVAPI_PUBLIC_URL": public}

        # --- settings and provisioning -------------------------------------------------------------
        cli("config", ["config"], env, 0)
        cli("config --table", ["config", "--table"], env, 0)
        cli("provision --dry-run", ["provision", "--dry-run", "--area-code", "415"], env, 0)
        cli("provision --dry-run --json", ["provision", "--dry-run", "--json"], env, 0)
        assistant_file = work / "assistant.yaml"   # the simulated voice greets long enough for inbound_call
        assistant_file.write_text("metadata:\n  simulator:\n    greeting_ms: 2000\n    reply_ms: 500\n")
        cli("provision --yes --json", ["provision", "--yes", "--json", "--area-code", "415",
                                       "--assistant-file", str(assistant_file)], env, 0)
        cli("doctor", ["doctor"], env, 0)
        assistant_id = json.loads((state / "provision.json").read_text())["assistant"]["id"]
        env["VAPI_ASSISTANT_ID"] = assistant_id
        _snapshot(result, "provisioned", state)

        # --- a recording bridge, driven by replay and by the simulated Vapi -------------------------
        recorded = work / "recorded"
        bridge = Proc("fixtures record", ["fixtures", "record", "--out", str(recorded), "--port", str(port)],
                      {**sub_env, **env})
        procs.append(bridge)
        bridge.wait_for(lambda: (state / "bridge.json").exists() and _answers(public), "the bridge answering")
        cli("replay --target", ["replay", "--target", public, str(ROOT / "fixtures" / "inbound_call.json"),
                                str(ROOT / "fixtures" / "tool_call.json")], env, 0)
        cli("replay --target --json", ["replay", "--target", public, "--json",
                                       str(ROOT / "fixtures" / "end_of_call_report.json")], env, 0)
        time.sleep(0.3)   # the simulated Vapi's last server messages land
        events = cli("tail --once --json", ["tail", "--once", "--json"], env, 0)
        assert events.count("\n") > 10, events
        cli("tail --once", ["tail", "--once"], env, 0)
        _probe_admin(result, state, public)
        _snapshot(result, "recording bridge running", state)
        assert finish(bridge, "fixtures record") == 0
        result.recorded = {p.name: p.read_text() for p in sorted(recorded.glob("*.json"))}

        # --- serve --tunnel at debug level, a call through it ---------------------------------------
        tunnel_port = free_port()
        ngrok = _stand_in_ngrok(work / "ngrok", leaky=False)
        served = Proc("serve --tunnel", ["serve", "--tunnel", "--port", str(tunnel_port), "--log-level", "debug"],
                      {**sub_env, **env, "TWIVAPI_NGROK_PATH": ngrok})
        procs.append(served)
        served.wait_for(lambda: "tunnel: https://" in "".join(served.err) and (state / "bridge.json").exists()
                        and _answers(f"http://127.0.0.1:{tunnel_port}"), "the tunnel and the bridge answering")
        tunnel_url = "".join(served.err).split("tunnel: ", 1)[1].split()[0]
        cli("replay through the tunnel", ["replay", "--target", f"http://127.0.0.1:{tunnel_port}", "--public-url",
                                          tunnel_url, str(ROOT / "fixtures" / "inbound_call.json")], env, 0)
        _snapshot(result, "tunnel bridge running", state)
        assert finish(served, "serve --tunnel") == 0

        cli("teardown", ["teardown", "--yes"], env, 0)
        _snapshot(result, "after teardown", state)

        # --- failing invocations --------------------------------------------------------------------
        dead = f"http://127.0.0.1:{free_port()}"
        cli("malformed setting", ["config"], {**env, "TWIVAPI_PORT": "not-a-port"}, 2, failing=True)
        cli("wrong Twilio token", ["provision", "--yes"], {**env, "TWILIO_AUTH_TOKEN": WRONG["TWILIO_AUTH_TOKEN"]},
            3, failing=True)
        cli("wrong Vapi key", ["doctor"], {**env, "VAPI_API_KEY": WRONG["VAPI_API_KEY"]}, 1, failing=True)
        cli("dead APIs", ["provision", "--yes"], {**env, "TWILIO_API_BASE_URL": dead, "VAPI_BASE_URL": dead}, 3,
            failing=True)
        cli("dead replay target", ["replay", "--target", dead, str(ROOT / "fixtures" / "tool_call.json")], env, 3,
            failing=True)
        cli("dead admin URL", ["tail", "--once", "--url", dead, "--token", SECRETS["VAPI_WEBHOOK_SECRET"]], env, 3,
            failing=True)
        cli("no bridge", ["tail", "--once"], env, 3, failing=True)
        bad = work / "bad.json"
        bad.write_text(json.dumps({"name": "bad", "steps": [{"twilio": "voice", "expect": {"status": "often"}}]}))
        cli("bad fixture", ["replay", "--target", public, str(bad)], env, 2, failing=True)
        busy = Proc("busy port", ["serve", "--port", accounts["VAPI_BASE_URL"].rsplit(":", 1)[1]], {**sub_env, **env})
        procs.append(busy)
        busy.proc.wait(30)
        assert finish(busy, "busy port", failing=True) != 0
        leaky = Proc("ngrok error", ["serve", "--tunnel", "--port", str(free_port())],
                     {**sub_env, **env, "TWIVAPI_NGROK_PATH": _stand_in_ngrok(work / "leaky-ngrok", leaky=True)})
        procs.append(leaky)
        leaky.proc.wait(30)
        assert finish(leaky, "ngrok error", failing=True) == 3

        # --- what needs no accounts ----------------------------------------------------------------
        cli("replay --in-process", ["replay", "--in-process", str(ROOT / "fixtures" / "tool_call.json")], env, 0)
        cli("fixtures validate", ["fixtures", "validate", str(ROOT / "fixtures")], env, 0)
        cli("fixtures schema", ["fixtures", "schema"], env, 0)
        cli("--help", ["--help"], env, 0)
        cli("--version", ["--version"], env, 0)
        demo = runner.invoke(app, ["demo"], env=env)
        result.outputs["demo"] = demo.stdout + demo.stderr
        result.exit_codes["demo"] = demo.exit_code
        assert demo.exit_code in (0, 1) and "tool-call" in demo.stdout, demo.output   # 1: a call misbehaved
        _snapshot(result, "the end", state, recorded)
        assert finish(sim, "sim", failing=False) == 0
    finally:
        for proc in procs:
            if proc.proc.poll() is None:
                proc.stop(signal.SIGKILL)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _probe_admin(result: Run, state: Path, public: str) -> None:
    info = json.loads((state / "bridge.json").read_text())
    admin, token = info["admin_url"], info["token"]
    result.admin_urls = {"admin": admin, "public": public}
    with httpx.Client(timeout=5) as client:
        for path in ("/events?once=1", "/sessions", "/latency", "/metrics"):
            for where, url in (("public", public), ("admin", admin)):
                for auth, headers in (("token", {"Authorization": f"Bearer {token}"}), ("none", {})):
                    result.admin[f"{where} {path} {auth}"] = client.get(url + path, headers=headers).status_code


def _stand_in_ngrok(path: Path, *, leaky: bool) -> str:
    """tests/fake_ngrok.py; the leaky one fails the way ngrok does on a bad authtoken, token included."""
    source = (Path(__file__).parent / "fake_ngrok.py").read_text()
    # pyngrok names tunnels "http-<port>-<uuid>"; a host starting with "http" confuses replay's
    # public-URL -> target mapping of the stream URL, so this stand-in names its hosts otherwise
    source = source.replace('f"https://{name}.fake-ngrok.test"', 'f"https://t{uuid.uuid4().hex[:12]}.fake-ngrok.test"')
    assert "https://t{uuid" in source
    if leaky:
        source = source.replace('    if "--authtoken" not in argv:',
                                '    if "--authtoken" in argv:\n'
                                '        token = argv[argv.index("--authtoken") + 1]\n'
                                '        log("eror", "session closing", obj="tunnels.session", err="authentication '
                                'failed: The authtoken you specified is invalid. Your authtoken: " + token + '
                                '" ERR_NGROK_105")\n'
                                '        return 1\n'
                                '    if "--authtoken" not in argv:', 1)
        assert "Your authtoken" in source
    path.write_text(f"#!{sys.executable}\n" + source)
    path.chmod(0o755)
    return str(path)


# --- the claims ------------------------------------------------------------------------------------


def test_every_command_ran_and_produced_output(run):
    expected = {"sim", "config", "provision --dry-run", "provision --yes --json", "doctor", "fixtures record",
                "replay --target", "tail --once --json", "tail --once", "serve --tunnel", "teardown",
                "replay --in-process", "demo", "fixtures validate"}
    assert expected <= set(run.outputs), sorted(run.outputs)
    assert all(run.outputs[name].strip() for name in expected)
    assert len(run.errors) == 10 and all(text.strip() for text in run.errors.values()), run.errors


def test_no_secret_in_any_stdout_or_stderr(run):
    found = {label: leaks(text) for label, text in run.outputs.items() if leaks(text)}
    assert not found, found


def test_no_secret_in_any_log_record(run):
    assert len(run.logs) > 100   # debug logging was on: the check below saw something
    found = [(line[:300], leaks(line)) for line in run.logs if leaks(line)]
    assert not found, found[:10]


def test_no_secret_in_recorded_fixtures(run):
    assert len(run.recorded) >= 3   # one per replayed call
    assert any('"vapi"' in text for text in run.recorded.values())   # the simulated Vapi's messages too
    found = {name: leaks(text) for name, text in run.recorded.items() if leaks(text)}
    assert not found, found


def test_no_secret_in_any_state_file(run):
    names = {key.split(": ", 1)[1] for key in run.files}
    assert {"state/provision.json", "state/bridge.json", "state/twivapi.db"} <= names, sorted(names)
    found = {key: leaks(data) for key, data in run.files.items() if leaks(data)}
    assert not found, found


def test_no_secret_in_any_error_message(run):
    assert "TWIVAPI_PORT" in run.errors["malformed setting"]
    assert "TWILIO_AUTH_TOKEN" in run.errors["wrong Twilio token"]
    assert "ngrok did not start" in run.errors["ngrok error"]
    found = {label: leaks(text) for label, text in run.errors.items() if leaks(text)}
    assert not found, found


def test_admin_endpoints_refuse_requests_on_the_public_port(run):
    paths = ("/events?once=1", "/sessions", "/latency", "/metrics")
    for path in paths:
        assert run.admin[f"public {path} token"] == 404, (path, run.admin)   # not there, even with the token
        assert run.admin[f"public {path} none"] == 404, (path, run.admin)
        assert run.admin[f"admin {path} none"] == 401, (path, run.admin)
        assert run.admin[f"admin {path} token"] == 200, (path, run.admin)
    assert run.admin_urls["admin"].startswith("http://127.0.0.1:") and run.admin_urls["admin"] != run.admin_urls["public"]


def test_state_files_are_0600(run):
    checked = {key: mode for key, mode in run.modes.items()
               if key.endswith(("state/provision.json", "state/bridge.json"))}
    assert any("bridge.json" in key for key in checked) and any("provision.json" in key for key in checked)
    assert all(mode == 0o600 for mode in checked.values()), {k: oct(m) for k, m in checked.items()}


def test_a_secret_in_a_logged_message_or_traceback_is_scrubbed(caplog):
    from twivapi_cli.config import Secret
    value = "tb-secret-3e5a7c9b1d2f4a6c"
    Secret(value)   # every Secret's value is scrubbed from log records, whoever logs them
    log = logging.getLogger("twivapi.test-secrets")
    with caplog.at_level(logging.ERROR, "twivapi.test-secrets"):
        try:
            raise RuntimeError(f"the API said no to {value}")
        except RuntimeError:
            log.exception("call failed: %s", value)
    assert "call failed: ***" in caplog.text and "the API said no to ***" in caplog.text
    assert value not in caplog.text
