"""Shared CLI plumbing: settings from flags, one place that turns TwivapiError into an exit code."""

from __future__ import annotations

import contextlib
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


def stdout_console():
    from rich.console import Console

    return Console(file=sys.stdout, soft_wrap=False)


def stderr_console():
    from rich.console import Console

    return Console(file=sys.stderr, soft_wrap=False)
