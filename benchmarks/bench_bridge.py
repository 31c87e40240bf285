"""N concurrent calls through one server process at real time: twivapi's bridge beside the cost floor
of its stack and beside pipecat, side by side in one run (issue: the media bridge; issue 19).

Processes on loopback: the simulators (`twivapi sim`, the assistant echoes what it hears), the server
under test, and this load generator (N lean Media Streams callers, 20 ms frames paced at real time).
The servers, each with the same callers:

- `twivapi serve` relaying to the simulated Vapi transport (which echoes);
- the bare relay (`bare_relay.py`): the same stack (Starlette on uvicorn, aiohttp's WebSocket client to
  the same Vapi transport) doing only JSON parse, base64 decode and forward: the floor;
- pipecat's Twilio echo bot (`pipecat_echo.py`: FastAPIWebsocketTransport + TwilioFrameSerializer, a
  bot that only echoes), when the benchmark-only extra is installed (`pip install -e '.[bench]'`);
  without it the bench says so and leaves its rows out.

Measured per run, server CPU only (from /proc, user + system, the server process and its children):

- CPU per call-second and what that means in calls per core;
- audio returned: payload bytes back at the caller over the bytes that had time to come back;
- round-trip latency per frame (caller -> server -> Vapi -> server -> caller; mu-law through twivapi and
  the bare relay, where the bytes come back bit-exact and carry their frame number) and twivapi's own
  relay stamps; frames lost (sent but never echoed back, before the interruption);
- barge-in (twivapi only): a `user-interrupted` webhook near the end of each call -> `clear` at the
  caller, and the bridge's own signal-to-clear stamps.

The callers echo every mark at once, as Twilio does when its playback reaches it. A last row runs the
first load again through `serve --record` (both legs to a WAV per call): recording's cost is the
difference in CPU per call-second.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import websockets

from twivapi_cli import signing

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import free_port, pct, print_table, stop, tree_cpu_seconds, wait_http  # noqa: E402

TWIVAPI = str(Path(sys.executable).with_name("twivapi"))
TOKEN = "bench-auth-token-0123456789abcdef"
SECRET = "bench-webhook-secret"
KEY = "bench-vapi-key"


def start_sims(env: dict) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen([TWIVAPI, "sim", "--twilio-port", "0", "--vapi-port", "0", "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, text=True)
    values: dict[str, str] = {}
    while "VAPI_BASE_URL" not in values or "TWILIO_API_BASE_URL" not in values:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("twivapi sim did not start")
        if "=" in line and not line.startswith("#"):
            name, _, value = line.strip().partition("=")
            values[name] = value.strip("'\"")
    return proc, values


TWIVAPI_SERVER, BARE_SERVER, PIPECAT_SERVER = "twivapi", "bare relay", "pipecat echo bot"
INSTALL_PIPECAT = "pip install -e '.[bench]'"


def pipecat_missing() -> str | None:
    """Why pipecat's rows cannot run here (it is a benchmark-only extra), or None."""
    import importlib.util
    for module in ("pipecat", "fastapi"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed ({INSTALL_PIPECAT} installs pipecat-ai[websocket])"
    return None


class Caller:
    def __init__(self, bridge: str, seconds: float, numbered: bool, barge_in: bool):
        self.bridge, self.seconds, self.numbered, self.barge_in = bridge, seconds, numbered, barge_in
        self.sid = "CA" + uuid.uuid4().hex
        self.sent_at: dict[int, float] = {}
        self.rtt: list[float] = []
        self.echoed: set[int] = set()
        self.frames_back = 0
        self.bytes_back = 0
        self.marks = 0   # marks received (and echoed)
        self.interrupt_at: float | None = None
        self.clear_ms: float | None = None
        self.closed_early = False

    async def run(self, http: httpx.AsyncClient, delay: float = 0.0) -> None:
        await asyncio.sleep(delay)   # calls arrive over a ramp, as traffic does, not all in one instant
        params = {"CallSid": self.sid, "From": "+15550001111", "To": "+15550002222", "CallStatus": "ringing"}
        url = self.bridge + "/twilio/voice"
        await http.post(url, data=params, headers={"X-Twilio-Signature": signing.twilio_signature(TOKEN, url, params)})
        ws_url = self.bridge.replace("http", "ws") + "/twilio/media"
        async with websockets.connect(ws_url, compression=None, additional_headers={
                "X-Twilio-Signature": signing.twilio_signature(TOKEN, ws_url, {})}) as ws:
            stream_sid = "MZ" + uuid.uuid4().hex
            await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
            await ws.send(json.dumps({"event": "start", "streamSid": stream_sid, "start": {
                "streamSid": stream_sid, "callSid": self.sid, "tracks": ["inbound"],
                "customParameters": {signing.STREAM_TOKEN_PARAM: signing.stream_token(TOKEN, self.sid)},
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}}))
            receiver = asyncio.create_task(self.receive(ws))
            await self.send(ws, stream_sid, http)
            # the echo's way back: twivapi plays what waited for Vapi's socket at real time, so its
            # echo may trail by the setup time; stop once it is all back (or after 3 s)
            deadline = time.monotonic() + 3
            while self.returned() < 1.0 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            try:
                await ws.send(json.dumps({"event": "stop", "streamSid": stream_sid, "stop": {"callSid": self.sid}}))
                await asyncio.sleep(0.1)
            except websockets.ConnectionClosed:
                self.closed_early = True   # the server ended the call first (counted, not a crash)
            receiver.cancel()

    async def send(self, ws, stream_sid: str, http: httpx.AsyncClient) -> None:
        frames = int(self.seconds * 50)
        # the messages are built before the clock starts: the load generator shares the machine's two
        # cores with the server under test, and must spend as little of them as it can
        texts = [json.dumps({"event": "media", "streamSid": stream_sid, "media": {
            "track": "inbound", "chunk": str(n + 1), "timestamp": str(n * 20),
            "payload": base64.b64encode(n.to_bytes(2, "big") + bytes([0x55]) * 158).decode()}})   # a loud frame
                 for n in range(frames)]                                                            # with its number
        start = time.monotonic()
        for n, text in enumerate(texts):
            self.sent_at[n] = time.monotonic()
            try:
                await ws.send(text)
            except websockets.ConnectionClosed:
                self.closed_early = True
                return
            if self.barge_in and n == frames - 40:   # 0.8 s before the end: the caller interrupts
                asyncio.create_task(self.interrupt(http))
            await asyncio.sleep(max(0.0, start + (n + 1) * 0.02 - time.monotonic()))

    async def interrupt(self, http: httpx.AsyncClient) -> None:
        body = json.dumps({"message": {"type": "user-interrupted", "turnId": "t",
                                       "call": {"phoneCallProviderId": self.sid}}}).encode()
        self.interrupt_at = time.monotonic()
        await http.post(self.bridge + "/vapi/webhook", content=body, headers=signing.sign_vapi(SECRET, body))

    async def receive(self, ws) -> None:
        # read cheaply, without a JSON parse: the payload's length, and its first bytes (the frame number)
        async for raw in ws:
            at = raw.find('"payload"')
            if at >= 0:
                begin = raw.index('"', raw.index(":", at) + 1) + 1
                encoded = raw[begin:raw.index('"', begin)]
                self.frames_back += 1
                self.bytes_back += len(encoded) // 4 * 3 - encoded.count("=", -2)
                if self.numbered:
                    n = int.from_bytes(base64.b64decode(encoded[:4])[:2], "big")
                    if n in self.sent_at and n not in self.echoed:
                        self.echoed.add(n)
                        self.rtt.append((time.monotonic() - self.sent_at[n]) * 1000)
            elif '"mark"' in raw:   # played at once: echoed, as Twilio does when its playback reaches it
                message = json.loads(raw)
                self.marks += 1
                await ws.send(json.dumps({"event": "mark", "streamSid": message.get("streamSid"),
                                          "mark": message.get("mark")}))
            elif '"clear"' in raw and self.interrupt_at and self.clear_ms is None:
                self.clear_ms = (time.monotonic() - self.interrupt_at) * 1000

    def cutoff(self) -> int:
        """Frames that had time to come back: all of them, or those well before the interruption. The
        echo trails the caller by the setup time (early audio is held until Vapi's socket opens, then
        played at real time; POST /call takes 300-600 ms): 1 s before the interruption is well before."""
        frames = int(self.seconds * 50)
        return frames - 40 - 50 if self.barge_in else frames

    def lost(self) -> int:
        return sum(1 for n in range(self.cutoff()) if n not in self.echoed) if self.numbered else 0

    def returned(self) -> float:
        """Audio back over audio expected back (bytes; a clear drops what followed the interruption)."""
        return min(1.0, self.bytes_back / (self.cutoff() * 160))


RAMP_CALLS_PER_S = 50   # callers start at this rate (100 calls: over 2 s)


async def call_all(callers: list[Caller]) -> None:
    """Every caller, started RAMP_CALLS_PER_S a second (100 calls that all dial within one instant
    time their setups, not the media path: the echo then trails by seconds, paced at real time)."""
    async with httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_connections=100)) as http:
        await asyncio.gather(*(c.run(http, i / RAMP_CALLS_PER_S) for i, c in enumerate(callers)))


