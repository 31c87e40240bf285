"""`twivapi inspect`: open the call inspector of the bridge `serve` started here, in the browser."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._common import ENV_FILE_OPTION, errors_to_exit, load


def inspector_url(admin_url: str, token: str | None, call: str | None = None) -> str:
    """The inspector's URL on the admin port, with the run's token (and, to open one call, its page)."""
    from urllib.parse import quote
    url = admin_url.rstrip("/") + "/inspect" + (f"?token={quote(token, safe='')}" if token else "")
    return url + (f"#call={call}" if call else "")


def register(app: typer.Typer) -> None:
    @app.command("inspect")
    def inspect(
        call: Optional[str] = typer.Option(None, "--call", help="Open this call's page (its CallSid)."),
        print_url: bool = typer.Option(False, "--print-url", help="Print the URL (token included) and exit."),
        url: Optional[str] = typer.Option(None, "--url", help="Admin URL (default: the bridge `serve` started "
                                                              "from this directory, found in its state dir)."),
        token: Optional[str] = typer.Option(None, "--token", help="Admin token (default: from bridge.json)."),
        env_file: Path = ENV_FILE_OPTION,
    ):
        """The call inspector: calls, timelines, both legs' audio, per-turn latency, in the browser."""
        import re

        from .. import tail as lib
        from ..errors import TargetUnreachable, UsageError

        settings = load({}, env_file)
        with errors_to_exit():
            if call is not None and not re.fullmatch(r"CA[0-9a-fA-F]{32}", call):
                raise UsageError(f"--call {call!r} is not a CallSid (CA followed by 32 hex digits)")
            target = lib.Target(url.rstrip("/"), token) if url else lib.discover(Path(settings.state_dir))
            if target is None:
                raise TargetUnreachable(f"no running bridge found in {settings.state_dir}",
                                        hint="start one with `twivapi serve` in this directory, or pass --url")
            address = inspector_url(target.url, token or target.token, call)
            if print_url:
                typer.echo(address)
                return
            import webbrowser
            if not webbrowser.open(address):
                typer.echo(f"no browser to open; the inspector is at {address}", err=True)
