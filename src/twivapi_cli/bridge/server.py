"""Running the bridge on uvicorn: in the foreground (`twivapi serve`) or in a background thread
(tests, `twivapi demo`, `replay --in-process`)."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from dataclasses import dataclass

import uvicorn

from ..config import Settings
from ..errors import TwivapiError

log = logging.getLogger("twivapi.bridge")


def _config(app, host: str, port: int, log_level: str) -> uvicorn.Config:
    # The access log is off: one line per webhook costs more than the webhook itself; the event log
    # (twivapi tail) records every request instead.
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                          lifespan="on", ws_max_size=1024 * 1024, timeout_graceful_shutdown=3,
                          # 20 ms audio frames do not compress; deflating each one cost ~15% of the CPU
                          ws_per_message_deflate=False)


def check_port_free(host: str, port: int, flag: str = "--port") -> None:
    if port == 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            raise TwivapiError(f"{host}:{port} is already in use", hint=f"choose another with {flag}") from None


def serve_forever(settings: Settings, *, log_level: str = "info") -> None:
    from . import build_app

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = build_app(settings)
    check_port_free(settings.host, settings.port)
    log.info("twivapi bridge (%s mode) on http://%s:%s, public URL %s", settings.mode, settings.host,
             settings.port, settings.public_url or "(not set)")
    uvicorn.Server(_config(app, settings.host, settings.port, log_level)).run()


@dataclass
class RunningServer:
    server: uvicorn.Server
    thread: threading.Thread
    host: str
    port: int
    loop: asyncio.AbstractEventLoop | None = None

    def run(self, coroutine_factory, timeout: float = 10):
        """Run a coroutine on the server's own event loop (e.g. read its store from a test)."""
        return asyncio.run_coroutine_threadsafe(coroutine_factory(), self.loop).result(timeout)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self, timeout: float = 10) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def bind(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A bound listening socket: its port is known before the app is built (e.g. for a public URL)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def start_in_thread(app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                    sock: socket.socket | None = None) -> RunningServer:
    """Start ``app`` on its own event loop in a daemon thread; returns once it accepts connections."""
    sock = sock or bind(host, port)
    host = sock.getsockname()[0]
    server = uvicorn.Server(_config(app, host, sock.getsockname()[1], log_level))
    server.install_signal_handlers = lambda: None  # only the main thread may; harmless elsewhere

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
