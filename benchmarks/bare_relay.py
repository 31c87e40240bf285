"""The cost floor of twivapi's media path, for bench_bridge: the same stack (Starlette on uvicorn, the
same uvicorn settings, aiohttp's WebSocket client to Vapi's transport, as the bridge's `VapiLeg`)
doing only what no relay can skip.

Per call: on `start`, one POST /call to Vapi and its transport socket; then each Twilio `media`
message is JSON-parsed, its payload base64-decoded and sent to Vapi as a binary frame; each binary
frame from Vapi is base64-encoded into a `media` message to Twilio. Nothing else: no signature, no
store, no events, no pacing, marks or barge-in. In pcm16-16k mode the audio is also transcoded with
the stdlib's G.711 and `ratecv` (the cheapest transcoding there is), both ways.

    python benchmarks/bare_relay.py PORT VAPI_BASE_URL VAPI_API_KEY ASSISTANT_ID {mulaw-8k|pcm16-16k}
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import warnings
from typing import Any

with warnings.catch_warnings():   # deprecated in 3.11-3.12; on 3.13+ the audioop-lts backport twivapi depends on
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

import aiohttp
import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from twivapi_cli.bridge.server import _config, bind
from twivapi_cli.vapi_api import AUDIO_FORMATS


def make_app(vapi_url: str, key: str, assistant: str, audio_format: str) -> Starlette:
    auth = {"Authorization": f"Bearer {key}"}
    pcm = audio_format == "pcm16-16k"
    wire_format = AUDIO_FORMATS[audio_format]
    clients: dict[str, httpx.AsyncClient] = {}
    sockets: dict[str, aiohttp.ClientSession] = {}

    async def ok(request: Request) -> Response:
        await request.body()
        return Response("<Response/>", media_type="text/xml")

    async def health(request: Request) -> Response:
        return Response("ok")

    async def media(ws: WebSocket) -> None:
        await ws.accept()
        vapi: Any = None
        pump: asyncio.Task | None = None
        up_state: Any = None
        try:
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                data = json.loads(message["text"])
                event = data.get("event")
                if event == "media" and vapi is not None:
                    audio = base64.b64decode(data["media"]["payload"])
                    if pcm:
                        audio, up_state = audioop.ratecv(audioop.ulaw2lin(audio, 2), 2, 1, 8000, 16000, up_state)
                    await vapi.send_bytes(audio)
                elif event == "start":
                    stream_sid = data["start"]["streamSid"]
                    if "http" not in clients:
                        clients["http"] = httpx.AsyncClient(timeout=10)
                    call = (await clients["http"].post(vapi_url + "/call", headers=auth, json={
                        "assistantId": assistant,
                        "transport": {"provider": "vapi.websocket", "audioFormat": wire_format}})).json()
                    if "ws" not in sockets:
                        sockets["ws"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
                    vapi = await sockets["ws"].ws_connect(call["transport"]["websocketCallUrl"], headers=auth,
                                                          max_msg_size=2**20)
                    pump = asyncio.create_task(back(vapi, ws, stream_sid))
                elif event == "stop":
                    break
        finally:
            if pump is not None:
                pump.cancel()
            if vapi is not None:
                await vapi.close()

    async def back(vapi: Any, ws: WebSocket, stream_sid: str) -> None:
        down_state: Any = None
        async for message in vapi:
            if message.type is aiohttp.WSMsgType.BINARY:
                frame = message.data
                if pcm:
                    frame, down_state = audioop.ratecv(frame, 2, 1, 16000, 8000, down_state)
                    frame = audioop.lin2ulaw(frame, 2)
                await ws.send_text(json.dumps({"event": "media", "streamSid": stream_sid,
                                               "media": {"payload": base64.b64encode(frame).decode()}}))

    return Starlette(routes=[Route("/twilio/voice", ok, methods=["POST"]), Route("/vapi/webhook", ok, methods=["POST"]),
                             Route("/health", health), WebSocketRoute("/twilio/media", media)])


def main(argv: list[str]) -> None:
    port, vapi_url, key, assistant, audio_format = argv
    sock = bind("127.0.0.1", int(port))
    uvicorn.Server(_config(make_app(vapi_url, key, assistant, audio_format), "127.0.0.1", int(port),
                           "warning")).run(sockets=[sock])


if __name__ == "__main__":
    main(sys.argv[1:])