def start_server(server: str, port: int, env: dict, values: dict, assistant: str, audio_format: str,
                 tmp: Path, record: bool = False) -> subprocess.Popen:
    here = Path(__file__).resolve().parent
    if server == TWIVAPI_SERVER:
        bridge_env = {**env, "VAPI_BASE_URL": values["VAPI_BASE_URL"], "VAPI_ASSISTANT_ID": assistant,
                      "TWIVAPI_PUBLIC_URL": f"http://127.0.0.1:{port}", "TWIVAPI_STORE": f"sqlite:///{tmp}/bridge.db",
                      "TWIVAPI_AUDIO_FORMAT": audio_format, "TWIVAPI_SETUP_QUEUE_LIMIT": "5000",
                      "TWIVAPI_DRAIN_TIMEOUT": "1", "TWIVAPI_STATE_DIR": str(tmp / "state")}
        if record:   # serve --record: both legs to a WAV per call
            bridge_env["TWIVAPI_RECORD_DIR"] = str(tmp / "recordings")
        return subprocess.Popen([TWIVAPI, "serve", "--port", str(port), "--log-level", "warning"], env=bridge_env,
                                cwd=tmp, stderr=subprocess.DEVNULL)
    if server == BARE_SERVER:
        cmd = [sys.executable, str(here / "bare_relay.py"), str(port), values["VAPI_BASE_URL"], KEY, assistant,
               audio_format]
    else:
        cmd = [sys.executable, str(here / "pipecat_echo.py"), str(port), audio_format]
    with open(tmp / "server.log", "wb") as log:   # kept for a look when its figures are odd
        return subprocess.Popen(cmd, env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=log)


