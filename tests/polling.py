"""Waiting for a condition in the reliability tests: poll, return the first truthy value, fail with
what was awaited once the bound passes (a hang becomes a clear failure, never a stuck run)."""

from __future__ import annotations

import asyncio
import time


def wait_for(predicate, what: str = "condition", timeout: float = 5.0, interval: float = 0.005):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"not in {timeout} s: {what}"
        time.sleep(interval)


async def until(predicate, what: str = "condition", timeout: float = 5.0, interval: float = 0.01):
    """``wait_for`` inside an event loop."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"not in {timeout} s: {what}"
        await asyncio.sleep(interval)
