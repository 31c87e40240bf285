"""Tool calls from Vapi (`tool-calls` server messages), dispatched to a small registry.

A handler takes the call's arguments (a dict) and returns a string or JSON-able value; it may be
sync or async. Unknown tools and failing handlers give an ``error`` result, never an HTTP error:
Vapi ignores anything but a 200 (reference/vapi.md §2.3). Results are single-line strings.

Built-in tools (``serve --tools module:attr`` adds yours: ``twivapi_cli/tools.py``; or register a
handler with ``ToolRegistry.register``):
- ``get_time``: the current UTC time, ISO 8601.
- ``echo``: returns its arguments as JSON (handy in fixtures).
- ``lookup_order``: demo data: ``{"order_id": "A1"}`` -> the order's status.
"""

from __future__ import annotations

import asyncio
import datetime
import inspect
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config import Settings
    from ..tools import Tool

HANDLER_TIMEOUT = 15.0  # below Vapi's default 20 s server timeout
DEMO_ORDERS = {"A1": "shipped", "B2": "processing", "C3": "delivered"}


def _get_time(_: dict) -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _echo(args: dict) -> dict:
    return args


def _lookup_order(args: dict) -> str:
    order_id = str(args.get("order_id", ""))
    if order_id not in DEMO_ORDERS:
        raise ValueError(f"no order {order_id!r}")
    return f"order {order_id} is {DEMO_ORDERS[order_id]}"


def _one_line(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), default=str)
    return " ".join(text.splitlines())


def _arguments(raw: Any) -> dict:
    """Vapi sends arguments as an object or as a JSON string (reference/vapi.md §2.5): accept both."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw) if raw.strip() else {}
        except (ValueError, RecursionError):   # RecursionError: a string of thousands of brackets
            return {}
    return raw if isinstance(raw, dict) else {}


class ToolRegistry:
    def __init__(self) -> None:
        self._handlers: dict[str, Callable[[dict], Any]] = {}
        self._timeouts: dict[str, float] = {}

    @classmethod
    def default(cls) -> ToolRegistry:
        registry = cls()
        registry.register("get_time", _get_time)
        registry.register("echo", _echo)
        registry.register("lookup_order", _lookup_order)
        return registry

    @classmethod
    def from_settings(cls, settings: Settings) -> ToolRegistry:
        """The built-ins, and the tools ``TWIVAPI_TOOLS`` names (theirs win on a shared name);
        UsageError (exit 2) when that module does not import."""
        registry = cls.default()
        if settings.tools:
            from ..tools import load_tools
            for found in load_tools(settings.tools):
                registry.add(found, settings.tool_timeout)
        return registry

    def register(self, name: str, handler: Callable[[dict], Any], timeout: float = HANDLER_TIMEOUT) -> None:
        self._handlers[name] = handler
        self._timeouts[name] = timeout

    def add(self, tool: Tool, timeout: float) -> None:
        """A ``twivapi_cli.tools.Tool``: its arguments validated, run within its (or this) timeout."""
        self.register(tool.name, lambda args: tool.run(args, timeout), tool.timeout or timeout)

    @property
    def names(self) -> list[str]:
        return sorted(self._handlers)

    async def run_one(self, call: dict) -> dict:
        call_id = str(call.get("id", ""))
        function: dict = call["function"] if isinstance(call.get("function"), dict) else call
        name = str(function.get("name", ""))
        args = _arguments(function.get("arguments", function.get("parameters")))
        handler = self._handlers.get(name)
        if handler is None:
            return {"toolCallId": call_id, "name": name, "error": f"unknown tool '{name}'"}
        try:
            result = handler(args)
            if inspect.isawaitable(result):
                result = await asyncio.wait_for(result, self._timeouts[name])
        except TimeoutError:
            return {"toolCallId": call_id, "name": name, "error": f"tool '{name}' timed out"}
        except Exception as exc:  # a failing tool is an answer to Vapi, not a crash
            return {"toolCallId": call_id, "name": name, "error": _one_line(f"{type(exc).__name__}: {exc}")}
        return {"toolCallId": call_id, "name": name, "result": _one_line(result)}

    async def run(self, message: dict) -> dict:
        """The reply to a tool-calls message: results in call order."""
        calls = message.get("toolCallList") or message.get("toolCalls") or []
        if not isinstance(calls, list):
            calls = []
        results = await asyncio.gather(*(self.run_one(c) for c in calls if isinstance(c, dict)))
        return {"results": list(results)}
