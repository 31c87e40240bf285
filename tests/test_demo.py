"""`twivapi demo` end to end through Typer's CliRunner: simulators, bridge, four calls, report."""

from __future__ import annotations

from typer.testing import CliRunner

from twivapi_cli.cli import app


def test_demo_runs_the_whole_loop_and_every_call_behaves(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["demo", "--quiet"], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    for name in ("normal", "barge-in", "hangup-early", "tool-call"):
        assert name in result.output
    assert "every call behaved" in result.output
    assert "✘" not in result.output
