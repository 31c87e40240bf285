"""`twivapi fixtures`: validate fixture files, print the JSON Schema, record real webhooks."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._common import ENV_FILE_OPTION, errors_to_exit, load


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="Fixture files for `twivapi replay`: validate, schema, record.", no_args_is_help=True)
    app.add_typer(group, name="fixtures")

    @group.command("validate")
    def validate(files: list[Path] = typer.Argument(..., help="Fixture files or directories.")):
        """Check fixtures without sending anything; errors name the file, the step and the field."""
        from .. import fixtures as fx

        with errors_to_exit():
            paths = fx.expand(files)
            for path in paths:
                fixture = fx.load(path)
                needs = fx.describe_requirements(fixture)
                typer.echo(f"ok  {path}  ({fixture.name}, {len(fixture.steps)} steps" + (f"; {needs})" if needs else ")"))

    @group.command("schema")
    def schema():
        """Print the fixture format's JSON Schema (the same as fixtures/schema.json)."""
        import json

        from .. import fixtures as fx

        typer.echo(json.dumps(fx.schema(), indent=2))

    @group.command("record")
    def record(
        out: Path = typer.Option(Path("fixtures/recorded"), "--out", help="Directory for one fixture per call."),
        port: Optional[int] = typer.Option(None, "--port", help="Port (as for serve)."),
        public_url: Optional[str] = typer.Option(None, "--public-url", help="As for serve."),
        mode: Optional[str] = typer.Option(None, "--mode", help="As for serve."),
        env_file: Path = ENV_FILE_OPTION,
    ):
        """Run the bridge (as `twivapi serve`) and save every webhook it receives as fixture steps,
        with secrets, signatures and tokens scrubbed, ready for `twivapi replay`."""
        settings = load({"port": port, "public_url": public_url, "mode": mode}, env_file)
        with errors_to_exit():
            from ..bridge.server import serve_forever

            typer.echo(f"recording webhooks into {out}/<CallSid>.json", err=True)
            serve_forever(settings, announce=lambda line: typer.echo(line, err=True), record_to=out)