def run_one(server: str, calls: int, seconds: float, audio_format: str, tmp: Path, record: bool = False) -> dict:
    tmp = tmp / f"{server.split()[0]}-{calls}-{audio_format}{'-record' if record else ''}"
    tmp.mkdir()
    env = {**os.environ, "TWILIO_AUTH_TOKEN": TOKEN, "VAPI_API_KEY": KEY, "VAPI_WEBHOOK_SECRET": SECRET}
    sims, values = start_sims(env)
    proc = None
    twivapi = server == TWIVAPI_SERVER
    try:
        assistant = httpx.post(values["VAPI_BASE_URL"] + "/assistant", headers={"Authorization": f"Bearer {KEY}"},
                               json={"name": "bench-echo", "metadata": {"simulator": {"behavior": "echo"}}}).json()
        port = free_port()
        public = f"http://127.0.0.1:{port}"
        proc = start_server(server, port, env, values, assistant["id"], audio_format, tmp, record)
        wait_http(public + "/health", timeout=60)
        numbered = audio_format == "mulaw-8k" and server != PIPECAT_SERVER   # pipecat re-frames its output
        callers = [Caller(public, seconds, numbered, barge_in=twivapi) for _ in range(calls)]
        cpu_before, wall_before = tree_cpu_seconds(proc.pid), time.monotonic()

        asyncio.run(call_all(callers))
        cpu = tree_cpu_seconds(proc.pid) - cpu_before
        wall = time.monotonic() - wall_before
        rows: list = []
        if twivapi:
            time.sleep(0.3)
            with contextlib.closing(sqlite3.connect(tmp / "bridge.db")) as db:
                rows = db.execute("SELECT type, data FROM events WHERE type IN ('media.relay', 'media.clear')").fetchall()
    finally:
        stop(proc, sims)
    relay = [json.loads(d)["ms"] for t, d in rows if t == "media.relay"]
    clear_internal = [json.loads(d)["ms"] for t, d in rows if t == "media.clear"]
    rtt = [v for c in callers for v in c.rtt]
    clears = [c.clear_ms for c in callers if c.clear_ms is not None]
    call_seconds = calls * seconds
    row = {"server": server + (" --record" if record else ""), "format": audio_format, "calls": calls,
           "seconds": seconds,
           "server_cpu_s": round(cpu, 2), "cpu_util": round(cpu / wall, 2),
           "cpu_ms_per_call_s": round(cpu / call_seconds * 1000, 2),
           "calls_per_core": round(call_seconds / cpu) if cpu else None,
           "audio_returned_pct": round(100 * sum(c.returned() for c in callers) / calls, 1),
           "rtt_p50_ms": pct(rtt, 0.5), "rtt_p99_ms": pct(rtt, 0.99),
           "frames_sent": sum(len(c.sent_at) for c in callers), "frames_back": sum(c.frames_back for c in callers),
           "frames_lost": sum(c.lost() for c in callers) if numbered else None,
           "marks_per_call_s": round(sum(c.marks for c in callers) / call_seconds, 1),
           "closed_early": sum(c.closed_early for c in callers)}
    if twivapi:
        row.update({"relay_p50_ms": pct(relay, 0.5), "relay_p99_ms": pct(relay, 0.99),
                    "clears": f"{len(clears)}/{calls}", "bargein_clear_p50_ms": pct(clears, 0.5),
                    "bargein_clear_p99_ms": pct(clears, 0.99),
                    "bridge_signal_to_clear_p99_ms": pct(clear_internal, 0.99)})
    return row


