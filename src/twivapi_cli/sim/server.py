"""Run the Twilio and Vapi simulators on loopback with uvicorn, each on its own thread and loop.

    with start_sims() as sims:              # free ports; or twilio_port=4010, vapi_port=4020
        sims.twilio_url, sims.vapi_url      # http://127.0.0.1:PORT
        sims.env()                          # TWILIO_API_BASE_URL=..., VAPI_BASE_URL=..., credentials
        sims.state                          # the shared SimState (numbers, calls, assistants...)
        sims.twilio_faults.add("status", "/2010-04-01/*", status=500)
        start_sims(latency="none")         # answer at once (default: as slowly as the real APIs)

Used by the tests, ``twivapi sim`` (foreground) and ``twivapi demo``.
"""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass
from typing import Any

from ..bridge.server import RunningServer, bind, start_in_thread
from ..errors import TwivapiError
from .faults import Faults
from .latency import LatencyModel
from .state import SimState
from .twilio_rest import create_twilio_app
from .vapi_rest import create_vapi_app
from .vapi_transport import assistant_routes


@dataclass
class RunningSims:
    state: SimState
    twilio: RunningServer
    vapi: RunningServer
    twilio_faults: Faults
    vapi_faults: Faults

    @property
    def twilio_url(self) -> str:
        return self.twilio.url

    @property
    def vapi_url(self) -> str:
        return self.vapi.url

    def env(self) -> dict[str, str]:
        """The settings that point twivapi (or any app) at these simulators."""
        creds = self.state.credentials
        return {"TWILIO_API_BASE_URL": self.twilio_url, "VAPI_BASE_URL": self.vapi_url,
                "TWILIO_ACCOUNT_SID": creds.account_sid, "TWILIO_AUTH_TOKEN": creds.auth_token,
                "VAPI_API_KEY": creds.vapi_api_key, "VAPI_WEBHOOK_SECRET": self.state.vapi.webhook_secret or "",
                "VAPI_PUBLIC_KEY": creds.vapi_public_key}

    def twilio_client(self):
        """The real twilio SDK client, pointed at the Twilio simulator (reference §5.4, option A)."""
        from twilio.rest import Client

        client = Client(self.state.credentials.account_sid, self.state.credentials.auth_token)
        client.api.base_url = self.twilio_url
        return client

    def stop(self) -> None:
        for server in (self.twilio, self.vapi):   # both begin their shutdown at once, then we wait
            server.server.should_exit = True
        self.twilio.stop()
        self.vapi.stop()

    def __enter__(self) -> RunningSims:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _bind(host: str, port: int, flag: str):
    try:
        return bind(host, port)
    except OSError as exc:
        raise TwivapiError(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                           hint=f"choose another port with {flag}; 0 = any free port") from None


def start_sims(state: SimState | None = None, *, host: str = "127.0.0.1", twilio_port: int = 0,
               vapi_port: int = 0, twilio_faults: Faults | None = None, vapi_faults: Faults | None = None,
               vapi_extra_routes: list | None = None, log_level: str = "warning",
               latency: LatencyModel | str | float | None = None) -> RunningSims:
    """Start both simulators sharing ``state``; returns once both accept connections.

    ``latency`` (a ``LatencyModel``, a profile name such as ``none`` or a scale factor) replaces
    ``state.latency``; left out, the state's model answers (realistic by default).

    A busy port raises ``TwivapiError`` naming the flag to change (both ports are bound before
    either server starts, so nothing is left running).
    """
    state = state or SimState()
    if latency is not None:
        state.latency = latency if isinstance(latency, LatencyModel) else LatencyModel(latency)
    twilio_faults, vapi_faults = twilio_faults or Faults(), vapi_faults or Faults()
    twilio_sock = _bind(host, twilio_port, "--twilio-port")
    try:
        vapi_sock = _bind(host, vapi_port, "--vapi-port")
    except TwivapiError:
        twilio_sock.close()
        raise
    twilio = start_in_thread(create_twilio_app(state, twilio_faults), sock=twilio_sock, log_level=log_level)
    # the simulated assistant behind every Vapi call: the transport socket and Twilio's direct stream
    extra = assistant_routes(state, vapi_faults) + list(vapi_extra_routes or [])
    vapi = start_in_thread(create_vapi_app(state, vapi_faults, extra_routes=extra),
                           sock=vapi_sock, log_level=log_level)
    return RunningSims(state, twilio, vapi, twilio_faults, vapi_faults)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run_until_interrupted(sims: RunningSims) -> None:
    """Block the main thread until Ctrl-C or SIGTERM (the servers run on their own threads)."""
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)     # `kill` stops it as cleanly as Ctrl-C
    try:
        while not stop.wait(0.5):
            if not (sims.twilio.thread.is_alive() and sims.vapi.thread.is_alive()):
                raise TwivapiError("a simulator stopped unexpectedly")
    finally:
        sims.stop()
