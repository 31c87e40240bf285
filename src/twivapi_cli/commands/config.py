"""`twivapi config`: show the effective settings (secrets masked) and where each is read from."""

from __future__ import annotations

from pathlib import Path

import typer

from ._common import ENV_FILE_OPTION, errors_to_exit, load, stdout_console


def register(app: typer.Typer) -> None:
    @app.command("config")
    def config_cmd(env_file: Path = ENV_FILE_OPTION,
                   table: bool = typer.Option(False, "--table", help="Print the settings table (for docs).")):
        """Show effective settings (secrets masked) or the settings table."""
        from rich.table import Table

        from ..config import SETTINGS, settings_table

        with errors_to_exit():
            if table:
                for env, default, text in settings_table():
                    text = text.replace("|", "\\|")  # keep Markdown table cells intact
                    typer.echo(f"| `{env}` | `{default}` | {text} |" if default else f"| `{env}` | | {text} |")
                return
            settings = load({}, env_file)
            out = Table("variable", "value")
            for s in SETTINGS:
                value = getattr(settings, s.attr)
                shown = "(not set)" if value is None else ("(set, hidden)" if s.secret else str(value))
                out.add_row(s.env, shown)
            stdout_console().print(out)
