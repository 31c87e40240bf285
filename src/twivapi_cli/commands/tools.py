"""`twivapi tools schema module:attr`: your tool functions as Vapi function-tool definitions."""

from __future__ import annotations

import typer

from ._common import errors_to_exit


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="Your Python tool functions (serve --tools): their Vapi definitions.",
                        no_args_is_help=True)
    app.add_typer(group, name="tools")

    @group.command("schema")
    def schema(spec: str = typer.Argument(..., metavar="MODULE:ATTR",
                                          help="module:attr or path/to/tools.py:attr (as serve --tools).")):
        """Print the tools as Vapi function tools (CreateFunctionToolDTO, JSON Schema from the
        signatures): a JSON list to paste into an assistant's model.tools."""
        import json

        from ..tools import load_tools

        with errors_to_exit():
            definitions = [found.definition() for found in load_tools(spec, flag="tools schema")]
        typer.echo(json.dumps(definitions, indent=2))
