"""Rich renderables for every command. Nothing here prints: commands own the Console and ``Live``.
Organised by command, one section each."""

from __future__ import annotations

import time
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


# --- tail -------------------------------------------------------------------------------------------

LATENCY_ORDER = ("webhook ack /twilio/voice", "webhook ack /twilio/status", "webhook ack /vapi/webhook",
                 "vapi setup", "relay", "barge-in -> clear", "end of speech -> first audio")


def _n(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)


def sessions_table(sessions: list[dict], latency_by_call: dict | None = None) -> Table:
    table = Table(title=f"active calls: {len(sessions)}", title_justify="left", expand=True)
    for column in ("call", "state", "mode", "age", "last event", "caller"):
        table.add_column(column, overflow="fold")
    for s in sessions:
        table.add_row(s["call_sid"][-12:], s["state"], s["mode"], f"{s.get('age_s', 0):.0f}s",
                      f"{s.get('last_event') or '-'} ({_n(s.get('last_event_age_s'))}s ago)",
                      s.get("from_number") or "-")
    return table


def latency_table(latency: dict) -> Table:
    table = Table(title="latency (ms)", title_justify="left", expand=True)
    for column in ("figure", "n", "p50", "p95", "p99", "max", "distribution"):
        table.add_column(column, justify="left" if column in ("figure", "distribution") else "right")
    names = [n for n in LATENCY_ORDER if n in latency] + sorted(n for n in latency if n not in LATENCY_ORDER)
    for name in names:
        h = latency[name]
        table.add_row(name, str(h["count"]), _n(h["p50"]), _n(h["p95"]), _n(h["p99"]), _n(h["max"]),
                      Text(h.get("spark", ""), style="cyan"))
    return table


def event_line(event: dict) -> Text:
    stamp = time.strftime("%H:%M:%S", time.localtime(event.get("received_at") or 0))
    line = Text(f"{stamp} #{event.get('seq')} ", style="dim")
    line.append(f"{event.get('type')}", style="bold")
    if event.get("call_sid"):
        line.append(f" {event['call_sid'][-12:]}", style="magenta")
    data = dict(event.get("data") or {})
    turns = data.pop("turn_latencies", None)
    if data:
        line.append(" " + " ".join(f"{k}={v}" for k, v in data.items() if v is not None))
    if isinstance(turns, list) and turns:
        line.append(" vapi turns: " + "; ".join(_vapi_turn(i + 1, t) for i, t in enumerate(turns) if isinstance(t, dict)))
    return line


def _vapi_turn(number: int, turn: dict) -> str:
    parts = " + ".join(f"{part} {_ms(turn.get(part))}" for part in ("transcriber", "endpointing", "model", "voice"))
    return f"{number}) {_ms(turn.get('turn'))} = {parts}"


def notice_line(message: str, kind: str) -> Text:
    return Text(f"-- {message}", style="yellow bold" if kind != "connected" else "green")


def tail_view(snapshot: dict, recent: list[Text], status: Text | None = None, dropped: int = 0) -> Group:
    """The live view: calls, latency panels, the newest events, and what tail is doing."""
    footer = Text()
    if status is not None:
        footer.append_text(status)
    if dropped:
        footer.append(f"  ({dropped} events dropped by the bridge for this viewer)", style="red bold")
    return Group(sessions_table(snapshot.get("sessions", [])), latency_table(snapshot.get("latency", {})),
                 *forward_line(snapshot.get("counters", {})),
                 Panel(Group(*recent) if recent else Text("(no events yet)", style="dim"), title="events",
                       title_align="left"), footer)


FORWARD_COUNTERS = (("forward.answered", "answered by your app"), ("forward.fallback", "built-in fallbacks"),
                    ("forward.delivered", "delivered"), ("forward.retried", "retries"), ("forward.dropped", "dropped"))


def forward_line(counters: dict) -> list[Text]:
    """`serve --forward-to`'s counters, when it forwards: one line (dropped ones in red)."""
    if not any(name in counters for name, _ in FORWARD_COUNTERS):
        return []
    line = Text("forward: ")
    for i, (name, label) in enumerate(FORWARD_COUNTERS):
        line.append(("" if i == 0 else ", ") + f"{counters.get(name, 0)} {label}",
                    style="red bold" if name == "forward.dropped" and counters.get(name) else "")
    return [line]


# --- replay -----------------------------------------------------------------------------------------

def replay_report(results: list, percentile_rows: list[dict]) -> Group:
    parts: list[Any] = []
    for result in results:
        table = Table(title=f"{result.fixture} ({result.path})" + (f" run {result.run}" if result.run else ""),
                      title_justify="left")
        for column in ("#", "step", "status", "ms", "result"):
            table.add_column(column)
        for step in result.steps:
            verdict = Text("ok", style="green") if step.ok else Text("; ".join(step.problems), style="red bold")
            table.add_row(str(step.index), step.label, str(step.status or ""), f"{step.ms:.1f}", verdict)
        parts.append(table)
    if percentile_rows:
        table = Table(title="latency per step across runs (ms)", title_justify="left")
        for column in ("step", "n", "p50", "p95", "p99"):
            table.add_column(column)
        for row in percentile_rows:
            table.add_row(f"{row['step']}: {row['label']}", str(row["n"]), f"{row['p50']:.1f}", f"{row['p95']:.1f}",
                          f"{row['p99']:.1f}")
        parts.append(table)
    failed = [r for r in results if not r.ok]
    steps = sum(len(r.steps) for r in results)
    parts.append(Text(f"{len(results) - len(failed)}/{len(results)} scenario runs passed, {steps} steps",
                      style="green bold" if not failed else "red bold"))
    return Group(*parts)


# --- provision and doctor ---------------------------------------------------------------------------

def plan_table(plan) -> Table:
    table = Table(title="plan", title_justify="left")
    table.add_column("#")
    table.add_column("action")
    for i, action in enumerate(plan.actions, 1):
        table.add_row(str(i), Text(action.description, style="bold red" if action.costs_money else ""))
    for note in plan.notes:
        table.add_row("", Text(note, style="dim"))
    return table


def doctor_table(checks) -> Table:
    table = Table(title="twivapi doctor", title_justify="left")
    for column in ("check", "", "found", "fix"):
        table.add_column(column, overflow="fold")
    for check in checks:
        table.add_row(check.name, Text("✔", style="green") if check.ok else Text("✘", style="red bold"),
                      check.detail, check.fix)
    return table
