"""`serve --tunnel` without ngrok: found where pyngrok keeps it, asked for, installed through pyngrok's
real installer from a stand-in download on loopback, a failed download, and `doctor`'s ngrok line.

pyngrok takes its download URL from ``installer.PLATFORMS`` (one URL per platform, no parameter), so
the tests point this platform's entry at a local HTTP server; the install path is pyngrok's own
setting, ``PYNGROK_NGROK_PATH``. Nothing here reaches the internet: an unexpected request to the
real CDN would fail the test (every test routes the URL to the local server first)."""

from __future__ import annotations

import gc
import io
import stat
import sys
import tarfile
import threading
import zipfile
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from pyngrok import installer
from typer.testing import CliRunner

from twivapi_cli.cli import app
from twivapi_cli.commands import serve as serve_cmd
from twivapi_cli.config import load_settings
from twivapi_cli.errors import TunnelError
from twivapi_cli.tunnel import ensure_ngrok, find_ngrok, install_ngrok, ngrok_check

pytestmark = [
    # Python 3.12/3.13 warn that tarfile's extractall without a filter changes in 3.14: pyngrok's call
    pytest.mark.filterwarnings("ignore:Python 3.14 will:DeprecationWarning"),
    # pyngrok's installer never closes its urlopen response; the fixture collects them here
    pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning"),
]

runner = CliRunner()
TOKEN = "ngrok-install-test-token-5f1d"


def fake_agent_source() -> str:
    return f"#!{sys.executable}\n" + (Path(__file__).parent / "fake_ngrok.py").read_text()


def archive(name: str, members: dict[str, str]) -> bytes:
    """What pyngrok's installer unpacks for this platform: a .zip or a .tgz holding ``ngrok``."""
    buffer = io.BytesIO()
    if name.endswith(".zip"):
        with zipfile.ZipFile(buffer, "w") as zf:
            for member, text in members.items():
                info = zipfile.ZipInfo(member)
                info.external_attr = 0o755 << 16
                zf.writestr(info, text)
    else:
        with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
            for member, text in members.items():
                data = text.encode()
                info = tarfile.TarInfo(member)
                info.size, info.mode = len(data), 0o755
                tf.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


class Downloads:
    """A local stand-in for ngrok's CDN: ``/ok/<name>`` the archive, ``/missing/<name>`` a 404,
    ``/hangup/<name>`` a connection closed without an answer, ``/empty/<name>`` an archive without
    ngrok in it. Every request is recorded."""

    def __init__(self, name: str, dest: Path, route: Callable[[str], None]):
        self.name, self.dest, self._route = name, dest, route
        self.requests: list[str] = []
        bodies = {"ok": archive(name, {installer.get_ngrok_bin(): fake_agent_source()}),
                  "empty": archive(name, {"README.txt": "no binary here\n"})}
        downloads = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                downloads.requests.append(self.path)
                kind = self.path.strip("/").split("/", 1)[0]
                if kind == "hangup":
                    self.close_connection = True
                    return
                body = bodies.get(kind)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def route(self, kind: str) -> None:
        """Point pyngrok's download URL for this platform at ``kind``."""
        self._route(self.url(kind))

    def url(self, kind: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/{kind}/{self.name}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def downloads(monkeypatch, tmp_path):
    """The CDN stand-in, pyngrok pointed at it (``route``), its copy's path in tmp_path, PATH without
    any ngrok, and no proxy in the way of 127.0.0.1."""
    platform = f"{installer.get_system()}_{installer.get_arch()}"
    real_url = installer.PLATFORMS[platform]
    dest = tmp_path / "pyngrok-home" / installer.get_ngrok_bin()
    running = Downloads("fake-" + real_url.rsplit("/", 1)[-1],   # the same archive kind: .zip or .tgz
                        dest, lambda url: monkeypatch.setitem(installer.PLATFORMS, platform, url))
    running.route("unrouted")   # a 404 until a test routes it: never the real CDN
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))   # pyngrok downloads into the temp dir
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "empty-bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.setenv("PYNGROK_NGROK_PATH", str(dest))   # pyngrok's own setting for where its copy lives
    try:
        yield running
    finally:
        running.close()
        gc.collect()   # pyngrok's unclosed responses warn now, under this module's filter, not in a later test


