"""`twivapi config`: show the effective settings (secrets masked) and where each is read from."""

from __future__ import annotations

from pathlib import Path

import typer

from ._common import ENV_FILE_OPTION, errors_to_exit, load, print_json, stdout_console


def register(app: typer.Typer) -> None:
    @app.command("config")
    def config_cmd(env_file: Path = ENV_FILE_OPTION,
                   table: bool = typer.Option(False, "--table", help="Print the settings table (for docs)."),
                   as_json: bool = typer.Option(False, "--json", help="Print the settings as one JSON document "
                                                                      "(secrets: only whether they are set).")):
        """Show effective settings (secrets masked) or the settings table."""
        from rich.table import Table

        from ..config import SETTINGS, settings_table
        from ..errors import UsageError

        with errors_to_exit():
            if table and as_json:
                raise UsageError("give one of --table or --json")
            if table:
                for env, default, text in settings_table():
                    text = text.replace("|", "\\|")  # keep Markdown table cells intact
                    typer.echo(f"| `{env}` | `{default}` | {text} |" if default else f"| `{env}` | | {text} |")
                return
            settings = load({}, env_file)
            if as_json:
                print_json({"settings": [
                    {"variable": s.env, "set": getattr(settings, s.attr) is not None, "secret": s.secret,
                     "value": None if s.secret or getattr(settings, s.attr) is None else _plain(getattr(settings, s.attr))}
                    for s in SETTINGS]})
                return
            out = Table("variable", "value")
            for s in SETTINGS:
                value = getattr(settings, s.attr)
                shown = "(not set)" if value is None else ("(set, hidden)" if s.secret else str(value))
                out.add_row(s.env, shown)
            stdout_console().print(out)


def _plain(value):
    """A setting's value as JSON has it: numbers and booleans as they are, anything else as text."""
    return value if isinstance(value, (bool, int, float)) else str(value)
