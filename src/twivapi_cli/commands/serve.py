"""`twivapi serve`: run the bridge on uvicorn."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._common import ENV_FILE_OPTION, errors_to_exit, load


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve(
        host: Optional[str] = typer.Option(None, "--host", help="Interface to listen on [TWIVAPI_HOST]."),
        port: Optional[int] = typer.Option(None, "--port", help="Port to listen on [TWIVAPI_PORT]."),
        public_url: Optional[str] = typer.Option(None, "--public-url",
                                                 help="Public https base URL Twilio calls [TWIVAPI_PUBLIC_URL]."),
        mode: Optional[str] = typer.Option(None, "--mode", help="stream | bypass | native [TWIVAPI_MODE]."),
        store: Optional[str] = typer.Option(None, "--store", help="memory://, sqlite:///x.db, redis://... [TWIVAPI_STORE]."),
        audio_format: Optional[str] = typer.Option(None, "--audio-format",
                                                   help="mulaw-8k | pcm16-16k [TWIVAPI_AUDIO_FORMAT]."),
        tunnel: bool = typer.Option(False, "--tunnel", help="Expose the bridge through ngrok (NGROK_AUTHTOKEN) and "
                                                            "point the provisioned number/assistant at it for "
                                                            "the session."),
        log_level: str = typer.Option("info", "--log-level", help="uvicorn/twivapi log level."),
        env_file: Path = ENV_FILE_OPTION,
    ):
        """Run the bridge: Twilio voice/status webhooks, Vapi server messages, the media stream."""
        settings = load({"host": host, "port": port, "public_url": public_url, "mode": mode, "store": store,
                         "audio_format": audio_format}, env_file)
        with errors_to_exit():
            from ..bridge.server import serve_forever

            announce = lambda line: typer.echo(line, err=True)  # noqa: E731
            if not tunnel:
                serve_forever(settings, log_level=log_level, announce=announce)
                return
            _serve_tunneled(settings, log_level, announce)


def _serve_tunneled(settings, log_level: str, announce) -> None:
    import asyncio

    from ..bridge.server import serve_forever
    from ..errors import UsageError
    from ..tunnel import open_tunnel, restore_sync, rewire

    if settings.port == 0:
        raise UsageError("--tunnel needs a fixed --port")
    restore_sync(settings)   # a previous session that crashed: put things back first
    tunnel = open_tunnel(settings, settings.port)
    settings = settings.with_overrides(public_url=tunnel.public_url)
    announce(f"tunnel: {tunnel.public_url} -> http://{settings.host}:{settings.port}")
    try:
        if asyncio.run(rewire(settings, tunnel.public_url)):
            announce("the provisioned number and assistant point at the tunnel until this bridge stops")
        serve_forever(settings, log_level=log_level, announce=announce)
    finally:
        if restore_sync(settings):
            announce("restored the number's and the assistant's previous URLs")
        tunnel.close()
