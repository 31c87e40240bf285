"""Test helpers shared by the bridge tests: a bridge on real uvicorn, signed requests."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx

from twivapi_cli import net, signing
from twivapi_cli.bridge.app import create_app
from twivapi_cli.bridge.server import RunningServer, start_in_thread
from twivapi_cli.config import Settings, load_settings
from twivapi_cli.vapi_api import VapiClient

TOKEN = "test-auth-token-0123456789abcdef"
VAPI_SECRET = "test-vapi-webhook-secret"
VAPI_KEY = "test-vapi-key"
PUBLIC = "https://bridge.example.test"


def new_call_sid() -> str:
    return "CA" + uuid.uuid4().hex


def bridge_settings(vapi_url: str, **extra: str) -> Settings:
    env = {"TWILIO_AUTH_TOKEN": TOKEN, "VAPI_API_KEY": VAPI_KEY, "VAPI_WEBHOOK_SECRET": VAPI_SECRET,
           "VAPI_ASSISTANT_ID": "asst-test", "VAPI_PHONE_NUMBER_ID": "pn-test", "TWIVAPI_PUBLIC_URL": PUBLIC,
           "VAPI_BASE_URL": vapi_url, **extra}
    return load_settings({}, environ=env, env_file=None)


@dataclass
class Bridge:
    server: RunningServer
    app: object
    settings: Settings
    http: httpx.Client = field(default_factory=lambda: net.client(timeout=20))

    @property
    def url(self) -> str:
        return self.server.url

    def twilio(self, path: str, params: dict, *, signed_url: str | None = None, headers: dict | None = None,
               token: str = TOKEN) -> httpx.Response:
        sig = signing.twilio_signature(token, signed_url or PUBLIC + path, params)
        return self.http.post(self.url + path, data=params, headers={"X-Twilio-Signature": sig, **(headers or {})})

    def voice(self, call_sid: str, **params: str) -> httpx.Response:
        return self.twilio("/twilio/voice", {"CallSid": call_sid, "From": "+15551112222", "To": "+15553334444",
                                             "CallStatus": "ringing", "Direction": "inbound", **params})

    def status(self, call_sid: str, status: str, sequence: int | None = None, **headers: str) -> httpx.Response:
        params = {"CallSid": call_sid, "CallStatus": status}
        if sequence is not None:
            params["SequenceNumber"] = str(sequence)
        return self.twilio("/twilio/status", params, headers=headers)

    def vapi(self, message: dict, mode: str = "secret", secret: str = VAPI_SECRET) -> httpx.Response:
        body = json.dumps({"message": message}).encode()
        headers = {"content-type": "application/json", **signing.sign_vapi(secret, body, mode)}
        return self.http.post(self.url + "/vapi/webhook", content=body, headers=headers)

    @property
    def deps(self):
        """The bridge's typed dependencies (store, cluster, recorder, calls, signals, drainer, ...)."""
        return self.app.state.deps

    def session(self, call_sid: str):
        return self.server.run(lambda: self.deps.store.get_session(call_sid))

    def events(self, call_sid: str | None = None):
        return self.server.run(lambda: self.deps.store.events(0, call_sid=call_sid, limit=10_000))


def cluster_for(store):
    """The cluster that goes with a test's store: Redis beside a RedisStore (same server and prefix),
    local otherwise."""
    from twivapi_cli.cluster.local import LocalCluster
    from twivapi_cli.store.redis import RedisStore
    if isinstance(store, RedisStore):
        from twivapi_cli.cluster.redis import RedisCluster
        return RedisCluster(store.connection)
    return LocalCluster()


@contextlib.contextmanager
def running_bridge(settings: Settings, store, *, public_from_server: bool = False, cluster=None,
                   **options) -> Iterator[Bridge]:
    """A bridge on real uvicorn. ``public_from_server``: its own loopback URL is the public URL, so
    a simulated caller can follow the TwiML's stream URL."""
    from twivapi_cli.bridge.server import bind
    sock = bind()
    if public_from_server:
        settings = settings.with_overrides(public_url=f"http://127.0.0.1:{sock.getsockname()[1]}")
    vapi = VapiClient(settings.vapi_base_url, settings.vapi_api_key.reveal(),
                      max_connections=settings.setup_concurrency + 32)
    app = create_app(settings, store, cluster or cluster_for(store), vapi, **options)
    server = start_in_thread(app, sock=sock)
    bridge = Bridge(server, app, settings)
    try:
        yield bridge
    finally:
        bridge.http.close()
        server.stop()


