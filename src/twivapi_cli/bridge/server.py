"""Running the bridge on uvicorn: in the foreground (`twivapi serve`) or in a background thread
(tests, `twivapi demo`, `replay --in-process`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import uvicorn
from starlette.types import ASGIApp

from ..config import Settings, install_log_redaction
from ..errors import ConfigError, TwivapiError
from ..tail import BRIDGE_FILE

if TYPE_CHECKING:
    from .deps import Deps

log = logging.getLogger("twivapi.bridge")
T = TypeVar("T")


# uvicorn closes an idle keep-alive connection after 5 s; the proxies in front of a bridge (ngrok, a
# cloud load balancer: 60 s) and our own pooled clients (5 s) keep theirs at least as long, so they
# would send a request on a socket just closed: a reset, a 502 to Twilio. The server must outlast them.
KEEPALIVE_S = 75.0
GRACE_S = 1.0          # a server in a thread (tests, demo, sim) waits this long for open connections


def uvicorn_log_level(log_level: str) -> str:
    """uvicorn's own loggers ("uvicorn", "uvicorn.error"): its start-up and shutdown lines ("Started
    server process", "Waiting for application startup", once per server) are info; they show only at
    ``--log-level debug`` (or trace). Its warnings and errors always show; a quieter level is kept."""
    level = log_level.lower()
    if level in ("debug", "trace"):
        return level
    return level if logging.getLevelName(level.upper()) in (logging.ERROR, logging.CRITICAL) else "warning"


def display_store(url: str) -> str:
    """The store URL for a start-up line: a password in it (``redis://user:pw@host``) shown as ``***``."""
    from urllib.parse import urlsplit, urlunsplit
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port is not None else "")
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:   # unparsable (e.g. a bad port): show only the scheme
        return url.split("://", 1)[0] + "://***" if "://" in url else "***"


def startup_lines(settings: Settings, public_address: str, admin_url: str, bridge_file: Path) -> list[str]:
    """What `twivapi serve` says once it listens: where, in which mode, on which store, for which
    public URL, and how to watch it."""
    lines = [
        f"twivapi bridge: {settings.mode} mode, listening on {public_address}",
        f"  public URL: {settings.public_url or '(not set: set TWIVAPI_PUBLIC_URL or --public-url)'}",
        f"  store: {display_store(settings.store_url)}",
        f"  admin (loopback only): {admin_url}, token in {bridge_file}",
        "  watch it: twivapi tail",
    ]
    if settings.record_dir is not None:
        lines.append(f"  recording calls into {settings.record_dir} (at most {settings.record_max_mb:g} MB, "
                     f"{settings.record_max_age_days:g} days)")
    return lines


def check_public_url(settings: Settings, *, allow_ws: bool = False) -> list[str]:
    """`serve`'s start-up check of the URL Twilio is told to open the media stream at (stream mode):
    ConfigError (exit 2) when it cannot work, which is a public URL that is not https:// (the stream
    URL would be ws://, which Twilio refuses) unless its host is loopback (the simulators) or
    ``allow_ws`` (``--allow-ws``) says so; the warnings to print otherwise (a port other than 443)."""
    from ..models import Mode
    from ..twilio_media import stream_url_problems

    if settings.mode != Mode.STREAM:
        return []
    base = settings.public_url or f"http://{settings.host}:{settings.port}"
    error, warning = stream_url_problems(base)
    if error and not allow_ws:
        where = "TWIVAPI_PUBLIC_URL" if settings.public_url else "TWIVAPI_PUBLIC_URL is not set, and the bridge's address"
        raise ConfigError(f"stream mode: {where} {error}",
                          hint="set TWIVAPI_PUBLIC_URL (or --public-url) to the https:// URL Twilio reaches, e.g. "
                               "your ngrok URL (or run `twivapi serve --tunnel`); --allow-ws if a ws:// stream URL "
                               "is really meant (simulators on another host)")
    if error:
        return [f"TWIVAPI_PUBLIC_URL: {error} (allowed by --allow-ws)"]
    return [f"TWIVAPI_PUBLIC_URL: {warning}"] if warning else []


