"""Helpers every benchmark uses: free ports, waiting for a server, CPU time of a process, tables."""

from __future__ import annotations

import os
import platform
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def missing(tools: Sequence[str] = ("node", "npm"), directories: Sequence[tuple[str, Path]] = (),
            which: Callable[[str], str | None] | None = None) -> str | None:
    """What a comparison needs and this machine lacks, each named: ``npm (not on PATH)``, ``the seed's
    reference server (no directory /x/seed-express)``; None when nothing is missing."""
    which = which or shutil.which
    lacking = [f"{tool} (not on PATH)" for tool in tools if not which(tool)]
    lacking += [f"{what} (no directory {path})" for what, path in directories if not Path(path).is_dir()]
    return ", ".join(lacking) or None


def stop(*procs: subprocess.Popen | None, timeout: float = 20) -> None:
    """SIGTERM each process (a bridge drains, then exits), SIGKILL one that takes longer than ``timeout``."""
    for proc in procs:
        if proc is None:
            continue
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            kids += [int(k) for k in task.read_text().split()]
        except OSError:   # the thread or process is gone
            pass
    return kids


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its live descendants (``serve --workers N``'s
    processes, a multiprocessing supervisor's children)."""
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        try:
            total += cpu_seconds(current)
        except OSError:
            continue
        todo += _children(current)
    return total


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


def print_table(rows: list[dict]) -> None:
    print(f"# machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    if not rows:
        return
    cols = list(dict.fromkeys(k for row in rows for k in row))
    print(" | ".join(cols))
    for row in rows:
        print(" | ".join(str(row.get(c, "")) for c in cols))