def settings(tmp_path, **env):
    return load_settings({}, environ={"NGROK_AUTHTOKEN": TOKEN, "TWIVAPI_STATE_DIR": str(tmp_path / "state"), **env},
                         env_file=None)


def cli_env(tmp_path, **extra) -> dict:
    return {"NGROK_AUTHTOKEN": TOKEN, "TWIVAPI_STATE_DIR": str(tmp_path / "state"), "COLUMNS": "250", **extra}


# --- the installer, directly -------------------------------------------------------------------

def test_installs_through_pyngrok_from_the_stand_in_and_the_copy_is_found_next_time(downloads, tmp_path):
    downloads.route("ok")
    lines: list[str] = []
    assert find_ngrok(settings(tmp_path)) is None
    path = install_ngrok(str(downloads.dest), announce=lines.append)
    assert path == str(downloads.dest) and downloads.dest.stat().st_mode & stat.S_IXUSR
    assert downloads.requests == [f"/ok/{downloads.name}"]
    assert lines[0] == f"downloading ngrok from {downloads.url('ok')} into {downloads.dest.parent} ..."
    assert lines[-1] == f"installed ngrok 3.19.0 at {downloads.dest}"
    assert not (tmp_path / downloads.name).exists()   # pyngrok's downloaded archive is not left behind
    found = find_ngrok(settings(tmp_path))
    assert found is not None and (found.path, found.source) == (str(downloads.dest), "pyngrok")


@pytest.mark.parametrize("kind, what", [("missing", "404"), ("hangup", "closed connection"),
                                        ("empty", "no ngrok in the archive")])
def test_a_failed_download_says_what_failed_and_how_to_install_by_hand(downloads, tmp_path, kind, what):
    downloads.route(kind)
    with pytest.raises(TunnelError) as info:
        install_ngrok(str(downloads.dest), announce=lambda line: None)
    text = str(info.value)
    assert text.startswith("downloading ngrok failed: ") and downloads.url(kind) in text
    if kind == "missing":
        assert "404" in text
    assert "install it by hand" in text and "TWIVAPI_NGROK_PATH" in text and "HTTPS_PROXY" in text
    assert not downloads.dest.exists()   # nothing half-installed that would be found next time
    assert find_ngrok(settings(tmp_path)) is None


def test_without_consent_nothing_is_downloaded(downloads, tmp_path):
    downloads.route("ok")
    asked: list[str] = []
    with pytest.raises(TunnelError, match="TWIVAPI_NGROK_INSTALL=1") as info:
        ensure_ngrok(settings(tmp_path), ask=None, announce=lambda line: None)   # no terminal
    assert "--yes" in str(info.value) and "TWIVAPI_NGROK_PATH" in str(info.value) and "ngrok.com/download" in str(info.value)
    with pytest.raises(TunnelError, match="declined"):
        ensure_ngrok(settings(tmp_path), ask=lambda q: asked.append(q) or False, announce=lambda line: None)
    assert asked == [f"ngrok is not installed: download it now with pyngrok into {downloads.dest.parent}?"]
    assert downloads.requests == [] and not downloads.dest.exists()


def test_consent_by_setting_or_by_answer_installs(downloads, tmp_path):
    downloads.route("ok")
    assert ensure_ngrok(settings(tmp_path, TWIVAPI_NGROK_INSTALL="1"), ask=None,
                        announce=lambda line: None) == str(downloads.dest)
    downloads.dest.unlink()
    assert ensure_ngrok(settings(tmp_path), ask=lambda q: True, announce=lambda line: None) == str(downloads.dest)
    assert len(downloads.requests) == 2
    # installed: used as it is, no question, no download
    assert ensure_ngrok(settings(tmp_path), ask=None, announce=lambda line: None) == str(downloads.dest)
    assert len(downloads.requests) == 2


