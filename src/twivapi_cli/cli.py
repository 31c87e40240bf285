"""The `twivapi` command: a thin Typer layer over the library.

Each command lives in ``twivapi_cli/commands/<name>.py`` with a ``register(app)`` function. Those
modules import only typer at import time; everything heavy (uvicorn, starlette, twilio, numpy) is
imported inside the command body, so ``twivapi --help`` stays fast.
"""

from __future__ import annotations

import importlib

import typer

from . import __version__

# Order here is the order in --help.
COMMAND_MODULES = ("demo", "serve", "tunnel", "sim", "replay", "fixtures", "tail", "inspect", "provision", "doctor",
                   "config", "tools")

app = typer.Typer(
    name="twivapi",
    help="Twilio + Vapi voice agents from the terminal: provision, serve (the bridge), replay, tail, demo.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals may hold secrets
    add_completion=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"twivapi {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Twilio + Vapi voice agents from the terminal."""
    from .config import install_log_redaction
    install_log_redaction()   # before any command builds a Secret or logs a header


def _register_all() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__package__}.commands.{name}").register(app)


_register_all()


def main() -> None:
    app()
