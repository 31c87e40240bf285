"""The benchmarks that need node, npm and the seed's reference server say exactly which is missing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bw(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_webhooks
    yield bench_webhooks
    for name in ("bench_webhooks", "common"):
        sys.modules.pop(name, None)


def _which(*present: str):
    return lambda tool: f"/usr/bin/{tool}" if tool in present else None


def test_a_missing_reference_server_is_named_not_node(bw, tmp_path, monkeypatch):
    import common
    monkeypatch.setattr(common.shutil, "which", _which("node", "npm"))
    seed = tmp_path / "shared" / "anchors" / "seed-express"
    message = bw.node_missing(seed)
    assert message == f"the seed's reference server (no directory {seed})"
    assert "node" not in message.replace("seed", "") and "npm" not in message


def test_each_missing_tool_is_named(bw, tmp_path, monkeypatch):
    import common
    tmp_path.joinpath("seed").mkdir()
    monkeypatch.setattr(common.shutil, "which", _which("node"))
    assert bw.node_missing(tmp_path / "seed") == "npm (not on PATH)"
    monkeypatch.setattr(common.shutil, "which", _which())
    assert bw.node_missing(tmp_path / "gone") == ("node (not on PATH), npm (not on PATH), "
                                                  f"the seed's reference server (no directory {tmp_path / 'gone'})")
    monkeypatch.setattr(common.shutil, "which", _which("node", "npm"))
    assert bw.node_missing(tmp_path / "seed") is None


def test_bench_webhooks_says_what_is_missing_and_skips(bw, tmp_path, monkeypatch, capsys):
    import common
    monkeypatch.setattr(common.shutil, "which", _which("node", "npm"))
    monkeypatch.setattr(bw, "SEED", tmp_path / "seed-express")
    assert bw.run(quick=True) == []
    out = capsys.readouterr().out
    assert out.strip() == (f"bench_webhooks: missing the seed's reference server (no directory {tmp_path / 'seed-express'}): "
                           "skipping (the reference server and the load tool need them)")
    assert "node/npm not found" not in out
    assert bw.prepare_node(tmp_path) is None   # and prepares nothing


def test_bench_burst_names_it_too(bw, tmp_path, monkeypatch):
    import common
    monkeypatch.setattr(common.shutil, "which", _which("node", "npm"))
    monkeypatch.setattr(bw, "SEED", tmp_path / "seed-express")
    import bench_burst
    try:
        assert bench_burst.seed_missing() == f"the seed's reference server (no directory {tmp_path / 'seed-express'})"
    finally:
        sys.modules.pop("bench_burst", None)


def test_bench_bridge_says_how_to_install_pipecat_and_skips_its_rows(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import importlib.util

    import bench_bridge
    try:
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pipecat" else real(name, *a))
        message = bench_bridge.pipecat_missing()
        assert message is not None and "pipecat" in message and "pip install -e '.[bench]'" in message
        ran: list[str] = []
        monkeypatch.setattr(bench_bridge, "run_one", lambda server, *a, record=False: ran.append(server) or {
            "server": server + (" --record" if record else ""), "format": a[2], "calls": a[0],
            "cpu_ms_per_call_s": 1.0})
        rows = bench_bridge.run(quick=True)
        assert bench_bridge.PIPECAT_SERVER not in ran and bench_bridge.BARE_SERVER in ran
        assert all(row["vs_bare"] == 1.0 for row in rows if row["server"] == bench_bridge.TWIVAPI_SERVER)
        assert "skipping the pipecat rows" in capsys.readouterr().out
    finally:
        for name in ("bench_bridge", "common"):
            sys.modules.pop(name, None)
