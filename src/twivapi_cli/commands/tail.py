"""`twivapi tail`: live session state and latency from a running bridge."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Optional

import typer

from ._common import ENV_FILE_OPTION, errors_to_exit, load, stderr_console, stdout_console

if TYPE_CHECKING:   # `tail` itself is imported when the command runs: `twivapi --help` stays fast
    from rich.console import Group
    from rich.text import Text

    from ..tail import Filters, Notice, Target

RECENT = 12


def register(app: typer.Typer) -> None:
    @app.command("tail")
    def tail(
        url: Optional[str] = typer.Option(None, "--url", help="Admin URL (default: the bridge `serve` started "
                                                              "from this directory, found in its state dir)."),
        token: Optional[str] = typer.Option(None, "--token", help="Admin token (default: from bridge.json)."),
        call: Optional[str] = typer.Option(None, "--call", help="Only this CallSid."),
        type_: Optional[str] = typer.Option(None, "--type", help="Only event types starting with this, e.g. media."),
        since: Optional[str] = typer.Option(None, "--since", help="Start this far back, e.g. 30s, 5m, 1h."),
        as_json: bool = typer.Option(False, "--json", help="One JSON event per line, for scripts."),
        once: bool = typer.Option(False, "--once", help="Print a snapshot (or, with --json, the backlog) and exit."),
        show_numbers: bool = typer.Option(False, "--show-numbers", help="Show caller phone numbers unmasked."),
        env_file: Path = ENV_FILE_OPTION,
    ):
        """Follow a running bridge: active calls, latency (p50/p95/p99) and events as they happen."""
        import asyncio

        from .. import tail as lib

        settings = load({}, env_file)
        with errors_to_exit():
            target = _target(lib, url, token, settings.state_dir)
            filters = lib.Filters(call=call, type=type_, since_s=_since(lib, since))
            # a bridge found through bridge.json is looked up again after a restart (new port, new token)
            filters.rediscover = None if url else (lambda: lib.discover(Path(settings.state_dir)))
            runner = _json if as_json else (_snapshot if once else _live)
            asyncio.run(runner(lib, target, filters, once, show_numbers))


def _since(lib: ModuleType, text: str | None) -> float | None:
    from ..errors import UsageError
    try:
        return lib.parse_since(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _target(lib: ModuleType, url: str | None, token: str | None, state_dir: str | Path) -> Target:
    from ..errors import TargetUnreachable
    if url:
        return lib.Target(url.rstrip("/"), token)
    found = lib.discover(Path(state_dir))
    if found is None:
        raise TargetUnreachable(f"no running bridge found in {state_dir}",
                                hint="start one with `twivapi serve` in this directory, or pass --url")
    return found


async def _json(lib: ModuleType, target: Target, filters: Filters, once: bool, show_numbers: bool) -> None:
    """One event per line; after a call's vapi.report, a ``turn-budget`` line joining the bridge's
    split of each turn (its media.first-audio events) with Vapi's turn latencies."""
    turns: dict[str, list[dict[str, Any]]] = {}
    async for item in _events(lib, target, filters, once):
        if not isinstance(item, dict):   # a Notice
            stderr_console().print(f"[yellow]-- {item.message}[/yellow]")
            continue
        typer.echo(json.dumps(lib.mask_event(item, show_numbers), default=str))
        sid, kind = item.get("call_sid"), item.get("type")
        if sid and kind in ("media.first-audio", "vapi.report"):
            seen = turns.setdefault(sid, [])
            seen.append(item)
            if len(turns) > 1000:
                del turns[next(iter(turns))]
            if kind == "vapi.report":
                typer.echo(json.dumps({"type": "turn-budget", "call_sid": sid, "turns": lib.turn_budget(seen)}))


async def _events(lib: ModuleType, target: Target, filters: Filters, once: bool
                  ) -> AsyncIterator[dict[str, Any] | Notice]:
    import httpx

    from ..errors import TargetUnreachable
    try:
        async for item in lib.follow(target, filters, once=once, rediscover=filters.rediscover):
            yield item
    except httpx.TransportError:
        raise TargetUnreachable(f"no bridge answers at {target.url}",
                                hint="is `twivapi serve` running? start it, or pass the right --url") from None
    except PermissionError as exc:
        raise TargetUnreachable(str(exc)) from None


async def _snapshot(lib: ModuleType, target: Target, filters: Filters, once: bool, show_numbers: bool) -> None:
    import httpx

    from ..errors import TargetUnreachable
    from ..ui import event_line, tail_view
    try:
        snap = await lib.snapshot(target)
    except httpx.HTTPError:
        raise TargetUnreachable(f"no bridge answers at {target.url}",
                                hint="is `twivapi serve` running? start it, or pass the right --url") from None
    recent = []
    async for item in _events(lib, target, filters, True):
        if not isinstance(item, lib.Notice):
            recent.append(event_line(lib.mask_event(item, show_numbers)))
    snap["sessions"] = [lib.mask(s, show_numbers=show_numbers) for s in snap["sessions"]]
    stdout_console().print(tail_view(snap, recent[-RECENT:]))


async def _live(lib: ModuleType, target: Target, filters: Filters, once: bool, show_numbers: bool) -> None:
    import asyncio
    import collections

    from rich.live import Live

    from ..ui import event_line, notice_line, tail_view
    recent: collections.deque[Text] = collections.deque(maxlen=RECENT)
    last_snap: dict[str, Any] = {"sessions": [], "latency": {}}
    status: Text | None = None
    dropped = 0

    async def poll() -> None:
        nonlocal last_snap
        while True:
            try:
                snap = await lib.snapshot(target)
                snap["sessions"] = [lib.mask(s, show_numbers=show_numbers) for s in snap["sessions"]]
                last_snap = snap
            except Exception:  # the event stream reports outages; the panels keep their last figures
                pass
            await asyncio.sleep(1.0)

    def render() -> Group:
        return tail_view(last_snap, list(recent), status, dropped)

    poller = asyncio.create_task(poll())
    try:
        with Live(console=stdout_console(), refresh_per_second=4, get_renderable=render):
            async for item in lib.follow(target, filters, rediscover=filters.rediscover):
                if isinstance(item, lib.Notice):
                    status = notice_line(item.message, item.kind)
                    dropped += item.count
                else:
                    recent.append(event_line(lib.mask_event(item, show_numbers)))
    finally:
        poller.cancel()