def test_a_binary_on_path_or_in_twivapi_ngrok_path_is_used_and_nothing_is_downloaded(downloads, tmp_path):
    downloads.route("ok")
    on_path = tmp_path / "empty-bin" / "ngrok"
    on_path.write_text(fake_agent_source())
    on_path.chmod(0o755)
    found = find_ngrok(settings(tmp_path))
    assert found is not None and (found.path, found.source) == (str(on_path), "PATH")
    explicit = tmp_path / "elsewhere-ngrok"
    explicit.write_text(fake_agent_source())
    found = find_ngrok(settings(tmp_path, TWIVAPI_NGROK_PATH=str(explicit)))
    assert found is not None and found.source == "TWIVAPI_NGROK_PATH"
    with pytest.raises(TunnelError, match="TWIVAPI_NGROK_PATH=.* is not a file"):   # a typo is not a reason to download
        ensure_ngrok(settings(tmp_path, TWIVAPI_NGROK_PATH=str(tmp_path / "typo"), TWIVAPI_NGROK_INSTALL="1"),
                     ask=lambda q: True, announce=lambda line: None)
    assert downloads.requests == []


def test_twivapi_ngrok_install_is_a_flag(tmp_path):
    assert settings(tmp_path, TWIVAPI_NGROK_INSTALL="yes").ngrok_install is True
    assert settings(tmp_path, TWIVAPI_NGROK_INSTALL="0").ngrok_install is False
    assert settings(tmp_path).ngrok_install is False
    from twivapi_cli.errors import ConfigError
    with pytest.raises(ConfigError, match="TWIVAPI_NGROK_INSTALL"):
        settings(tmp_path, TWIVAPI_NGROK_INSTALL="maybe")


# --- serve --tunnel through the CLI ----------------------------------------------------------------

@pytest.fixture
def no_bridge(monkeypatch):
    """serve --tunnel up to the bridge: the tunnel opens for real (pyngrok, the installed stand-in),
    the bridge itself returns at once."""
    served: list[str] = []
    monkeypatch.setattr("twivapi_cli.bridge.server.serve_forever",
                        lambda settings, **kwargs: served.append(settings.public_url))
    return served


def test_serve_tunnel_off_a_terminal_stops_naming_both_ways_out(downloads, tmp_path, no_bridge):
    downloads.route("ok")
    result = runner.invoke(app, ["serve", "--tunnel"], env=cli_env(tmp_path))
    assert result.exit_code == 3, result.output
    assert "the ngrok binary was not found" in result.output
    for way in ("--yes", "TWIVAPI_NGROK_INSTALL=1", "TWIVAPI_NGROK_PATH", "https://ngrok.com/download"):
        assert way in result.output
    assert downloads.requests == [] and no_bridge == [] and TOKEN not in result.output


def test_serve_tunnel_yes_downloads_with_progress_then_tunnels(downloads, tmp_path, no_bridge):
    downloads.route("ok")
    result = runner.invoke(app, ["serve", "--tunnel", "--yes"], env=cli_env(tmp_path))
    assert result.exit_code == 0, result.output
    assert f"downloading ngrok from {downloads.url('ok')}" in result.output
    assert "Downloading ngrok: 100%" in result.output          # pyngrok's progress indicator
    assert f"installed ngrok 3.19.0 at {downloads.dest}" in result.output
    assert "tunnel: https://" in result.output and len(no_bridge) == 1 and no_bridge[0].endswith(".fake-ngrok.test")
    assert TOKEN not in result.output
    again = runner.invoke(app, ["serve", "--tunnel"], env=cli_env(tmp_path))   # found now: no question
    assert again.exit_code == 0 and "downloading" not in again.output and len(downloads.requests) == 1


