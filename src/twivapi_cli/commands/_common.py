"""Shared CLI plumbing: settings from flags, one place that turns TwivapiError into an exit code."""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

ENV_FILE_OPTION = typer.Option(
    None, "--env-file", help="Read settings from this .env file (default: ./.env if present)."
)


def load(flags: dict[str, Any], env_file: Path | None):
    """Settings from flags > environment > .env > defaults; config errors exit 2 with the variable named."""
    from ..config import load_settings

    with errors_to_exit():
        return load_settings(flags, env_file=env_file if env_file is not None else ".env")


@contextlib.contextmanager
def errors_to_exit() -> Iterator[None]:
    """Map the TwivapiError tree to a one-line message on stderr and the error's exit code."""
    from ..errors import TwivapiError

    try:
        yield
    except TwivapiError as exc:
        typer.echo(f"twivapi: error: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("twivapi: interrupted", err=True)
        raise typer.Exit(130) from None


# Off a terminal (a pipe, a file, CI logs, CliRunner) rich would lay everything out in 80 columns,
# cutting table cells ("hangup-e…") and wrapping check names. There each print is as wide as what
# it prints instead (up to CONTENT_WIDTH_CAP), and a live view gets WIDE_DEFAULT. COLUMNS, when set,
# is an explicit choice and still wins.
WIDE_DEFAULT = 200
CONTENT_WIDTH_CAP = 10_000


def _console(file):
    from rich.console import Console

    from ..config import output_columns

    try:
        tty = bool(file.isatty())   # the file itself: FORCE_COLOR makes rich call a pipe a terminal
    except (AttributeError, ValueError):
        tty = False
    if tty or output_columns() is not None:
        return Console(file=file, soft_wrap=False)
    return _content_width_console()(file=file, soft_wrap=False, width=WIDE_DEFAULT)


@functools.cache
def _content_width_console():
    from rich.console import Console
    from rich.control import Control
    from rich.measure import Measurement

    class ContentWidthConsole(Console):
        """Each print as wide as its content, so nothing is cut or wrapped for want of columns."""

        def content_width(self, objects: tuple) -> int:
            options = self.options.update_width(CONTENT_WIDTH_CAP)
            widths = [Measurement.get(self, options, o).maximum for o in objects]
            return max(1, min(CONTENT_WIDTH_CAP, sum(widths) + len(widths) - 1))

        def print(self, *objects: Any, **kwargs: Any) -> None:
            if not objects or kwargs.get("width") is not None or any(isinstance(o, Control) for o in objects):
                super().print(*objects, **kwargs)   # a live view's refresh: its own width
                return
            wide = self.width
            self.width = self.content_width(objects)
            try:
                super().print(*objects, **kwargs)
            finally:
                self.width = wide

    return ContentWidthConsole


def stdout_console():
    return _console(sys.stdout)


def stderr_console():
    return _console(sys.stderr)


def print_json(document: Any) -> None:
    """One JSON document on stdout (the ``--json`` of a command that otherwise prints a table)."""
    import json

    typer.echo(json.dumps(document, indent=2, default=str))
