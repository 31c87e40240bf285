"""Stopping for a deploy: drain, then end what is left, then stop.

On SIGTERM (or Ctrl-C) ``serve`` drains: ``/health`` answers 503 ``draining`` so a load balancer
stops sending, new calls are turned away (below), and the calls this instance holds go on until
they end by themselves or ``TWIVAPI_DRAIN_TIMEOUT`` passes; the rest are then ended cleanly, their
Vapi side included (``bridge-shutdown``), and the process exits 0. A second signal stops at once.

A new voice webhook while draining: with no other live instance, the caller hears the fallback
(a short apology and a hang-up: better than a call that is cut in the middle). With others live
(Redis, heartbeats), Twilio is told to ``<Redirect>`` to the public URL once, which the load
balancer, seeing this instance's 503, sends to one of them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ..cluster import Cluster
from ..errors import TwivapiError
from ..store import Store
from .calls import Calls

log = logging.getLogger("twivapi.bridge")

SETTLE_S = 2.0       # after ending the last calls: time for their sockets and Vapi ends to go out
POLL_S = 0.2


@dataclass
class Lifecycle:
    """Whether this bridge is draining, and since when (mutable: the one changing part of ``Deps``)."""
    draining_since: float | None = None
    ended_at_shutdown: list[str] = field(default_factory=list)

    @property
    def draining(self) -> bool:
        return self.draining_since is not None


async def live_calls(store: Store, cluster: Cluster) -> list[str]:
    """The CallSids of the live calls this instance holds."""
    return [s.call_sid for s in await store.active_sessions() if s.instance in (None, cluster.instance)]


async def drain(lifecycle: Lifecycle, store: Store, cluster: Cluster, calls: Calls, timeout: float,
                announce: Callable[[str], Any] = log.info) -> int:
    """Drain (see the module docstring); returns how many calls had to be ended at the deadline."""
    lifecycle.draining_since = time.monotonic()
    deadline = lifecycle.draining_since + timeout
    left: list[str] = []
    while time.monotonic() < deadline:
        try:
            left = await live_calls(store, cluster)
        except TwivapiError:
            left = []   # the store is down: nothing we could end cleanly anyway
        if not left:
            break
        await asyncio.sleep(POLL_S)
    else:
        left = await _ignore_store_errors(live_calls(store, cluster))
    if left:
        announce(f"drain timeout: ending {len(left)} call(s) still live")
    for call_sid in left:
        try:
            if await calls.end(call_sid, "bridge-shutdown"):
                lifecycle.ended_at_shutdown.append(call_sid)
        except TwivapiError as exc:
            log.warning("could not end %s at shutdown: %s", call_sid, exc)
    if left:
        await calls.stop(timeout=SETTLE_S)   # their Vapi sides: ended, not left running
        await asyncio.sleep(min(SETTLE_S, 0.5))   # their media sockets close on the END signal
    return len(left)


async def _ignore_store_errors(coroutine: Awaitable[list[str]]) -> list[str]:
    try:
        return await coroutine
    except TwivapiError:
        return []