def test_serve_tunnel_with_the_install_setting(downloads, tmp_path, no_bridge):
    downloads.route("ok")
    result = runner.invoke(app, ["serve", "--tunnel"], env=cli_env(tmp_path, TWIVAPI_NGROK_INSTALL="1"))
    assert result.exit_code == 0, result.output
    assert downloads.dest.exists() and len(no_bridge) == 1


@pytest.mark.parametrize("answer, installs", [("\n", True), ("y\n", True), ("n\n", False)])
def test_serve_tunnel_on_a_terminal_asks_once(downloads, tmp_path, no_bridge, monkeypatch, answer, installs):
    downloads.route("ok")
    monkeypatch.setattr(serve_cmd, "_on_a_terminal", lambda: True)
    result = runner.invoke(app, ["serve", "--tunnel"], env=cli_env(tmp_path), input=answer)
    question = f"ngrok is not installed: download it now with pyngrok into {downloads.dest.parent}? [Y/n]"
    assert result.output.count(question) == 1, result.output
    if installs:
        assert result.exit_code == 0, result.output
        assert downloads.dest.exists() and len(no_bridge) == 1
    else:
        assert result.exit_code == 3 and "declined" in result.output and "TWIVAPI_NGROK_PATH" in result.output
        assert downloads.requests == [] and no_bridge == []


def test_serve_tunnel_failed_download_exits_3_with_the_manual_way(downloads, tmp_path, no_bridge):
    downloads.route("missing")
    result = runner.invoke(app, ["serve", "--tunnel", "--yes"], env=cli_env(tmp_path))
    assert result.exit_code == 3, result.output
    assert "downloading ngrok failed" in result.output and "404" in result.output
    assert downloads.url("missing") in result.output and "TWIVAPI_NGROK_PATH" in result.output
    assert no_bridge == [] and TOKEN not in result.output


def test_no_authtoken_stops_before_offering_a_download(downloads, tmp_path, no_bridge, monkeypatch):
    downloads.route("ok")
    monkeypatch.setattr(serve_cmd, "_on_a_terminal", lambda: True)
    env = cli_env(tmp_path)
    env.pop("NGROK_AUTHTOKEN")
    result = runner.invoke(app, ["serve", "--tunnel"], env=env, input="y\n")
    assert result.exit_code == 3 and "NGROK_AUTHTOKEN is not set" in result.output
    assert "download it now" not in result.output and downloads.requests == []


# --- doctor ------------------------------------------------------------------------------------------

def test_doctor_says_which_ngrok_or_none(downloads, tmp_path):
    none = ngrok_check(settings(tmp_path))
    assert none.ok and "none installed" in none.detail and str(downloads.dest.parent) in none.detail
    result = runner.invoke(app, ["doctor"], env=cli_env(tmp_path))
    assert "ngrok" in result.output and "none installed" in result.output
    downloads.route("ok")
    install_ngrok(str(downloads.dest), announce=lambda line: None)
    found = ngrok_check(settings(tmp_path))
    assert found.ok and found.detail == f"{downloads.dest} (ngrok 3.19.0, from pyngrok)"
    result = runner.invoke(app, ["doctor"], env=cli_env(tmp_path))
    assert f"{downloads.dest} (ngrok 3.19.0, from pyngrok)" in result.output and TOKEN not in result.output
    broken = tmp_path / "broken-ngrok"
    broken.write_text("#!/bin/sh\nexit 1\n")
    broken.chmod(0o755)
    bad = ngrok_check(settings(tmp_path, TWIVAPI_NGROK_PATH=str(broken)))
    assert not bad.ok and "does not run" in bad.detail
    typo = ngrok_check(settings(tmp_path, TWIVAPI_NGROK_PATH=str(tmp_path / "typo")))
    assert not typo.ok and "TWIVAPI_NGROK_PATH" in typo.detail
