"""The product's simulators as the tests use them: one Twilio + Vapi pair per test module, with
helpers to make Vapi slow or failing (fault injection) and to read what the Vapi side saw."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import httpx

from twivapi_cli.sim.server import RunningSims, start_sims
from twivapi_cli.sim.state import SimCredentials, SimState

from .support import TOKEN, VAPI_KEY, VAPI_SECRET

BASE_ASSISTANT = {"name": "test-assistant", "model": {"provider": "openai", "model": "gpt-4o"},
                  "serverMessages": ["status-update", "speech-update", "transcript", "tool-calls",
                                     "end-of-call-report", "user-interrupted"]}


class Sims:
    def __init__(self, running: RunningSims):
        self.running = running
        self.state = running.state
        self.url = running.vapi_url
        self.twilio_url = running.twilio_url

    def vapi(self, method: str, path: str, **kwargs) -> httpx.Response:
        return httpx.request(method, self.url + path, headers={"Authorization": f"Bearer {VAPI_KEY}"}, **kwargs)

    def assistant(self, server_url: str | None = None, **script) -> str:
        """A saved assistant whose simulated voice follows ``script`` (behavior, greeting_ms, ...)."""
        body = {**BASE_ASSISTANT, "metadata": {"simulator": script}}
        if server_url:   # authenticated as a provisioned server is: Vapi sends what the server says
            body["server"] = {"url": server_url, "headers": {"X-Vapi-Secret": VAPI_SECRET}}
        response = self.vapi("POST", "/assistant", json=body)
        assert response.status_code == 201, response.text
        return response.json()["id"]

    def phone_number(self) -> str:
        client = self.running.twilio_client()
        offered = client.available_phone_numbers("US").local.list(area_code=415, limit=1)
        number = client.incoming_phone_numbers.create(phone_number=offered[0].phone_number)
        response = self.vapi("POST", "/phone-number", json={
            "provider": "twilio", "number": number.phone_number, "twilioAccountSid": self.state.credentials.account_sid,
            "twilioAuthToken": TOKEN, "smsEnabled": False})
        assert response.status_code == 201, response.text
        return response.json()["id"]

    # --- faults on POST /call ------------------------------------------------------------------------
    def slow_calls(self, seconds: float, count: int | None = None) -> None:
        self.running.vapi_faults.add("latency", "/call", method="POST", delay=seconds, count=count)

    def failing_calls(self, status: int = 500) -> None:
        self.running.vapi_faults.add("status", "/call", method="POST", status=status)

    def clear_faults(self) -> None:
        self.running.vapi_faults.clear()
        self.running.twilio_faults.clear()

    # --- what Vapi saw ---------------------------------------------------------------------------------
    def calls_for(self, call_sid: str) -> list[dict]:
        return [c.record for c in list(self.state.vapi.calls.values())
                if ((c.record.get("assistantOverrides") or {}).get("metadata") or {}).get("twilioCallSid") == call_sid]

    def ended(self, vapi_call_id: str) -> bool:
        call = self.state.vapi.calls.get(vapi_call_id)
        return call is not None and call.status == "ended"

    def driver(self, vapi_call_id: str, timeout: float = 5.0):
        deadline = time.monotonic() + timeout
        while vapi_call_id not in self.state.vapi.drivers:
            assert time.monotonic() < deadline, "the simulated assistant never connected"
            time.sleep(0.01)
        return self.state.vapi.drivers[vapi_call_id]


@contextlib.contextmanager
def running_sims() -> Iterator[Sims]:
    credentials = SimCredentials(auth_token=TOKEN, vapi_api_key=VAPI_KEY, vapi_webhook_secret=VAPI_SECRET)
    with start_sims(SimState(credentials=credentials)) as running:
        yield Sims(running)
