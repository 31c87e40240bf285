"""`twivapi demo` end to end through Typer's CliRunner: simulators, bridge, five calls, report."""

from __future__ import annotations

from typer.testing import CliRunner

from twivapi_cli.cli import app


def test_demo_runs_the_whole_loop_and_every_call_behaves(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("COLUMNS", raising=False)   # not a terminal, no COLUMNS: the table is as wide as it needs
    result = CliRunner().invoke(app, ["demo", "--quiet"])
    assert result.exit_code == 0, result.output
    for name in ("normal", "barge-in", "hangup-early", "tool-call", "transfer"):
        assert name in result.output
    assert "every call behaved" in result.output
    assert "✘" not in result.output and "…" not in result.output   # no cell cut short ("hangup-e…")


def test_demo_json_is_one_document_with_every_call(tmp_path, monkeypatch):
    import json
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["demo", "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] is True
    assert [c["name"] for c in report["calls"]] == ["normal", "barge-in", "hangup-early", "tool-call", "transfer"]
    for call in report["calls"]:
        assert call["ok"] and call["checks"] and all(check["ok"] for check in call["checks"])
        assert call["call_sid"].startswith("CA") and call["timeline"][0]["event"] == "webhook"
        assert set(call["figures"]) == {"webhook_ack_ms", "vapi_setup_ms", "first_audio_ms", "barge_in_to_clear_ms"}
