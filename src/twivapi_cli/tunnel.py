"""`serve --tunnel`: an ngrok tunnel through pyngrok, and pointing the provisioned number and
assistant at it for the session.

twivapi never downloads ngrok: without the binary (on PATH or ``TWIVAPI_NGROK_PATH``) or without
``NGROK_AUTHTOKEN`` it stops at once and says how to fix it. While the tunnel is up, the number's
voice/status URLs and the assistant's server URL point at it; the prior values are written to the
provision state file first, so they are restored on exit, and on the next start after a crash.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config import Settings
from .errors import TunnelError

REWIRED = "tunnel_rewired"   # the provision state file's record of what the tunnel changed


@dataclass
class Tunnel:
    public_url: str
    close: Callable[[], None]


def ngrok_binary(settings: Settings) -> str:
    path = settings.ngrok_path or shutil.which("ngrok")
    if not path or not Path(path).is_file():
        raise TunnelError("the ngrok binary was not found",
                          hint="install ngrok from https://ngrok.com/download and put it on PATH, or set "
                               "TWIVAPI_NGROK_PATH; twivapi does not download it")
    return str(path)


def open_tunnel(settings: Settings, port: int) -> Tunnel:
    """Start ngrok (through pyngrok) for ``port``; returns its https URL."""
    if not settings.ngrok_authtoken:
        raise TunnelError("NGROK_AUTHTOKEN is not set", hint="copy it from the ngrok dashboard into .env")
    from pyngrok import conf, ngrok
    from pyngrok.exception import PyngrokError

    config_path = Path(settings.state_dir) / "ngrok.yml"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    if not config_path.exists():
        config_path.write_text('version: "2"\n')   # a local config: pyngrok must not look elsewhere
    config = conf.PyngrokConfig(ngrok_path=ngrok_binary(settings), auth_token=settings.ngrok_authtoken.reveal(),
                                config_path=str(config_path), monitor_thread=False, startup_timeout=15,
                                config_version="2")   # the agent's tunnels API, as in the config written above
    try:
        tunnel = ngrok.connect(str(port), "http", pyngrok_config=config, bind_tls=True)
    except PyngrokError as exc:
        message = str(exc).replace(settings.ngrok_authtoken.reveal(), "***")
        raise TunnelError(f"ngrok did not start: {message}", hint="check NGROK_AUTHTOKEN and the ngrok binary") from None
    tunnel_url = tunnel.public_url
    if tunnel_url is None:   # pyngrok's connect() raises first; its type leaves the URL optional
        raise TunnelError("ngrok did not report a public URL", hint="check the ngrok binary")
    public = tunnel_url.replace("http://", "https://", 1)

    def close() -> None:
        try:
            ngrok.disconnect(tunnel_url, pyngrok_config=config)
        except PyngrokError:
            pass
        ngrok.kill(pyngrok_config=config)

    return Tunnel(public, close)


async def rewire(settings: Settings, public_url: str) -> bool:
    """Point the provisioned number and assistant at ``public_url``; False if nothing is provisioned."""
    from . import provision
    state = provision.State.load(settings.state_dir)
    number, assistant = state.data.get("number") or {}, state.data.get("assistant") or {}
    if not number.get("sid") or state.data.get("mode") == "native":
        return False
    await restore(settings)   # a crashed session's leftovers first
    state = provision.State.load(settings.state_dir)
    accounts = provision.Accounts(settings)
    try:
        live = await accounts.tw("reading the number", accounts.twilio.incoming_phone_numbers(number["sid"]).fetch)
        record = {"voice_url": live.voice_url, "status_callback": live.status_callback}
        if assistant.get("id"):
            current = await accounts.vapi.get_assistant(assistant["id"])
            record["assistant_server_url"] = (current.get("server") or {}).get("url")
        state.data[REWIRED] = record
        state.save()   # before changing anything: a crash from here on is undone at the next start
        await accounts.tw("pointing the number at the tunnel", accounts.twilio.incoming_phone_numbers(number["sid"]).update,
                          voice_url=f"{public_url}/twilio/voice", status_callback=f"{public_url}/twilio/status")
        if assistant.get("id"):
            await _set_server_url(accounts, assistant["id"], f"{public_url}/vapi/webhook")
    finally:
        await accounts.aclose()
    return True


async def _set_server_url(accounts, assistant_id: str, url: str) -> None:
    """Change only the URL: the server's headers (its secret) stay as they are in Vapi."""
    current = await accounts.vapi.get_assistant(assistant_id)
    await accounts.vapi.update_assistant(assistant_id, {"server": {**(current.get("server") or {}), "url": url}})


async def restore(settings: Settings) -> bool:
    """Undo what ``rewire`` changed, if the state file says it did."""
    from . import provision
    state = provision.State.load(settings.state_dir)
    record = state.data.get(REWIRED)
    if not record:
        return False
    number, assistant = state.data.get("number") or {}, state.data.get("assistant") or {}
    accounts = provision.Accounts(settings)
    try:
        await accounts.tw("restoring the number's webhooks", accounts.twilio.incoming_phone_numbers(number["sid"]).update,
                          voice_url=record.get("voice_url") or "", status_callback=record.get("status_callback") or "")
        if assistant.get("id") and record.get("assistant_server_url"):
            await _set_server_url(accounts, assistant["id"], record["assistant_server_url"])
    finally:
        await accounts.aclose()
    state.data.pop(REWIRED)
    state.save()
    return True


def restore_sync(settings: Settings) -> bool:
    return asyncio.run(restore(settings))
