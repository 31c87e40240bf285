"""`twivapi doctor`: check settings, credentials and wiring; print the fix for what is wrong."""

from __future__ import annotations

from pathlib import Path

import typer

from ._common import ENV_FILE_OPTION, errors_to_exit, load, stdout_console


def register(app: typer.Typer) -> None:
    @app.command("doctor")
    def doctor(env_file: Path = ENV_FILE_OPTION):
        """Check settings, credentials (one cheap call to each API), the number's webhooks against the
        public URL and the assistant's server URL. Exit 0 when everything is right, 1 otherwise."""
        import asyncio

        from .. import provision as lib
        from ..ui import doctor_table

        settings = load({}, env_file)
        with errors_to_exit():
            checks = asyncio.run(lib.doctor(settings, lib.State.load(settings.state_dir)))
        stdout_console().print(doctor_table(checks))
        raise typer.Exit(0 if all(c.ok for c in checks) else 1)
