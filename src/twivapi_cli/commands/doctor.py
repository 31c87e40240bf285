"""`twivapi doctor`: check settings, credentials and wiring; print the fix for what is wrong."""

from __future__ import annotations

from pathlib import Path

import typer

from ._common import ENV_FILE_OPTION, errors_to_exit, load, print_json, stdout_console


def register(app: typer.Typer) -> None:
    @app.command("doctor")
    def doctor(env_file: Path = ENV_FILE_OPTION,
               as_json: bool = typer.Option(False, "--json", help="Print the checks as one JSON document.")):
        """Check settings, credentials (one cheap call to each API), the number's webhooks against the
        public URL, the assistant's server URL, and which ngrok `serve --tunnel` would use. Exit 0 when
        everything is right, 1 otherwise."""
        import asyncio

        from .. import provision as lib
        from ..tunnel import ngrok_check
        from ..ui import doctor_table

        settings = load({}, env_file)
        with errors_to_exit():
            checks = asyncio.run(lib.doctor(settings, lib.State.load(settings.state_dir)))
            checks.append(ngrok_check(settings))   # which ngrok `serve --tunnel` would use, or none
        ok = all(c.ok for c in checks)
        if as_json:
            print_json({"ok": ok, "checks": [{"name": c.name, "ok": c.ok, "found": c.detail, "fix": c.fix or None}
                                             for c in checks]})
        else:
            stdout_console().print(doctor_table(checks))
        raise typer.Exit(0 if ok else 1)
