"""The Vapi simulator as tests use it: REST + the simulated assistant behind the transport socket."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Iterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from twivapi_cli.bridge.server import start_in_thread
from twivapi_cli.sim.vapi_transport import ServerPoster, transport_routes

from .support import VAPI_SECRET


class VapiSim:
    def __init__(self) -> None:
        self.calls: dict[str, dict] = {}
        self.assistants: dict[str, object] = {}
        self.order: list[str] = []
        self.script: dict = {}
        self.call_delay = 0.0
        self.server_url: str | None = None
        self.url = ""

    def set_script(self, **script) -> None:
        self.script = script

    def set_call_delay(self, seconds: float) -> None:
        self.call_delay = seconds

    def last_assistant(self):
        return self.assistants[self.order[-1]]

    async def create_call(self, request: Request):
        body = await request.json()
        await asyncio.sleep(self.call_delay)
        call_id = str(uuid.uuid4())
        base = str(request.base_url).rstrip("/")
        call = {"id": call_id, "status": "queued", "type": "vapi.websocketCall", "assistantId": body.get("assistantId"),
                "assistantOverrides": body.get("assistantOverrides", {}), "transport": {**body.get("transport", {}),
                "websocketCallUrl": base.replace("http", "ws") + f"/call/{call_id}/transport"},
                "monitor": {"controlUrl": f"{base}/call/{call_id}/control"}}
        self.calls[call_id] = call
        return JSONResponse(call, status_code=201)

    async def control(self, request: Request):
        return JSONResponse({})

    def app(self) -> Starlette:
        def find(call_id):
            call = self.calls.get(call_id)
            return (call, {"metadata": {"simulator": dict(self.script)}}) if call else None

        def poster(call, assistant):
            return ServerPoster(self.server_url, VAPI_SECRET) if self.server_url else None

        def track(call_id, assistant):
            self.assistants[call_id] = assistant
            self.order.append(call_id)

        return Starlette(routes=[Route("/call", self.create_call, methods=["POST"]),
                                 Route("/call/{call_id}/control", self.control, methods=["POST"]),
                                 *transport_routes(find, poster, track)])


@contextlib.contextmanager
def vapi_sim() -> Iterator[VapiSim]:
    sim = VapiSim()
    server = start_in_thread(sim.app())
    sim.url = server.url
    try:
        yield sim
    finally:
        server.stop()
