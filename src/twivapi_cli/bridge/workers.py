"""`serve --workers N`: N bridge processes on one port, so every core serves webhooks and media.

Python runs one event loop per core at most, so past one core a bridge needs processes. Each worker
is a whole bridge (``serve_forever``: its own app, admin port, Vapi client, sweeper) with its own
listening socket on the same port, bound with ``SO_REUSEPORT``: the kernel spreads new connections
over the workers' accept queues (no shared queue that one busy worker drains while another idles,
and no worker is in anyone's way when it restarts).

They share state the way separate instances do, through Redis (``TWIVAPI_STORE=redis://...``): a
call's webhooks and its media socket may land on different workers. The SQLite store is one
process's (reads from its memory, one writer thread owning the file) and the memory store is one
process's memory, so above one worker either is refused, saying why (exit 2).

The supervisor (this process) starts the workers, restarts one that dies, and passes SIGTERM and
SIGINT on to them: each drains as a single bridge does (``lifecycle.py``), and a second signal stops
them at once. The workers sit in their own process group, so a Ctrl-C reaches them once, through
here; if the supervisor is killed outright, the kernel sends them SIGTERM (``PR_SET_PDEATHSIG``).
Worker 0 writes the bridge file `twivapi tail` reads (every worker's admin port follows the one
shared event log); worker N writes its own under ``<state dir>/worker-N``.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import Settings
from ..errors import ConfigError

log = logging.getLogger("twivapi.bridge")

RESTART_PAUSE_S = 1.0     # a worker that died is started again after this long (not in a tight loop)
STOP_WAIT_S = 60.0        # after the last signal, how long the workers may take to drain and exit


def check_workers(settings: Settings) -> None:
    """ConfigError (exit 2) when ``settings.workers`` processes cannot share this store."""
    if settings.workers <= 1:
        return
    url = settings.store_url
    if url.startswith(("redis:", "rediss:")):
        return
    kind = "SQLite" if url.startswith("sqlite:") else "memory" if url.startswith("memory:") else url
    why = ("the SQLite store belongs to one process (reads are served from its memory and one writer "
           "thread owns the file), so the workers would each see only their own calls"
           if kind == "SQLite" else f"the {kind} store lives in one process's memory, so the workers would "
                                     "each see only their own calls")
    raise ConfigError(f"--workers {settings.workers} needs a store the workers share: {why}",
                      hint="set TWIVAPI_STORE=redis://127.0.0.1:6379/0 (or --store), or run one worker")


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound (not listening) with SO_REUSEPORT: the port every worker binds, resolved when
    ``port`` is 0, and held until the workers listen on it."""
    from .server import bind
    return bind(host, port, reuse_port=True)


def worker_state_dir(settings: Settings, index: int) -> Path:
    """Where worker ``index`` writes its bridge file: the state dir for worker 0 (what `twivapi tail`
    reads), ``worker-N`` below it for the others."""
    return Path(settings.state_dir) if index == 0 else Path(settings.state_dir) / f"worker-{index}"


def _die_with_parent() -> None:
    """Linux: SIGTERM this process when the supervisor dies (no orphaned workers on the port)."""
    if sys.platform.startswith("linux"):
        import ctypes
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
        except OSError:
            pass


def _worker_main(settings: Settings, index: int, log_level: str) -> None:
    """One worker: a whole bridge on the shared port (runs in a spawned process)."""
    os.setpgid(0, 0)   # signals come through the supervisor, once
    _die_with_parent()
    from .server import serve_forever

    def announce(line: str) -> None:
        if index == 0:   # one set of start-up lines, not N
            print(line, file=sys.stderr, flush=True)
    serve_forever(settings, log_level=log_level, announce=announce, reuse_port=True,
                  state_dir=worker_state_dir(settings, index))


def serve_workers(settings: Settings, *, log_level: str = "info", announce: Callable[[str], Any] = print) -> int:
    """Run ``settings.workers`` bridges on one port until SIGTERM/SIGINT; the exit code (0 when every
    worker stopped cleanly)."""
    check_workers(settings)
    placeholder = reserve_port(settings.host, settings.port)
    settings = settings.with_overrides(port=placeholder.getsockname()[1])
    context = multiprocessing.get_context("spawn")   # a fresh interpreter each: no inherited loop or threads
    workers: dict[int, Any] = {}
    stopping = {"signals": 0}

    def start(index: int) -> None:
        process = context.Process(target=_worker_main, args=(settings, index, log_level),
                                  name=f"twivapi-worker-{index}", daemon=False)
        process.start()
        workers[index] = process

    def forward(signum: int, frame: Any) -> None:
        stopping["signals"] += 1
        for process in workers.values():
            if process.pid is not None and process.exitcode is None:
                try:
                    os.kill(process.pid, signum)
                except ProcessLookupError:
                    pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for index in range(settings.workers):
            start(index)
        announce(f"twivapi serve: {settings.workers} workers on port {settings.port} (pids "
                 f"{', '.join(str(p.pid) for p in workers.values())}), sharing {_store_name(settings)}")
        placeholder.close()   # the workers hold the port now
        return _supervise(workers, start, stopping, announce)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        placeholder.close()


def _supervise(workers: dict[int, Any], start: Callable[[int], None], stopping: dict[str, int],
               announce: Callable[[str], Any]) -> int:
    codes: dict[int, int] = {}
    deadline: float | None = None
    while len(codes) < len(workers):
        if stopping["signals"] and deadline is None:
            deadline = time.monotonic() + STOP_WAIT_S
        running = {process.sentinel: index for index, process in workers.items() if index not in codes}
        multiprocessing.connection.wait(list(running), timeout=0.5)
        for index in list(running.values()):
            process = workers[index]
            if process.exitcode is None:
                if deadline is not None and time.monotonic() > deadline:
                    process.kill()
                continue
            if stopping["signals"]:
                codes[index] = process.exitcode
                continue
            announce(f"twivapi serve: worker {index} (pid {process.pid}) exited with code {process.exitcode}; "
                     "starting it again")
            time.sleep(RESTART_PAUSE_S)
            start(index)
    return max((code if code >= 0 else 1 for code in codes.values()), default=0)


def _store_name(settings: Settings) -> str:
    from .server import display_store
    return display_store(settings.store_url)
