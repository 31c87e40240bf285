"""Following a running bridge: latency histograms, masking, and the admin-stream client.

No rendering here (``ui.py`` draws, ``commands/tail.py`` prints). Three parts:

- ``Histogram`` / ``LatencyBook``: HDR-style log-bucketed histograms (about 2% relative error per
  bucket, constant memory, no list of samples) for the bridge's latency figures. The bridge keeps
  one book and serves it at ``/latency`` and ``/metrics``; tail renders it.
- ``mask_event``: phone numbers, secrets, signatures and tokens are masked unless asked otherwise.
- ``follow`` / ``snapshot`` / ``discover``: the client side of the admin endpoints, reconnecting
  with backoff when the bridge restarts and saying so.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BRIDGE_FILE = "bridge.json"      # in the state dir: the admin address and token of `serve`
SPARK = "▁▂▃▄▅▆▇█"

# The figures tail shows, from event types (name -> how to read a value in ms).
LATENCY_FROM_EVENT = {
    "vapi.call-created": ("vapi setup", "setup_ms"),
    "media.relay": ("relay", "ms"),
    "media.clear": ("barge-in -> clear", "ms"),
    "media.first-audio": ("end of speech -> first audio", "ms"),
}

# The per-turn budget: the bridge's split of each turn (on media.first-audio) and Vapi's (its
# end-of-call-report's turnLatencies, on vapi.report); figures of their own in /latency and /metrics.
BRIDGE_TURN_PARTS = {"relay_in_ms": "turn: relay in", "vapi_ms": "turn: waiting on vapi",
                     "relay_out_ms": "turn: relay out", "pacing_ms": "turn: pacing"}
VAPI_TURN_PARTS = ("transcriber", "endpointing", "model", "voice", "turn")


def turn_budget(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One call's turns, joined in order: the bridge's ``media.first-audio`` splits with Vapi's
    ``turnLatencies`` (from ``vapi.report``). ``heard_ms``: end of the caller's speech -> first
    assistant audio at the caller, Vapi's turn latency plus the bridge's relay in, relay out and
    pacing (None until both sides are known)."""
    bridge = [e.get("data") or {} for e in events if e.get("type") == "media.first-audio"]
    vapi: list[dict[str, Any]] = []
    for event in events:
        if event.get("type") == "vapi.report":
            vapi = [t for t in (event.get("data") or {}).get("turn_latencies") or [] if isinstance(t, dict)]
    rows = []
    for index in range(max(len(bridge), len(vapi))):
        ours = bridge[index] if index < len(bridge) else {}
        theirs = vapi[index] if index < len(vapi) else {}
        row: dict[str, Any] = {"turn": index + 1, "bridge_ms": ours.get("ms")}
        row.update({field[:-3] + "_ms": ours.get(field) for field in BRIDGE_TURN_PARTS})
        row.update({f"vapi_{part}_ms": theirs.get(part) for part in VAPI_TURN_PARTS})
        parts = [row["vapi_turn_ms"], row["relay_in_ms"], row["relay_out_ms"], row["pacing_ms"]]
        row["heard_ms"] = round(sum(parts), 3) if all(isinstance(p, (int, float)) for p in parts) else None
        rows.append(row)
    return rows


