"""`twivapi serve`: run the bridge on uvicorn."""

from __future__ import annotations

import sys
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
        yes: bool = typer.Option(False, "--yes", "-y", help="With --tunnel: when ngrok is not installed, download "
                                                           "it with pyngrok without asking "
                                                           "[TWIVAPI_NGROK_INSTALL]."),
        allow_ws: bool = typer.Option(False, "--allow-ws", help="Stream mode: start even though the public URL is "
                                                                "not https:// (its stream URL is ws://, which Twilio "
                                                                "refuses; loopback hosts need no flag)."),
        record: Optional[Path] = typer.Option(None, "--record", help="Record every call into this directory: "
                                                                    "<CallSid>.wav (stereo: the caller, what the caller "
                                                                    "heard) and <CallSid>.json [TWIVAPI_RECORD_DIR]."),
        forward_to: Optional[str] = typer.Option(None, "--forward-to", help="Forward every Vapi server message to "
                                                 "your app at this URL; request messages get its answer "
                                                 "[TWIVAPI_FORWARD_URL]."),
        forward_twilio_to: Optional[str] = typer.Option(None, "--forward-twilio-to", help="Forward Twilio's status "
                                                        "callbacks to this URL, re-signed for it "
                                                        "[TWIVAPI_FORWARD_TWILIO_URL]."),
        tools: Optional[str] = typer.Option(None, "--tools", help="Your tool functions: module:attr or "
                                            "path/to/tools.py:attr [TWIVAPI_TOOLS]."),
        workers: Optional[int] = typer.Option(None, "--workers", min=1,
                                              help="Processes on the one port, one per core; above 1 the "
                                                   "store must be Redis [TWIVAPI_WORKERS]."),
        log_level: str = typer.Option("info", "--log-level", help="uvicorn/twivapi log level."),
        env_file: Path = ENV_FILE_OPTION,
    ):
        """Run the bridge: Twilio voice/status webhooks, Vapi server messages, the media stream."""
        settings = load({"host": host, "port": port, "public_url": public_url, "mode": mode, "store": store,
                         "audio_format": audio_format, "ngrok_install": True if yes else None,
                         "record_dir": record, "forward_url": forward_to, "forward_twilio_url": forward_twilio_to,
                         "tools": tools, "workers": workers}, env_file)
        with errors_to_exit():
            announce = lambda line: typer.echo(line, err=True)  # noqa: E731
            _check_forward_targets(settings, announce)
            if not tunnel:
                _check_public_url(settings, allow_ws, announce)
                code = _run(settings, log_level, announce)
            else:
                code = _serve_tunneled(settings, log_level, announce, allow_ws)
        if code:
            raise typer.Exit(code)


def _run(settings, log_level: str, announce) -> int:
    """One bridge in this process, or ``--workers N`` of them on its port (the store checked first)."""
    if settings.workers > 1:
        from ..bridge.app import check_settings
        from ..bridge.workers import check_workers, serve_workers

        check_workers(settings)
        check_settings(settings)   # a missing variable named here, not N times by the workers
        return serve_workers(settings, log_level=log_level, announce=announce)
    from ..bridge.server import serve_forever

    serve_forever(settings, log_level=log_level, announce=announce)
    return 0


def _check_public_url(settings, allow_ws: bool, announce) -> None:
    """Stop at once (exit 2) when Twilio could not open the stream URL; print what is only a warning."""
    from ..bridge.server import check_public_url

    for warning in check_public_url(settings, allow_ws=allow_ws):
        announce(f"twivapi: warning: {warning}")


def _check_forward_targets(settings, announce) -> None:
    """An app that is not up yet is a warning, not a reason to stop: it may start after the bridge."""
    from ..bridge.forward import unreachable, where

    for flag, url in (("--forward-to", settings.forward_url), ("--forward-twilio-to", settings.forward_twilio_url)):
        if url:
            why = unreachable(url)
            announce(f"  forwarding to {where(url)} ({flag})" if why is None else
                     f"twivapi: warning: {flag} {where(url)} is not reachable now ({why}); messages get the "
                     "built-in answers (informational ones are retried, then dropped and counted) until it is")


def _on_a_terminal() -> bool:
    """Whether to ask before downloading ngrok (the tests replace it: CliRunner's stdin is no TTY)."""
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except ValueError:   # a closed stdin
        return False


def _ask(question: str) -> bool:
    return typer.confirm(question, default=True, err=True)


def _serve_tunneled(settings, log_level: str, announce, allow_ws: bool = False) -> int:
    from ..bridge.workers import check_workers
    from ..errors import UsageError
    from ..tunnel import tunneled

    if settings.port == 0:
        raise UsageError("--tunnel needs a fixed --port")
    check_workers(settings)
    ask = _ask if _on_a_terminal() else None
    with tunneled(settings, settings.port, ask=ask, announce=announce) as tunnel:
        settings = settings.with_overrides(public_url=tunnel.public_url)
        _check_public_url(settings, allow_ws, announce)   # ngrok's is https:// on 443: nothing to say
        return _run(settings, log_level, announce)
