"""The peer in bench_bridge: pipecat's own Twilio path (FastAPIWebsocketTransport + TwilioFrameSerializer)
running a bot that only echoes the caller, served by uvicorn like pipecat's Twilio examples.

It is set up as lean as pipecat allows, so the comparison does not flatter twivapi: no VAD, no RTVI,
no metrics, no hang-up over Twilio's REST API; the pipeline runs at 8 kHz for mu-law (the serializer
then only converts G.711) and at 16 kHz for pcm16-16k (it also resamples, as twivapi's pcm16 mode
does). POST /twilio/voice and /vapi/webhook answer 200 so the same callers can drive it.

Needs the benchmark-only extra: ``pip install -e '.[bench]'`` (pipecat-ai[websocket]).

    python benchmarks/pipecat_echo.py PORT {mulaw-8k|pcm16-16k}
"""

from __future__ import annotations

import json
import sys

import uvicorn
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import PlainTextResponse, Response
from loguru import logger
from pipecat.frames.frames import Frame, InputAudioRawFrame, OutputAudioRawFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.serializers.twilio import TwilioFrameSerializer
from pipecat.transports.websocket.fastapi import FastAPIWebsocketParams, FastAPIWebsocketTransport
from pipecat.workers.runner import WorkerRunner


class Echo(FrameProcessor):
    """The caller's audio, straight back as the bot's."""

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame):
            await self.push_frame(OutputAudioRawFrame(audio=frame.audio, sample_rate=frame.sample_rate,
                                                      num_channels=frame.num_channels))
        else:
            await self.push_frame(frame, direction)


def make_app(audio_format: str) -> FastAPI:
    rate = 16000 if audio_format == "pcm16-16k" else 8000
    app = FastAPI()

    @app.post("/twilio/voice")
    @app.post("/vapi/webhook")
    async def ok(request: Request) -> Response:
        await request.body()
        return Response("<Response/>", media_type="text/xml")

    @app.get("/health")
    async def health() -> PlainTextResponse:
        return PlainTextResponse("ok")

    @app.websocket("/twilio/media")
    async def media(websocket: WebSocket) -> None:
        await websocket.accept()
        # as pipecat's runner does (parse_telephony_websocket): `connected`, then `start`
        await websocket.receive_text()
        start = json.loads(await websocket.receive_text())["start"]
        serializer = TwilioFrameSerializer(stream_sid=start["streamSid"], call_sid=start["callSid"],
                                           params=TwilioFrameSerializer.InputParams(auto_hang_up=False))
        transport = FastAPIWebsocketTransport(websocket, FastAPIWebsocketParams(
            audio_in_enabled=True, audio_out_enabled=True, add_wav_header=False, serializer=serializer))
        worker = PipelineWorker(Pipeline([transport.input(), Echo(), transport.output()]),
                                params=PipelineParams(audio_in_sample_rate=rate, audio_out_sample_rate=rate),
                                enable_rtvi=False, idle_timeout_secs=None)

        @transport.event_handler("on_client_disconnected")
        async def gone(transport: FastAPIWebsocketTransport, client: WebSocket) -> None:
            await worker.cancel()

        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(worker)
        await runner.run()

    return app


def main(argv: list[str]) -> None:
    port, audio_format = argv
    logger.remove()   # pipecat logs each pipeline's set-up and end at DEBUG: warnings only, as the others
    logger.add(sys.stderr, level="WARNING")
    uvicorn.run(make_app(audio_format), host="127.0.0.1", port=int(port), log_level="warning", access_log=False,
                ws_per_message_deflate=False)


if __name__ == "__main__":
    main(sys.argv[1:])
