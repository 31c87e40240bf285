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