def _config(app: ASGIApp, host: str, port: int, log_level: str, keepalive: float = KEEPALIVE_S) -> uvicorn.Config:
    # The access log is off: one line per webhook costs more than the webhook itself; the event log
    # (twivapi tail) records every request instead.
    return uvicorn.Config(app, host=host, port=port, log_level=uvicorn_log_level(log_level), access_log=False,
                          lifespan="on", ws_max_size=1024 * 1024, timeout_graceful_shutdown=3,
                          timeout_keep_alive=keepalive,  # type: ignore[arg-type]  # typed int; a float works (call_later)
                          # 20 ms audio frames do not compress; deflating each one cost ~15% of the CPU
                          ws_per_message_deflate=False)


def _bind_or_explain(host: str, port: int, setting: str, reuse_port: bool = False) -> socket.socket:
    try:
        return bind(host, port, reuse_port=reuse_port)
    except OSError as exc:
        raise TwivapiError(f"cannot listen on {host}:{port} ({exc.strerror or exc})",
                           hint=f"is another bridge running? choose another port with {setting}") from None


class _QuietServer(uvicorn.Server):
    """A uvicorn server that leaves signals to us: two servers share one loop and one Ctrl-C."""

    def capture_signals(self) -> contextlib.nullcontext[None]:   # type: ignore[override]
        return contextlib.nullcontext()


