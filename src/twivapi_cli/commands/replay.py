"""`twivapi replay`: run fixture scenarios against a server (or in-process) with expectations."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._common import ENV_FILE_OPTION, errors_to_exit, load, stdout_console


def register(app: typer.Typer) -> None:
    @app.command("replay")
    def replay(
        fixtures: list[Path] = typer.Argument(..., help="Fixture files or directories of them."),
        target: Optional[str] = typer.Option(None, "--target", help="Base URL of the server under test."),
        in_process: bool = typer.Option(False, "--in-process", help="Start the bridge and the simulators here."),
        public_url: Optional[str] = typer.Option(None, "--public-url",
                                                 help="URL the target validates signatures against (default: --target)."),
        set_: list[str] = typer.Option([], "--set", help="Override a variable: --set call.from=+15550001111."),
        concurrency: int = typer.Option(1, "--concurrency", min=1, max=500, help="Runs at once (load mode)."),
        repeat: int = typer.Option(1, "--repeat", min=1, max=100_000, help="Runs of each fixture."),
        junit: Optional[Path] = typer.Option(None, "--junit", help="Write JUnit XML here."),
        as_json: bool = typer.Option(False, "--json", help="One JSON object per step and run on stdout, nothing else."),
        twilio_token: Optional[str] = typer.Option(None, "--twilio-token", envvar=None,
                                                   help="Signing token (default: TWILIO_AUTH_TOKEN)."),
        vapi_secret: Optional[str] = typer.Option(None, "--vapi-secret", help="Default: VAPI_WEBHOOK_SECRET."),
        route: list[str] = typer.Option(
            [], "--route", help="Map a route to the target's path, repeatable: --route twilio.status=/calls/status "
                                "(twilio.voice, twilio.status, twilio.after-stream, twilio.stream-status, vapi, media)."),
        profile: Optional[Path] = typer.Option(
            None, "--profile", help="Read the route mapping ([replay.routes]) from this TOML file instead of "
                                    "./twivapi.toml; --route overrides it."),
        env_file: Path = ENV_FILE_OPTION,
    ):
        """Replay signed Twilio/Vapi webhooks and media from fixture files and check expectations.
        Exit codes: 0 all met, 1 an expectation failed, 2 usage or fixture error, 3 target unreachable."""
        import asyncio

        from ..errors import UsageError
        from ..replay_cli import run_replay

        settings = load({}, env_file)
        with errors_to_exit():
            if bool(target) == in_process:
                raise UsageError("give exactly one of --target URL or --in-process")
            overrides = dict(_pair(item) for item in set_)
            routes: dict[str, str] = {}
            if in_process and (route or profile):
                raise UsageError("--route and --profile map a --target's paths; --in-process runs our own bridge")
            if not in_process:   # ./twivapi.toml describes the user's server: not read for --in-process
                from ..replay_cli import resolve_routes
                routes, sources = resolve_routes(route, profile)
                if routes:
                    typer.echo("twivapi: routes (" + ", ".join(sources) + "): "
                               + ", ".join(f"{name}={path}" for name, path in routes.items()), err=True)
            results, rows = asyncio.run(run_replay(
                fixtures, settings, target=target, in_process=in_process, public_url=public_url,
                overrides=overrides, concurrency=concurrency, repeat=repeat, twilio_token=twilio_token,
                vapi_secret=vapi_secret, as_json=as_json, routes=routes))
            if junit:
                from ..replay_cli import junit_xml
                junit.write_text(junit_xml(results))
            if not as_json:
                from ..ui import replay_report
                stdout_console().print(replay_report(results, rows))
        raise typer.Exit(0 if all(r.ok for r in results) else 1)


def _pair(item: str) -> tuple[str, str]:
    from ..errors import UsageError
    name, sep, value = item.partition("=")
    if not sep or not name:
        raise UsageError(f"--set {item!r}: use NAME=VALUE")
    return name, value
