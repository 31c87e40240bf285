"""`serve --tunnel`: an ngrok tunnel through pyngrok, and pointing the provisioned number and
assistant at it for the session.

The binary: ``TWIVAPI_NGROK_PATH``, else ngrok on PATH, else pyngrok's own copy (``PYNGROK_NGROK_PATH``
or pyngrok's config dir). Without one, ``ensure_ngrok`` installs it there through pyngrok's installer,
but only when told to (``--yes`` / ``TWIVAPI_NGROK_INSTALL``) or after asking on a terminal; never
silently (pyngrok's ``connect`` would download on its own: it only ever gets a path that exists).
Without ``NGROK_AUTHTOKEN`` it stops at once and says how to fix it. While the tunnel is up, the number's
voice/status URLs and the assistant's server URL point at it; the prior values are written to the
provision state file first, so they are restored on exit, and on the next start after a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .config import Settings
from .errors import TunnelError

if TYPE_CHECKING:
    from .provision import Check

REWIRED = "tunnel_rewired"   # the provision state file's record of what the tunnel changed


@dataclass
class Tunnel:
    public_url: str
    close: Callable[[], None]


@dataclass(frozen=True)
class WebhookPaths:
    """Where a server takes Twilio's voice webhook, its status callbacks and Vapi's server messages:
    our bridge's paths by default, a user's own server's with ``twivapi tunnel --voice-path ...``."""
    voice: str = "/twilio/voice"
    status: str = "/twilio/status"
    vapi: str = "/vapi/webhook"

    def check(self) -> WebhookPaths:
        """Each path must start with ``/`` (UsageError naming the flag otherwise)."""
        from .errors import UsageError
        for flag, path in (("--voice-path", self.voice), ("--status-path", self.status), ("--vapi-path", self.vapi)):
            if not path.startswith("/") or any(c.isspace() for c in path):
                raise UsageError(f"{flag} {path!r}: a path starts with / and has no spaces (e.g. /twilio/voice)")
        return self


DOWNLOAD_PAGE = "https://ngrok.com/download"


@dataclass(frozen=True)
class NgrokBinary:
    path: str
    source: str   # "TWIVAPI_NGROK_PATH", "PATH" or "pyngrok" (its own copy)


def pyngrok_ngrok_path() -> str:
    """Where pyngrok keeps its own ngrok, and where ``install_ngrok`` puts one: ``PYNGROK_NGROK_PATH``,
    else pyngrok's config dir (``~/.config/ngrok/ngrok`` on Linux), as pyngrok itself resolves it."""
    from pyngrok import conf
    return conf.PyngrokConfig().ngrok_path


def find_ngrok(settings: Settings) -> NgrokBinary | None:
    """The ngrok ``serve --tunnel`` would use, or None when none is installed."""
    if settings.ngrok_path:
        if not Path(settings.ngrok_path).is_file():
            raise TunnelError(f"TWIVAPI_NGROK_PATH={settings.ngrok_path} is not a file",
                              hint="point it at the ngrok binary, or unset it to use ngrok on PATH or "
                                   "pyngrok's copy (which `twivapi serve --tunnel --yes` downloads)")
        return NgrokBinary(str(settings.ngrok_path), "TWIVAPI_NGROK_PATH")
    on_path = shutil.which("ngrok")
    if on_path:
        return NgrokBinary(on_path, "PATH")
    own = pyngrok_ngrok_path()
    if Path(own).is_file():
        return NgrokBinary(own, "pyngrok")
    return None


def _by_hand(dest: str, url: str | None = None) -> str:
    where = f"download {url}" if url else f"get it from {DOWNLOAD_PAGE}"
    return (f"install it by hand: {where}, then put ngrok on PATH, point TWIVAPI_NGROK_PATH at it, or unpack "
            f"it into {Path(dest).parent}")


def _not_installed(dest: str) -> TunnelError:
    return TunnelError(f"the ngrok binary was not found: not on PATH, no TWIVAPI_NGROK_PATH, no pyngrok copy at {dest}",
                       hint=f"to download it with pyngrok into {Path(dest).parent}, run `twivapi serve --tunnel --yes` "
                            f"or set TWIVAPI_NGROK_INSTALL=1; or {_by_hand(dest)}")


