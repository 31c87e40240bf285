"""How long the simulated Twilio and Vapi APIs take to answer: one table, one model.

A simulator that answers in a millisecond hides the bugs real latency shows (a timeout too tight, a
setup pool too small, a race between a hang-up and ``POST /call``), so both REST simulators wait
before handling every request, as the real services do, by default. The figures are our estimates
(the reference docs give none: vapi.md §2.4 only says Vapi reserves ~7.5 s for a call's setup):

==========================  ===================  ==========================================
request                     delay (min/mode/max)  why
==========================  ===================  ==========================================
Vapi ``POST /call``         300 / 380 / 600 ms   Vapi sets up the call (assistant, transport
                                                 or Twilio leg) before it answers
Vapi other writes           50 / 80 / 150 ms     POST/PATCH/DELETE of assistants, numbers...
Vapi reads                  30 / 50 / 120 ms     GET
Twilio writes (POST/DELETE) 60 / 90 / 150 ms     api.twilio.com from the US
Twilio reads (GET)          40 / 60 / 120 ms
==========================  ===================  ==========================================

Each delay is drawn from a triangular distribution (never below its minimum: a test can rely on
that), seeded when the model is. ``LatencyModel(scale)`` multiplies them: ``realistic`` is 1,
``none`` is 0 (the fastest local runs); ``twivapi sim --latency`` / ``TWIVAPI_SIM_LATENCY`` take
either name or a factor such as ``0.5``. Fault-injected ``latency`` rules (``faults.py``) come on
top. WebSockets and the ``/_sim/`` control routes are never delayed here: the transport's and the
simulated assistant's timings are its script's (``vapi_assistant.Script``).
"""

from __future__ import annotations

import asyncio
import fnmatch
import random
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    from starlette.types import ASGIApp, Receive, Scope, Send

PROFILES = {"realistic": 1.0, "none": 0.0}
DEFAULT_PROFILE = "realistic"


@dataclass(frozen=True)
class Delay:
    """A triangular distribution of delays, in milliseconds."""

    low: float
    mode: float
    high: float


@dataclass(frozen=True)
class Rule:
    method: str          # "*" = any; "WRITE" = anything but GET/HEAD
    path: str            # fnmatch pattern
    delay: Delay

    def matches(self, method: str, path: str) -> bool:
        if self.method == "WRITE":
            ok = method not in ("GET", "HEAD")
        else:
            ok = self.method in ("*", method)
        return ok and fnmatch.fnmatchcase(path, self.path)


# first match wins
VAPI: tuple[Rule, ...] = (
    Rule("POST", "/call", Delay(300, 380, 600)),
    Rule("WRITE", "*", Delay(50, 80, 150)),
    Rule("*", "*", Delay(30, 50, 120)),
)
TWILIO: tuple[Rule, ...] = (
    Rule("WRITE", "*", Delay(60, 90, 150)),
    Rule("*", "*", Delay(40, 60, 120)),
)
SERVICES = {"vapi": VAPI, "twilio": TWILIO}


def scale_of(value: str | float) -> float:
    """``realistic`` -> 1, ``none`` -> 0, ``"0.5"`` -> 0.5; ValueError for anything else."""
    if isinstance(value, (int, float)):
        number = float(value)
    elif value.strip().lower() in PROFILES:
        return PROFILES[value.strip().lower()]
    else:
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"must be {' or '.join(PROFILES)}, or a scale factor such as 0.5") from None
    if not 0.0 <= number <= 100.0:   # NaN fails this too
        raise ValueError("a scale factor must be between 0 and 100")
    return number


class LatencyModel:
    """Draws each request's delay; thread-safe (the two simulators run on their own threads)."""

    def __init__(self, scale: str | float = DEFAULT_PROFILE, seed: int | None = None):
        self.scale = scale_of(scale)
        self._random = random.Random(seed)
        self._lock = threading.Lock()

    def rule(self, service: str, method: str, path: str) -> Rule:
        return next(r for r in SERVICES[service] if r.matches(method.upper(), path))

    def minimum(self, service: str, method: str, path: str) -> float:
        """The least this request waits, in seconds (what a test may assert)."""
        return self.rule(service, method, path).delay.low * self.scale / 1000

    def delay(self, service: str, method: str, path: str) -> float:
        """Seconds to wait before answering this request."""
        if self.scale == 0.0:
            return 0.0
        spread = self.rule(service, method, path).delay
        with self._lock:
            ms = self._random.triangular(spread.low, spread.high, spread.mode)
        return ms * self.scale / 1000

    def __repr__(self) -> str:
        return f"LatencyModel(scale={self.scale})"


class LatencyMiddleware:
    """Pure ASGI middleware: waits the model's delay before every HTTP request but ``/_sim/``.

    ``model`` is a function, read per request, so a test can swap ``SimState.latency`` on a running app.
    """

    def __init__(self, app: ASGIApp, service: str, model: Callable[[], LatencyModel]):
        if service not in SERVICES:
            raise ValueError(f"service must be one of {', '.join(SERVICES)}")
        self.app, self.service, self.model = app, service, model

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith("/_sim/"):
            await self.app(scope, receive, send)
            return
        from starlette.requests import ClientDisconnect

        seconds = self.model().delay(self.service, scope["method"], scope["path"])
        if seconds:
            await asyncio.sleep(seconds)
        try:
            await self.app(scope, receive, send)
        except ClientDisconnect:   # the client gave up while we were slow (its timeout): nobody to answer
            pass
