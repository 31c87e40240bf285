"""Shared fixtures. Every test runs with no Twilio/Vapi/twivapi/ngrok settings from the developer's
environment (so a real account can never be reached by accident) and a private state directory."""

from __future__ import annotations

import os

import pytest

_PREFIXES = ("TWILIO_", "VAPI_", "TWIVAPI_", "NGROK_")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    for name in list(os.environ):
        if name.startswith(_PREFIXES):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TWIVAPI_STATE_DIR", str(tmp_path / "state"))
    # the terminal's width is the developer's (pytest-xdist's workers get COLUMNS=80): tests set their own
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.delenv("LINES", raising=False)


@pytest.fixture(scope="module")
def sims():
    """The product's simulators of Twilio and Vapi on loopback (``tests/sims.py``), one pair per test
    module; a module that needs more (an assistant, a number) builds on it with its own ``sims``."""
    from .sims import running_sims
    with running_sims() as running:
        yield running


def pytest_terminal_summary(terminalreporter):
    """A test's one-line summary (``record_property("summary", ...)``: the soak's calls, RSS, fds) at
    the end of the run, where it is read; xdist carries the property back from its workers."""
    lines = [value for report in terminalreporter.getreports("passed") if report.when == "call"
             for name, value in report.user_properties if name == "summary"]
    for line in lines:
        terminalreporter.write_line(line)


# files that take long without being marked slow (the official Vapi SDK's models take ~30 s to build;
# the demo and the secrets check run the whole loop)
LONG_FILES = {"test_vapi_sdk.py", "test_secrets.py", "test_demo.py"}


def pytest_collection_modifyitems(items):
    """Files with slow tests (the soak, the long fuzz runs) first, then the other long ones, in a run on
    one process or one with ``--no-loadscope-reorder`` (``./scripts/test`` keeps xdist's own order:
    files with the most tests first). The order is otherwise kept (a stable sort)."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: (item.path not in slow_files, item.path.name not in LONG_FILES))
