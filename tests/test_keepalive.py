"""Connections kept open by a proxy, and clients that survive a connection reset under them.

Real uvicorn on loopback and raw sockets: a proxy in front of the bridge (ngrok, a cloud load
balancer idling connections up to 60 s) reuses an idle connection, so the bridge must not close it
first; and a pooled client whose connection is reset as it is reused sends an idempotent request
once more, as Twilio does (its default ``rc=1``), never a request that could create something twice.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from twivapi_cli import net
from twivapi_cli.bridge.server import KEEPALIVE_S, start_in_thread
from twivapi_cli.config import load_settings
from twivapi_cli.errors import VapiApiError
from twivapi_cli.vapi_api import VapiClient


def _app() -> Starlette:
    async def ok(request):
        return PlainTextResponse("ok")
    return Starlette(routes=[Route("/", ok, methods=["GET", "POST"])])


def _request(sock: socket.socket) -> bytes:
    sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    data = b""
    while not data.endswith(b"ok"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_the_keepalive_default_outlasts_common_proxies():
    settings = load_settings({}, environ={}, env_file=None)
    assert settings.keepalive_timeout == KEEPALIVE_S >= 61   # a cloud load balancer idles 60 s
    assert load_settings({}, environ={"TWIVAPI_KEEPALIVE_TIMEOUT": "90"}, env_file=None).keepalive_timeout == 90


def test_an_idle_connection_is_still_served_after_uvicorns_five_seconds():
    server = start_in_thread(_app())
    try:
        with socket.create_connection((server.host, server.port)) as sock:
            assert _request(sock).startswith(b"HTTP/1.1 200")
            time.sleep(6.0)   # uvicorn's own default closes it after 5 s
            assert _request(sock).startswith(b"HTTP/1.1 200"), "the idle connection was closed"
    finally:
        server.stop()


def test_the_keepalive_timeout_is_a_setting_the_server_obeys():
    server = start_in_thread(_app(), keepalive=0.5)
    try:
        with socket.create_connection((server.host, server.port)) as sock:
            assert _request(sock).startswith(b"HTTP/1.1 200")
            sock.settimeout(5.0)
            started = time.monotonic()
            assert sock.recv(1) == b"", "the server should close an idle connection past the setting"
            assert time.monotonic() - started < 4.0
    finally:
        server.stop()


class ResetFirst:
    """A server on loopback that resets the first connection after reading a request (SO_LINGER 0:
    an RST, as a server closing an idle keep-alive connection under a request does), then answers."""

    def __init__(self) -> None:
        self.requests = 0
        self.resets = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        await reader.readexactly(length)
        self.requests += 1
        if self.resets == 0:
            self.resets += 1
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return
        body = b'{"id": "x"}'
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\n\r\n%s"
                     % (len(body), body))
        await writer.drain()
        writer.close()


async def _serving(handler: ResetFirst):
    server = await asyncio.start_server(handler.handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def test_an_idempotent_post_is_sent_once_more_after_a_reset():
    handler = ResetFirst()
    server, url = await _serving(handler)
    async with server:
        client = net.async_client(timeout=5.0)
        try:
            response = await net.post_idempotent(client, url + "/twilio/voice", data={"CallSid": "CA1"})
        finally:
            await client.aclose()
    assert response.status_code == 200
    assert (handler.resets, handler.requests) == (1, 2)


async def test_ending_a_vapi_call_survives_a_reset_but_creating_one_is_never_repeated():
    handler = ResetFirst()
    server, url = await _serving(handler)
    async with server:
        vapi = VapiClient(url, "key")
        try:
            await vapi.end_call({"monitor": {"controlUrl": url + "/control"}})
            assert (handler.resets, handler.requests) == (1, 2)
            handler.resets, handler.requests = 0, 0
            with pytest.raises(VapiApiError):
                await vapi.create_websocket_call("asst", timeout=5.0)
            assert (handler.resets, handler.requests) == (1, 1), "POST /call must not be sent twice"
        finally:
            await vapi.aclose()


def test_a_reset_is_told_apart_from_a_slow_or_absent_server():
    assert net.is_connection_reset(httpx.ReadError("reset"))
    assert not net.is_connection_reset(httpx.ReadTimeout("slow"))
    refused = httpx.ConnectError("refused")
    refused.__cause__ = ConnectionRefusedError(111, "refused")
    assert not net.is_connection_reset(refused)