def ngrok_binary(settings: Settings) -> str:
    """The ngrok to use; without one, the error that names both ways out (never a download)."""
    found = find_ngrok(settings)
    if found is None:
        raise _not_installed(pyngrok_ngrok_path())
    return found.path


def ngrok_version(path: str) -> str | None:
    """``ngrok --version``'s version ("3.19.0"), or None when that does not run."""
    try:
        run = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=15, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if run.returncode != 0:
        return None
    match = re.search(r"\d+\.\d+\.\d+\S*", run.stdout)
    return match.group(0) if match else (run.stdout.strip() or None)


def ensure_ngrok(settings: Settings, *, ask: Callable[[str], bool] | None,
                 announce: Callable[[str], None]) -> str:
    """The ngrok to use, installing it with pyngrok when there is none and that is allowed:
    ``settings.ngrok_install`` (``--yes``, ``TWIVAPI_NGROK_INSTALL``), or ``ask`` (given only on a
    terminal) says yes. Otherwise the error that says how to get one."""
    found = find_ngrok(settings)
    if found is not None:
        return found.path
    dest = pyngrok_ngrok_path()
    if not settings.ngrok_install:
        if ask is None:
            raise _not_installed(dest)
        if not ask(f"ngrok is not installed: download it now with pyngrok into {Path(dest).parent}?"):
            raise TunnelError("ngrok is not installed (download declined)",
                              hint=f"answer yes, or pass --yes; or {_by_hand(dest)}")
    return install_ngrok(dest, announce=announce)


def install_ngrok(dest: str, *, announce: Callable[[str], None]) -> str:
    """Download ngrok through pyngrok's installer (its URL for this platform, its progress lines on
    stdout) to ``dest``; returns ``dest``. A failure says what failed and how to install by hand."""
    from pyngrok import installer
    from pyngrok.exception import PyngrokError

    try:
        url = installer.get_ngrok_cdn_url("3")
    except PyngrokError as exc:
        raise TunnelError(f"pyngrok has no ngrok download for this machine: {exc}", hint=_by_hand(dest)) from None
    existed = Path(dest).exists()
    announce(f"downloading ngrok from {url} into {Path(dest).parent} ...")
    try:
        installer.install_ngrok(dest, ngrok_version="3")
    except (PyngrokError, OSError) as exc:   # pyngrok wraps network, HTTP and archive failures in one error
        if not existed:
            Path(dest).unlink(missing_ok=True)   # a half-unpacked binary would be "installed" next time
        raise TunnelError(f"downloading ngrok failed: {exc}",
                          hint=f"check the network, and HTTPS_PROXY behind a proxy; or {_by_hand(dest, url)}") from None
    finally:
        (Path(tempfile.gettempdir()) / url.rsplit("/", 1)[-1]).unlink(missing_ok=True)   # pyngrok leaves the archive
    version = ngrok_version(dest)
    if version is None:
        raise TunnelError(f"the ngrok downloaded to {dest} does not run", hint=_by_hand(dest, url))
    announce(f"installed ngrok {version} at {dest}")
    return dest


def ngrok_check(settings: Settings) -> Check:
    """``twivapi doctor``'s line: which ngrok ``serve --tunnel`` would use (path, version), or none."""
    from .provision import Check
    try:
        found = find_ngrok(settings)
    except TunnelError as exc:
        return Check("ngrok", False, exc.message, exc.hint or "")
    if found is None:   # not a fault: only --tunnel needs it, and it offers to download it
        return Check("ngrok", True, f"none installed (`serve --tunnel` offers to download it with pyngrok into "
                                    f"{Path(pyngrok_ngrok_path()).parent})")
    version = ngrok_version(found.path)
    if version is None:
        return Check("ngrok", False, f"{found.path} (from {found.source}) does not run `ngrok --version`",
                     f"replace it; {_by_hand(found.path)}")
    return Check("ngrok", True, f"{found.path} (ngrok {version}, from {found.source})")


def require_authtoken(settings: Settings) -> None:
    if not settings.ngrok_authtoken:
        raise TunnelError("NGROK_AUTHTOKEN is not set", hint="copy it from the ngrok dashboard into .env")