class Histogram:
    """Log-bucketed histogram of positive values (ms): bucket i holds [G^i, G^(i+1)) with G = 1.04."""

    GROWTH = 1.04
    FLOOR = 0.01   # values below 10 µs land in bucket 0

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.count = 0
        self.total = 0.0
        self.max = 0.0

    def _bucket(self, value: float) -> int:
        return max(0, int(math.log(max(value, self.FLOOR) / self.FLOOR, self.GROWTH)))

    def _value(self, bucket: int) -> float:
        return self.FLOOR * self.GROWTH ** (bucket + 0.5)

    def add(self, value: float) -> None:
        bucket = self._bucket(value)
        self.counts[bucket] = self.counts.get(bucket, 0) + 1
        self.count += 1
        self.total += value
        self.max = max(self.max, value)

    def quantile(self, q: float) -> float | None:
        if not self.count:
            return None
        rank = q * self.count
        seen = 0
        for bucket in sorted(self.counts):
            seen += self.counts[bucket]
            if seen >= rank:
                return min(self._value(bucket), self.max)
        return self.max

    def sparkline(self, width: int = 16) -> str:
        """Counts across the observed range, low to high values, as block characters."""
        if not self.counts:
            return ""
        low, high = min(self.counts), max(self.counts)
        span = max(1, high - low + 1)
        cells = [0] * min(width, span)
        for bucket, n in self.counts.items():
            cells[(bucket - low) * len(cells) // span] += n
        top = max(cells)
        return "".join(SPARK[min(len(SPARK) - 1, n * (len(SPARK) - 1) // top)] if n else " " for n in cells)

    def snapshot(self) -> dict[str, Any]:
        return {"count": self.count, "p50": _r(self.quantile(0.5)), "p95": _r(self.quantile(0.95)),
                "p99": _r(self.quantile(0.99)), "max": _r(self.max) if self.count else None,
                "mean": _r(self.total / self.count) if self.count else None, "spark": self.sparkline()}


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


class LatencyBook:
    """One histogram per figure; fed by the bridge's recorder."""

    def __init__(self) -> None:
        self.histograms: dict[str, Histogram] = {}

    def add(self, name: str, ms: float | None) -> None:
        if ms is None or not isinstance(ms, (int, float)) or ms < 0:
            return
        self.histograms.setdefault(name, Histogram()).add(float(ms))

    def observe_event(self, event_type: str, data: dict) -> tuple[str, float] | None:
        if event_type == "media.first-audio":   # the turn's split, each part a figure of its own
            for field, name in BRIDGE_TURN_PARTS.items():
                self.add(name, data.get(field))
        elif event_type == "vapi.report":
            for turn in data.get("turn_latencies") or []:
                for part in VAPI_TURN_PARTS:
                    self.add(f"turn: vapi {part}", turn.get(part) if isinstance(turn, dict) else None)
        known = LATENCY_FROM_EVENT.get(event_type)
        if known and isinstance(data.get(known[1]), (int, float)):
            self.add(known[0], data[known[1]])
            return known[0], data[known[1]]
        return None

    def snapshot(self) -> dict[str, dict]:
        return {name: h.snapshot() for name, h in sorted(self.histograms.items())}


# --- masking ----------------------------------------------------------------------------------------

PHONE = re.compile(r"\+?\d{7,15}")
SECRET_KEYS = re.compile(r"token|secret|signature|authorization|password|api_?key", re.I)


def mask_phone(value: str) -> str:
    return PHONE.sub(lambda m: m.group()[:5] + "***" + m.group()[-4:] if len(m.group()) > 9 else "***", value)


def mask(value: Any, key: str = "", show_numbers: bool = False) -> Any:
    if SECRET_KEYS.search(key):
        return "***"
    if isinstance(value, dict):
        return {k: mask(v, k, show_numbers) for k, v in value.items()}
    if isinstance(value, list):
        return [mask(v, key, show_numbers) for v in value]
    if isinstance(value, str) and not show_numbers and key not in ("call_sid", "vapi_call_id", "stream_sid"):
        return mask_phone(value)
    return value


def mask_event(event: dict, show_numbers: bool = False) -> dict:
    return {**event, "data": mask(event.get("data") or {}, show_numbers=show_numbers)}


# --- the client ---------------------------------------------------------------------------------------

@dataclass
class Target:
    url: str
    token: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


def discover(state_dir: Path) -> Target | None:
    """The admin address and token `serve` recorded in this directory's state dir, if any."""
    path = Path(state_dir) / BRIDGE_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return Target(data["admin_url"], data.get("token")) if data.get("admin_url") else None


def parse_since(text: str | None) -> float | None:
    """'5m', '30s', '1h', '250ms' -> seconds."""
    if not text:
        return None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text.strip())
    if not match:
        raise ValueError(f"--since {text!r}: use a number and a unit, e.g. 30s, 5m, 1h")
    number, unit = float(match.group(1)), match.group(2)
    return number * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


@dataclass
class Notice:
    """Something tail should say that is not an event: connected, reconnecting, dropped events."""

    kind: str           # "connected" | "disconnected" | "dropped"
    message: str
    count: int = 0


@dataclass
class Filters:
    call: str | None = None
    type: str | None = None
    since_s: float | None = None
    rediscover: Callable[[], Target | None] | None = None

    def query(self, after: int) -> dict:
        query: dict[str, Any] = {"after": after}
        if self.call:
            query["call"] = self.call
        if self.type:
            query["type"] = self.type
        if self.since_s is not None and after == 0:
            query["since"] = time.time() - self.since_s
        return query


async def follow(target: Target, filters: Filters, *, once: bool = False, retry_max: float = 5.0,
                 client=None, rediscover: Callable[[], Target | None] | None = None
                 ) -> AsyncIterator[dict | Notice]:
    """Events from the admin stream, in order, forever (or until caught up with ``once``).

    Reconnects with backoff after the bridge goes away, resuming after the last event seen, and
    yields a ``Notice`` for every connect, disconnect and batch of events the bridge dropped for us.
    ``rediscover`` re-reads bridge.json before each attempt: a restarted bridge has a new port and
    token.
    """
    import httpx

    after = 0
    backoff = 0.2
    own = client is None
    client = client or httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None))
    try:
        while True:
            if rediscover is not None:
                target = rediscover() or target
            try:
                query = {**filters.query(after), **({"once": 1} if once else {})}
                async with client.stream("GET", target.url + "/events", params=query, headers=target.headers) as r:
                    if r.status_code == 401:
                        if rediscover is None or once:
                            raise PermissionError("the bridge refused the admin token (is this the right "
                                                  "bridge.json, or --token?)")
                        r.raise_for_status()
                    r.raise_for_status()
                    yield Notice("connected", f"connected to {target.url}")
                    backoff = 0.2
                    async for kind, payload in _sse(r.aiter_lines()):
                        if kind == "event":
                            after = max(after, payload.get("seq") or 0)
                            yield payload
                        elif kind == "dropped":
                            yield Notice("dropped", f"the bridge dropped {payload['dropped']} events for this "
                                                    f"viewer (too slow)", payload["dropped"])
                if once:
                    return
                yield Notice("disconnected", "the bridge closed the stream; reconnecting")
            except (httpx.TransportError, httpx.HTTPStatusError) as exc:
                if once:
                    raise
                yield Notice("disconnected", f"bridge unreachable ({type(exc).__name__}); retrying in {backoff:.1f}s")
                await asyncio.sleep(backoff)
                backoff = min(retry_max, backoff * 2)
    finally:
        if own:
            await client.aclose()


async def _sse(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str, dict]]:
    kind, data = "message", []
    async for line in lines:
        if line.startswith(":"):
            continue
        if line.startswith("event:"):
            kind = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif not line and data:
            try:
                yield kind, json.loads("\n".join(data))
            except ValueError:
                pass
            kind, data = "message", []


async def snapshot(target: Target, client=None) -> dict:
    """Active sessions and latency figures, one request each."""
    import httpx

    own = client is None
    client = client or httpx.AsyncClient(timeout=5.0)
    try:
        sessions = await client.get(target.url + "/sessions", headers=target.headers)
        latency = await client.get(target.url + "/latency", headers=target.headers)
        sessions.raise_for_status()
        latency.raise_for_status()
        return {"sessions": sessions.json()["sessions"], "latency": latency.json()["latency"],
                "counters": latency.json().get("counters", {})}
    finally:
        if own:
            await client.aclose()