def write_bridge_file(state_dir: Path, admin_url: str, token: str, public_port: int) -> Path:
    """Where `twivapi tail` finds this bridge: admin address and token, readable by the owner only."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / BRIDGE_FILE
    # written beside it, then renamed over it: a `tail` reading at that moment sees the old file or the
    # new one, never a half-written one (which it would take for no bridge at all)
    partial = path.with_name(f".{BRIDGE_FILE}.{os.getpid()}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump({"admin_url": admin_url, "token": token, "pid": os.getpid(), "port": public_port}, handle)
    os.chmod(partial, 0o600)
    os.replace(partial, path)
    return path


def serve_forever(settings: Settings, *, log_level: str = "info", announce: Callable[[str], Any] = print,
                  record_to: Path | None = None, reuse_port: bool = False, state_dir: Path | None = None) -> None:
    """The public app on --host/--port and the admin app on 127.0.0.1:<admin port>, one event loop.
    SIGTERM or Ctrl-C drains first (``lifecycle.py``); a second one stops at once. ``reuse_port``:
    the port is shared with other workers (``workers.py``); ``state_dir``: where the bridge file goes
    (default: the settings' state dir)."""
    from . import build_app
    from .admin import create_admin_app
    from .lifecycle import drain, live_calls

    install_log_redaction()
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = build_app(settings)
    if record_to is not None:
        from .recording import RecordWebhooks
        app.add_middleware(RecordWebhooks, out=record_to)
    public_sock = _bind_or_explain(settings.host, settings.port, "--port / TWIVAPI_PORT", reuse_port)
    admin_sock = _bind_or_explain("127.0.0.1", settings.admin_port, "TWIVAPI_ADMIN_PORT")  # loopback only
    token = secrets.token_urlsafe(24)
    admin_url = f"http://127.0.0.1:{admin_sock.getsockname()[1]}"
    keepalive = settings.keepalive_timeout
    public = _QuietServer(_config(app, settings.host, public_sock.getsockname()[1], log_level, keepalive))
    admin = _QuietServer(_config(create_admin_app(app, token), "127.0.0.1", admin_sock.getsockname()[1], log_level,
                                 keepalive))
    bridge_file = write_bridge_file(state_dir or Path(settings.state_dir), admin_url, token,
                                    public_sock.getsockname()[1])
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    for line in startup_lines(settings, f"http://{host}:{public_sock.getsockname()[1]}", admin_url, bridge_file):
        announce(line)

    bridge: Deps = app.state.deps
    if settings.tools:
        announce(f"  tools ({settings.tools} and the built-ins): {', '.join(bridge.tools.names)}")

    async def main() -> None:
        tune_gc()
        stopping = asyncio.Event()

        def on_signal() -> None:
            if stopping.is_set():   # the second one: stop now
                for server in (public, admin):
                    server.should_exit = server.force_exit = True
            stopping.set()

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        admin_task = asyncio.create_task(admin.serve(sockets=[admin_sock]))
        public_task = asyncio.create_task(public.serve(sockets=[public_sock]))
        stop_task = asyncio.create_task(stopping.wait())
        await asyncio.wait({public_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        if stop_task.done() and not public_task.done():
            live = len(await live_calls(bridge.store, bridge.cluster))
            announce(f"draining: /health answers 503; {live} live call(s) may go on for up to "
                     f"{settings.drain_timeout:g} s (TWIVAPI_DRAIN_TIMEOUT); a second Ctrl-C stops at once")
            ended = await drain(bridge.lifecycle, bridge.store, bridge.cluster, bridge.calls,
                                settings.drain_timeout, announce)
            announce(f"drained ({ended} call(s) ended at the deadline); stopping")
            public.should_exit = True
        stop_task.cancel()
        await public_task
        admin.should_exit = True
        await admin_task

    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            runner.run(main())
    finally:
        bridge_file.unlink(missing_ok=True)


GC_YOUNG = 20_000     # allocations between young collections (CPython's default: 700)
GC_FULL_EVERY = 100   # middle-generation collections between full ones (CPython's default: 10)


def tune_gc() -> None:
    """Keep the collector's pauses out of the acks, and its work off the webhooks.

    Most objects are what the process built to start (modules, the twilio SDK, pydantic's schemas):
    frozen, they are left out of every collection. A webhook's own garbage is freed by reference
    counting; the collector is only for cycles. What it traverses is what is alive when it runs: the
    requests and setups in flight, and what each call keeps (its session, its events in the store's
    ring). At CPython's 700 allocations a young collection came every few webhooks and traversed the
    same in-flight objects again each time; measured under bench_webhooks (8 s at 50 connections,
    SQLite), the collector took ~0.95 s of a 10 s run (1,600 young, 140 middle and two full
    collections of up to 60 ms). At 20,000: ~0.15 s (about 15 young collections of 7-16 ms, no full
    one), 10-15% less CPU per webhook and a lower ack p99; at 50,000 each young collection paused
    for 20-40 ms and the run was slower again."""
    import gc
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG, gc.get_threshold()[1], GC_FULL_EVERY)


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when it is installed (uvicorn[standard] brings it), else asyncio's. uvicorn
    picks it by itself only in ``uvicorn.run``; serve_forever runs its own loop (two servers on it),
    so it must ask: measured under bench_webhooks, asyncio's socket writes alone were 10% of the CPU."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


@dataclass
class RunningServer:
    server: uvicorn.Server
    thread: threading.Thread
    host: str
    port: int
    loop: asyncio.AbstractEventLoop | None = None

    def run(self, coroutine_factory: Callable[[], Coroutine[Any, Any, T]], timeout: float = 10) -> T:
        """Run a coroutine on the server's own event loop (e.g. read its store from a test)."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine_factory(), self.loop).result(timeout)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self, timeout: float = 10) -> None:
        """Stop gracefully, then by force: a connection still open after GRACE_S (a client that
        keeps one, however briefly) must not hold up the stop."""
        self.server.should_exit = True
        self.thread.join(min(timeout, GRACE_S))
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(timeout)


def bind(host: str = "127.0.0.1", port: int = 0, *, reuse_port: bool = False) -> socket.socket:
    """A bound listening socket: its port is known before the app is built (e.g. for a public URL).
    ``reuse_port``: other processes bind the same port too (SO_REUSEPORT; ``serve --workers``)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    # Accepted connections inherit this: uvicorn writes a response's head and body separately, and
    # with Nagle on, the body waits for the client's delayed ACK (40 ms per webhook, measured).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()   # a busy port: the caller reports it, nothing is left open
        raise
    return sock


def start_in_thread(app: ASGIApp, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                    sock: socket.socket | None = None, keepalive: float = KEEPALIVE_S) -> RunningServer:
    """Start ``app`` on its own event loop in a daemon thread; returns once it accepts connections."""
    sock = sock or bind(host, port)
    host = sock.getsockname()[0]
    server = _QuietServer(_config(app, host, sock.getsockname()[1], log_level, keepalive))   # signals: main thread's

    loops: list[asyncio.AbstractEventLoop] = []

    async def main() -> None:
        loops.append(asyncio.get_running_loop())
        await server.serve(sockets=[sock])

    def run() -> None:
        asyncio.run(main())

    thread = threading.Thread(target=run, name=f"uvicorn-{sock.getsockname()[1]}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise TwivapiError("server failed to start")
        time.sleep(0.01)
    return RunningServer(server, thread, host, sock.getsockname()[1], loops[0])