def open_tunnel(settings: Settings, port: int, *, ngrok_path: str | None = None) -> Tunnel:
    """Start ngrok (through pyngrok) for ``port``; returns its https URL. ``ngrok_path``: the binary
    ``ensure_ngrok`` found or installed (default: ``ngrok_binary``, which never downloads)."""
    require_authtoken(settings)
    assert settings.ngrok_authtoken is not None
    from pyngrok import conf, ngrok
    from pyngrok.exception import PyngrokError

    config_path = Path(settings.state_dir) / "ngrok.yml"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    if not config_path.exists():
        config_path.write_text('version: "2"\n')   # a local config: pyngrok must not look elsewhere
    config = conf.PyngrokConfig(ngrok_path=ngrok_path or ngrok_binary(settings), auth_token=settings.ngrok_authtoken.reveal(),
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


async def rewire(settings: Settings, public_url: str, paths: WebhookPaths = WebhookPaths()) -> bool:
    """Point the provisioned number and assistant at ``public_url`` (plus ``paths``); False if
    nothing is provisioned."""
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
                          voice_url=public_url + paths.voice, status_callback=public_url + paths.status)
        if assistant.get("id"):
            await _set_server_url(accounts, assistant["id"], public_url + paths.vapi)
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


@contextlib.contextmanager
def tunneled(settings: Settings, port: int, *, ask: Callable[[str], bool] | None, announce: Callable[[str], None],
             paths: WebhookPaths = WebhookPaths(), what: str = "bridge") -> Iterator[Tunnel]:
    """``serve --tunnel`` and ``twivapi tunnel``: ngrok for ``port`` (installed first when allowed,
    ``ensure_ngrok``), the provisioned number and assistant pointed at it (``paths`` on the tunnel's
    URL) until the block ends, then restored and the tunnel closed, however it ends. A previous
    session that crashed is restored first."""
    require_authtoken(settings)   # before offering a download that would be of no use yet
    ngrok_path = ensure_ngrok(settings, ask=ask, announce=announce)
    restore_sync(settings)
    tunnel = open_tunnel(settings, port, ngrok_path=ngrok_path)
    announce(f"tunnel: {tunnel.public_url} -> http://{settings.host}:{port}")
    try:
        if asyncio.run(rewire(settings, tunnel.public_url, paths)):
            announce(f"the provisioned number and assistant point at the tunnel until this {what} stops")
        yield tunnel
    finally:
        try:
            if restore_sync(settings):
                announce("restored the number's and the assistant's previous URLs")
        finally:
            tunnel.close()


def listening(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether something accepts TCP connections on ``host:port`` (a loopback probe, nothing sent)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def expose(settings: Settings, port: int, paths: WebhookPaths, *, ask: Callable[[str], bool] | None,
           announce: Callable[[str], None], wait: Callable[[str], None]) -> str:
    """``twivapi tunnel``: the same tunnel and rewiring as ``serve --tunnel``, for a server of the
    user's own on ``port`` (its webhooks at ``paths``), until ``wait(url)`` returns; returns the URL.
    Nothing listening on the port yet is a warning, not an error: the server may start after."""
    from .errors import UsageError
    if not 1 <= port <= 65535:
        raise UsageError(f"--port {port}: a TCP port is 1-65535")
    paths.check()
    if not listening("127.0.0.1", port):
        announce(f"twivapi: warning: nothing listens on 127.0.0.1:{port} yet; the tunnel opens anyway, and ngrok "
                 "answers 502 until your server listens there")
    with tunneled(settings, port, ask=ask, announce=announce, paths=paths, what="tunnel") as tunnel:
        url = tunnel.public_url
        announce(f"  Twilio voice webhook: {url}{paths.voice}\n  Twilio status callback: {url}{paths.status}\n"
                 f"  Vapi server URL: {url}{paths.vapi}")
        announce(f"  replay against it: twivapi replay fixtures/ --target {url} --route twilio.voice={paths.voice} "
                 f"--route twilio.status={paths.status} --route vapi={paths.vapi}")
        announce("Ctrl-C (or SIGTERM) stops the tunnel and puts the previous URLs back")
        wait(url)
    return url
