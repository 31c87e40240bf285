"""`twivapi sim`: run the Twilio and Vapi REST simulators on loopback until Ctrl-C."""

from __future__ import annotations

from pathlib import Path

import typer

from ._common import ENV_FILE_OPTION, errors_to_exit, load

DEFAULT_TWILIO_PORT = 4010
DEFAULT_VAPI_PORT = 4020
SECRETS = ("TWILIO_AUTH_TOKEN", "VAPI_API_KEY", "VAPI_WEBHOOK_SECRET", "VAPI_PUBLIC_KEY")


def env_lines(env: dict[str, str], from_user: set[str]) -> list[str]:
    """``NAME=value`` lines a shell can eval; secrets the user supplied are not echoed back."""
    import shlex

    lines = []
    for name, value in env.items():
        if name in SECRETS and name in from_user:
            lines.append(f"# {name}: yours, from the environment or .env (not repeated here)")
        else:
            lines.append(f"{name}={shlex.quote(value)}")
    return lines


def register(app: typer.Typer) -> None:
    @app.command("sim")
    def sim(
        host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (keep it loopback)."),
        twilio_port: int = typer.Option(DEFAULT_TWILIO_PORT, "--twilio-port",
                                        help="Port of the Twilio REST simulator (0 = any free port)."),
        vapi_port: int = typer.Option(DEFAULT_VAPI_PORT, "--vapi-port",
                                      help="Port of the Vapi REST simulator (0 = any free port)."),
        log_level: str = typer.Option("warning", "--log-level", help="uvicorn log level."),
        latency: str | None = typer.Option(
            None, "--latency", help="How slowly they answer: realistic (default: as Twilio and Vapi, POST /call "
                                    "300-600 ms) | none (at once) | a scale factor such as 0.5 "
                                    "[env: TWIVAPI_SIM_LATENCY]."),
        env_file: Path = ENV_FILE_OPTION,
    ):
        """Run local Twilio + Vapi REST simulators; print the settings that point at them (eval-able)."""
        settings = load({"sim_latency": latency}, env_file)
        with errors_to_exit():
            from ..sim.server import run_until_interrupted, start_sims
            from ..sim.state import SimCredentials, SimState

            credentials = SimCredentials.from_settings(settings)
            sims = start_sims(SimState(credentials=credentials), host=host, twilio_port=twilio_port,
                              vapi_port=vapi_port, log_level=log_level, latency=settings.sim_latency)
            from_user = {name for name, attr in (("TWILIO_AUTH_TOKEN", "twilio_auth_token"),
                                                 ("VAPI_API_KEY", "vapi_api_key"),
                                                 ("VAPI_WEBHOOK_SECRET", "vapi_webhook_secret"),
                                                 ("VAPI_PUBLIC_KEY", "vapi_public_key"))
                         if getattr(settings, attr)}
            for line in env_lines(sims.env(), from_user):
                typer.echo(line)
            demo = "" if settings.twilio_account_sid else " (demo account: fake credentials)"
            typer.echo(f"twivapi: Twilio simulator on {sims.twilio_url}, Vapi simulator on {sims.vapi_url}{demo}, "
                       f"latency {settings.sim_latency}; Ctrl-C to stop", err=True)
            try:
                run_until_interrupted(sims)
            except KeyboardInterrupt:   # the normal way to stop: not an error
                typer.echo("twivapi: simulators stopped", err=True)