class LoopThread:
    """An event loop on a thread of its own, like a server's (``run`` has RunningServer's signature)."""

    def __init__(self) -> None:
        import asyncio
        import threading
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="in-process-bridge", daemon=True)
        self.thread.start()

    url = "http://in-process.test"   # what requests through InProcessHTTP are addressed to

    def run(self, coroutine_factory, timeout: float = 10):
        import asyncio
        return asyncio.run_coroutine_threadsafe(coroutine_factory(), self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class InProcessHTTP:
    """``httpx.Client``'s post/get over ``httpx.ASGITransport``: the app called in-process, no socket."""

    def __init__(self, runner: LoopThread, app):
        self.runner = runner
        self.client = runner.run(lambda: _asgi_client(app))

    def post(self, url: str, **options) -> httpx.Response:
        return self.runner.run(lambda: self.client.post(url, **options))

    def get(self, url: str, **options) -> httpx.Response:
        return self.runner.run(lambda: self.client.get(url, **options))

    def close(self) -> None:
        self.runner.run(self.client.aclose)


async def _asgi_client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=LoopThread.url)


@contextlib.contextmanager
def in_process_bridge(settings: Settings, store, *, cluster=None, **options) -> Iterator[Bridge]:
    """The bridge app called in-process (its lifespan run, requests through httpx.ASGITransport): for
    the quick webhook cases; ``running_bridge`` where the wire matters (media sockets, timeouts)."""
    runner = LoopThread()
    vapi = VapiClient(settings.vapi_base_url, settings.vapi_api_key.reveal())
    app = create_app(settings, store, cluster or cluster_for(store), vapi, **options)
    lifespan = app.router.lifespan_context(app)
    runner.run(lifespan.__aenter__)
    http = InProcessHTTP(runner, app)
    try:
        yield Bridge(runner, app, settings, http=http)   # LoopThread and InProcessHTTP: the same surface
    finally:
        http.close()
        runner.run(lambda: lifespan.__aexit__(None, None, None))
        runner.stop()


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(env: dict, port: int, *args: str, timeout: float = 15):
    """A real `twivapi serve` process on 127.0.0.1:``port``, returned once /health answers 200."""
    import subprocess
    import sys
    import time
    from pathlib import Path
    twivapi = str(Path(sys.executable).with_name("twivapi"))
    proc = subprocess.Popen([twivapi, "serve", "--port", str(port), "--log-level", "warning", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("serve did not start: " + (proc.stderr.read() or "")[-2000:])
        time.sleep(0.1)


def reap(proc, sig: int | None = None, timeout: float = 10) -> int:
    """End a `start_serve` process (``sig``, default SIGKILL, unless it has exited) and close its pipe."""
    import signal
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL if sig is None else sig)
    try:
        return proc.wait(timeout)
    finally:
        if proc.stderr is not None:
            proc.stderr.close()


async def dial(bridge_url: str, plan=None, *, status_callback: bool = True, faults=None, **options):
    """One simulated call to the bridge at ``bridge_url``: its signed voice webhook, the stream the
    TwiML names, and (``status_callback``) Twilio's status callbacks to the same bridge."""
    from twivapi_cli.sim.twilio_caller import SimulatedCaller
    caller = SimulatedCaller(TOKEN, faults=faults)
    try:
        return await caller.call(bridge_url + "/twilio/voice", plan=plan,
                                 status_callback=bridge_url + "/twilio/status" if status_callback else None,
                                 **options)
    finally:
        await caller.aclose()


def place_call(bridge_url: str, plan=None, **options):
    """``dial`` from synchronous test code."""
    import asyncio
    return asyncio.run(dial(bridge_url, plan, **options))
