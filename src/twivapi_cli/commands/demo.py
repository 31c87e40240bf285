"""`twivapi demo`: the whole loop locally (simulators + bridge + simulated calls), then a report."""

from __future__ import annotations

import typer

from ._common import errors_to_exit, print_json, stderr_console, stdout_console


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(quiet: bool = typer.Option(False, "--quiet", "-q", help="Only the report, no progress lines."),
             as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON document on stdout "
                                                                "(progress lines still go to stderr unless -q).")):
        """Run the whole loop on this machine with no accounts: simulated Twilio and Vapi, the bridge,
        four simulated calls (normal, barge-in, hang-up before ready, tool call), then a latency report.
        Exits 0 when every call behaved, 1 otherwise."""
        import asyncio

        from ..demo import run_demo
        from ..ui import demo_report

        progress = stderr_console()
        with errors_to_exit():
            report = asyncio.run(run_demo(progress=(lambda line: None) if quiet else
                                          (lambda line: progress.print(f"[dim]{line}[/dim]"))))
        if as_json:
            from ..demo import report_document
            print_json(report_document(report))
        else:
            stdout_console().print(demo_report(report))
        raise typer.Exit(0 if report.ok else 1)
