"""Rich renderables for every command. Nothing here prints: commands own the Console and ``Live``.
Organised by command, one section each."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value:g} ms" if isinstance(value, (int, float)) else str(value)


# --- demo -------------------------------------------------------------------------------------------

def demo_report(report) -> Group:
    """The demo's report: one row per call with its figures and checks, then each call's timeline."""
    table = Table(title=f"twivapi demo: {len(report.calls)} simulated calls in {report.seconds:.1f} s",
                  title_justify="left")
    for column in ("call", "result", "webhook ack", "Vapi setup", "first audio", "barge-in -> clear", "checks"):
        table.add_column(column)
    for call in report.calls:
        failed = [name for name, ok in call.checks if not ok]
        checks = Text(f"✔ {len(call.checks)}/{len(call.checks)}", style="green") if not failed else \
            Text("✘ " + "; ".join(failed), style="red bold")
        table.add_row(call.name, Text("ok" if call.ok else "FAILED", style="green" if call.ok else "red bold"),
                      _ms(call.figures.get("webhook_ack_ms")), _ms(call.figures.get("vapi_setup_ms")),
                      _ms(call.figures.get("first_audio_ms")), _ms(call.figures.get("barge_in_to_clear_ms")),
                      checks)
    timelines = []
    for call in report.calls:
        line = Text(f"{call.name}: ", style="bold")
        line.append(" → ".join(f"{kind} {t:.2f}s" for t, kind in call.timeline))
        timelines.append(line)
    checks_table = Table(show_header=False, box=None, padding=(0, 1))
    for call in report.calls:
        checks_table.add_row(Text(call.name, style="bold"), Text(", ".join(
            ("✔ " if ok else "✘ ") + name for name, ok in call.checks)))
    verdict = Text("every call behaved" if report.ok else "some calls misbehaved",
                   style="green bold" if report.ok else "red bold")
    return Group(table, Panel(checks_table, title="checks", title_align="left"),
                 Panel(Group(*timelines), title="timelines (seconds from dialing)", title_align="left"), verdict)
