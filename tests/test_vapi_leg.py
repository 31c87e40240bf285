"""The bridge's socket to Vapi's transport (``VapiLeg`` on aiohttp), against a real WebSocket server
on loopback: many calls at once, a refused upgrade, a socket that goes away under a send."""

from __future__ import annotations

import asyncio
import http
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve

from twivapi_cli.bridge.vapi_leg import VapiLeg, VapiSockets
from twivapi_cli.models import EventType

KEY = "vapi-private-key-for-the-leg-test"


class Recorded:
    """A Recorder's two methods the leg uses, keeping what it was given."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str | None, dict[str, Any]]] = []
        self.counts: dict[str, int] = {}

    async def record(self, type_: str, call_sid: str | None = None, **data: Any) -> None:
        self.events.append((type_, call_sid, data))

    def count(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1


async def echo(ws: ServerConnection) -> None:
    async for message in ws:
        await ws.send(message)


def test_more_calls_than_aiohttps_default_connection_limit_hold_their_sockets_at_once() -> None:
    """Every call holds its socket for its whole length: the 101st must not wait for one to end
    (aiohttp's default connector allows 100 connections)."""
    async def go() -> tuple[list[bool], list[bytes], list[str]]:
        headers: list[str] = []

        def remember(connection: ServerConnection, request: Any) -> None:
            headers.append(request.headers.get("Authorization", ""))
        async with serve(echo, "127.0.0.1", 0, process_request=remember) as server:
            url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
            sockets, recorder = VapiSockets(), Recorded()
            legs = [VapiLeg(recorder, KEY, sockets) for _ in range(120)]   # type: ignore[arg-type]
            try:
                opened = await asyncio.wait_for(asyncio.gather(*(leg.open(url) for leg in legs)), 10)
                heard: list[bytes] = []
                for n, leg in enumerate(legs):
                    await leg.relay(n.to_bytes(2, "big") * 80, 0.0)
                receivers = [asyncio.create_task(leg.receive(heard.append, _ignore)) for leg in legs]
                await asyncio.wait_for(_until(lambda: len(heard) == len(legs)), 10)
                await asyncio.gather(*(leg.close() for leg in legs))
                await asyncio.wait_for(asyncio.gather(*receivers), 10)   # each ends once its socket closed
            finally:
                await sockets.aclose()
        return opened, heard, headers
    opened, heard, headers = asyncio.run(go())
    assert opened == [True] * 120
    assert sorted(heard) == sorted(n.to_bytes(2, "big") * 80 for n in range(120))
    assert headers == [f"Bearer {KEY}"] * 120


def test_a_refused_upgrade_is_recorded_with_its_reason_and_not_raised() -> None:
    async def go() -> tuple[bool, Recorded]:
        def refuse(connection: ServerConnection, request: Any) -> Any:
            return connection.respond(http.HTTPStatus.FORBIDDEN, "no\n")
        async with serve(echo, "127.0.0.1", 0, process_request=refuse) as server:
            sockets, recorder = VapiSockets(), Recorded()
            leg = VapiLeg(recorder, KEY, sockets)   # type: ignore[arg-type]
            leg.call_sid = "CA" + "1" * 32
            try:
                ok = await leg.open(f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/")
            finally:
                await sockets.aclose()
        return ok, recorder
    ok, recorder = asyncio.run(go())
    assert ok is False
    assert recorder.events == [(EventType.MEDIA_VAPI_CONNECT_FAILED, "CA" + "1" * 32,
                                {"error": "WSServerHandshakeError"})]
    assert KEY not in repr(recorder.events)


@pytest.mark.parametrize("url", ["http://127.0.0.1:1/", "ws://127.0.0.1:1/"])   # not a ws URL; nobody listening
def test_a_socket_url_that_cannot_be_opened_is_recorded(url: str) -> None:
    async def go() -> tuple[bool, Recorded]:
        sockets, recorder = VapiSockets(), Recorded()
        try:
            return await VapiLeg(recorder, KEY, sockets).open(url), recorder   # type: ignore[arg-type]
        finally:
            await sockets.aclose()
    ok, recorder = asyncio.run(go())
    assert ok is False
    assert [type_ for type_, _, _ in recorder.events] == [EventType.MEDIA_VAPI_CONNECT_FAILED]


def test_vapi_closing_its_side_ends_receive_and_later_sends_are_dropped_quietly() -> None:
    async def go() -> tuple[int, int]:
        async def hang_up(ws: ServerConnection) -> None:
            await ws.recv()
            await ws.close()
        async with serve(hang_up, "127.0.0.1", 0) as server:
            sockets = VapiSockets()
            leg = VapiLeg(Recorded(), KEY, sockets)   # type: ignore[arg-type]
            try:
                assert await leg.open(f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/")
                await leg.relay(b"\xff" * 160, 0.0)
                await asyncio.wait_for(leg.receive(lambda chunk: None, _ignore), 5)   # returns at Vapi's close
                for _ in range(3):   # the caller's audio keeps coming: dropped, never raised
                    await leg.relay(b"\xff" * 160, 0.0)
                await leg.send_json({"type": "end-call"})
                await leg.close()
            finally:
                await sockets.aclose()
        return leg.frames_in, len(leg.early)
    frames_in, held = asyncio.run(go())
    assert frames_in == 1 and held == 0


class DiskStalled(Recorded):
    """A recorder whose durable writes never finish (a stalled disk); the others are kept at once."""

    async def record(self, type_: str, call_sid: str | None = None, **data: Any) -> None:
        if data.pop("durable", True):
            await asyncio.Event().wait()
        self.events.append((type_, call_sid, data))


def test_the_relays_latency_samples_never_wait_on_the_disk() -> None:
    """One caller frame in 50 is timed into a ``media.relay`` event: the relay goes on without
    waiting for that event's write (a stalled disk would otherwise hold up the caller's audio)."""
    async def go() -> tuple[int, DiskStalled]:
        async with serve(echo, "127.0.0.1", 0) as server:
            sockets, recorder = VapiSockets(), DiskStalled()
            leg = VapiLeg(recorder, KEY, sockets)   # type: ignore[arg-type]
            try:
                assert await leg.open(f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/")
                for _ in range(120):
                    await asyncio.wait_for(leg.relay(b"\xff" * 160, 0.0), 5)
                await leg.close()
            finally:
                await sockets.aclose()
        return leg.frames_in, recorder
    frames_in, recorder = asyncio.run(go())
    assert frames_in == 120
    assert [(t, d["direction"]) for t, _, d in recorder.events] == [(EventType.MEDIA_RELAY, "caller->vapi")] * 2
    assert all(d["ms"] >= 0 for _, _, d in recorder.events)


async def _ignore(text: str) -> None:
    return None


async def _until(condition: Any) -> None:
    while not condition():
        await asyncio.sleep(0.01)

