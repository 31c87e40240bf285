"""`twivapi tunnel`: ngrok in front of your own server, with serve --tunnel's rewire-and-restore."""

from __future__ import annotations

from pathlib import Path

import typer

from ._common import ENV_FILE_OPTION, errors_to_exit, load


def register(app: typer.Typer) -> None:
    @app.command("tunnel")
    def tunnel(
        port: int = typer.Option(..., "--port", help="The local port your server listens on (127.0.0.1)."),
        voice_path: str = typer.Option("/twilio/voice", "--voice-path", help="Your server's Twilio voice webhook path."),
        status_path: str = typer.Option("/twilio/status", "--status-path",
                                        help="Your server's Twilio status callback path."),
        vapi_path: str = typer.Option("/vapi/webhook", "--vapi-path", help="Your server's Vapi server-URL path."),
        yes: bool = typer.Option(False, "--yes", "-y", help="When ngrok is not installed, download it with pyngrok "
                                                           "without asking [TWIVAPI_NGROK_INSTALL]."),
        env_file: Path = ENV_FILE_OPTION,
    ):
        """Expose your own server through ngrok (NGROK_AUTHTOKEN) and point the provisioned number and
        assistant at it (your paths) until Ctrl-C; prints TWIVAPI_PUBLIC_URL=<url> on stdout."""
        settings = load({"ngrok_install": True if yes else None}, env_file)
        with errors_to_exit():
            from ..tunnel import WebhookPaths, expose
            from .serve import _ask, _on_a_terminal

            announce = lambda line: typer.echo(line, err=True)  # noqa: E731

            def wait(url: str) -> None:
                typer.echo(f"TWIVAPI_PUBLIC_URL={url}")   # stdout: for scripts (eval, or > .env)
                _wait_for_a_signal()

            paths = WebhookPaths(voice=voice_path, status=status_path, vapi=vapi_path)
            expose(settings, port, paths, ask=_ask if _on_a_terminal() else None, announce=announce, wait=wait)


def _wait_for_a_signal() -> None:
    """Until SIGINT or SIGTERM; the tunnel's clean-up then runs (no traceback, exit 0)."""
    import signal
    import threading

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
