"""What the bridge's handlers need, built once by ``create_app`` and read as one typed object
(``deps(request)``) instead of loose attributes on Starlette's untyped ``app.state``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from starlette.requests import HTTPConnection

from ..cluster import Cluster
from ..config import Settings
from ..store import Store
from .call_control import CallControl
from .calls import Calls
from .drain import Drainer
from .events import Recorder
from .forward import Forwarder
from .lifecycle import Lifecycle
from .setup import SetupPool
from .signals import Signals
from .sweeper import Sweeper
from .tools import ToolRegistry
from .vapi_leg import VapiSockets
from .webhook_log import WebhookLog


@dataclass(frozen=True)
class Deps:
    settings: Settings
    store: Store
    cluster: Cluster
    vapi: Any                  # VapiClient (or a stand-in with the same methods)
    recorder: Recorder
    signals: Signals
    calls: Calls
    drainer: Drainer
    setup: SetupPool
    sweeper: Sweeper
    tools: ToolRegistry
    control: CallControl       # phone-call-control on the Twilio call (forward, hang-up)
    forwarder: Forwarder       # --forward-to / --forward-twilio-to (idle when neither is set)
    started: float             # time.monotonic() when the app was built (health's uptime)
    lifecycle: Lifecycle = field(default_factory=Lifecycle)   # draining or not
    http_counts: dict[tuple[str, int], int] = field(default_factory=dict)   # responses by (route, status)
    webhooks: WebhookLog = field(default_factory=WebhookLog)   # the latest webhooks, raw (the inspector's)
    vapi_sockets: VapiSockets = field(default_factory=VapiSockets)   # the calls' sockets to Vapi's transport

    @property
    def instance(self) -> str:
        return self.cluster.instance

    def stats(self) -> dict[str, int]:
        return {**self.setup.stats(), **self.drainer.stats(), **self.forwarder.stats()}


def deps(connection: HTTPConnection) -> Deps:
    """The bridge's dependencies, from a request or a WebSocket."""
    found: Deps = connection.app.state.deps
    return found