def with_ratios(rows: list[dict]) -> list[dict]:
    """twivapi's CPU per call-second over each other server's, same format and calls (vs_bare, vs_pipecat)."""
    for row in rows:
        if row["server"] != TWIVAPI_SERVER:
            continue
        for other, key in ((BARE_SERVER, "vs_bare"), (PIPECAT_SERVER, "vs_pipecat")):
            peer = next((r for r in rows if r["server"] == other and r["format"] == row["format"]
                         and r["calls"] == row["calls"]), None)
            if peer and peer["cpu_ms_per_call_s"]:
                row[key] = round(row["cpu_ms_per_call_s"] / peer["cpu_ms_per_call_s"], 2)
    return rows


def run(quick: bool = False, servers: tuple[str, ...] | None = None) -> list[dict]:
    # 20 calls: a load pipecat carries (at 40 it saturates its core), so its CPU figure is its own cost;
    # 100 calls: the goal's load (pipecat's row there shows what it returns when saturated)
    plan = [(20, 4, "mulaw-8k"), (10, 4, "pcm16-16k")] if quick else \
        [(20, 10, "mulaw-8k"), (100, 10, "mulaw-8k"), (100, 10, "pcm16-16k")]
    servers = servers or (TWIVAPI_SERVER, BARE_SERVER, PIPECAT_SERVER)
    lacking = pipecat_missing()
    if PIPECAT_SERVER in servers and lacking:
        print(f"bench_bridge: {lacking}: skipping the pipecat rows")
        servers = tuple(s for s in servers if s != PIPECAT_SERVER)
    with tempfile.TemporaryDirectory() as tmp:
        rows = with_ratios([run_one(server, calls, seconds, fmt, Path(tmp))
                            for calls, seconds, fmt in plan for server in servers])
        if TWIVAPI_SERVER in servers:   # the first load again with `serve --record`: what recording costs
            calls, seconds, fmt = plan[0]
            rows.append(run_one(TWIVAPI_SERVER, calls, seconds, fmt, Path(tmp), record=True))
        if os.environ.get("BENCH_KEEP_LOGS"):
            subprocess.run(["sh", "-c", f"tail -n 20 {tmp}/*/server.log"])
        return rows


if __name__ == "__main__":
    chosen = tuple(arg for i, arg in enumerate(sys.argv) if sys.argv[i - 1] == "--server")
    print_table(run(quick="--quick" in sys.argv, servers=chosen or None))
