"""Settings: one table, read from flags > environment > .env > defaults.

This is the only module that reads the environment. Every setting has one row in ``SETTINGS``; the
README's settings table, ``--help`` texts and a test all come from it, so they cannot drift apart.
Secrets are wrapped in ``Secret`` whose repr and str are masked, so a settings object can be logged,
printed in a traceback or put in an error without leaking anything.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError
from .models import Mode


class Secret:
    """A string that never shows itself in repr/str/format; call ``reveal()`` at the point of use."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value
        _remember_secret(value)

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def revealed(secret: Secret | None) -> str:
    """A secret setting's value, or "" when it is not set (commands check what they need first)."""
    return secret.reveal() if secret else ""


# Every Secret's value is scrubbed from log records as they are made, whoever logs them: websockets
# and uvicorn print request headers (Authorization: Bearer <VAPI_API_KEY>) at debug level, pyngrok
# logs ngrok's own error lines (which can quote the authtoken) through whatever handler is there.
# A Secret only remembers its value; the scrubber is installed once, at start-up, by whoever owns
# the process's logging (the CLI, ``serve``): ``install_log_redaction()``.
_REDACT_MIN = 8                  # shorter values would scrub ordinary words; real secrets are longer
_redacted: tuple[str, ...] = ()  # longest first; replaced whole, so a reader never sees it change
_redact_lock = threading.Lock()
_installed = False


def _remember_secret(value: object) -> None:
    global _redacted
    if not isinstance(value, str) or len(value) < _REDACT_MIN or value in _redacted:
        return
    with _redact_lock:
        _redacted = tuple(sorted({*_redacted, value}, key=len, reverse=True))


def install_log_redaction() -> None:
    """Scrub every Secret's value (those made before and after this call) from log records; once
    per process, however often it is called."""
    global _installed
    with _redact_lock:
        if not _installed:
            logging.setLogRecordFactory(_redacting_factory(logging.getLogRecordFactory()))
            _installed = True


def _scrub(text: str, values: tuple[str, ...]) -> str | None:
    """``text`` with every value replaced by ***, or None when it holds none of them."""
    if not any(value in text for value in values):
        return None
    for value in values:
        text = text.replace(value, "***")
    return text


def _redacting_factory(previous: Callable[..., logging.LogRecord]) -> Callable[..., logging.LogRecord]:
    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        values = _redacted
        if not values:
            return record
        try:
            message = _scrub(record.getMessage(), values)
            if message is not None:
                record.msg, record.args = message, ()
            if record.exc_info:
                text = _scrub(logging.Formatter().formatException(record.exc_info), values)
                if text is not None:
                    record.exc_text = text
        except Exception:   # a record that cannot be formatted is left to logging's own error path
            pass
        return record
    return factory


MODES = tuple(mode.value for mode in Mode)
AUDIO_FORMATS = ("mulaw-8k", "pcm16-16k")
BARGE_IN = ("interrupted", "speech")
MEDIA_SIGNATURE = ("optional", "required")
HMAC_ALGORITHMS = ("sha256", "sha512", "sha1")      # HMACAuthenticationPlan.algorithm
HMAC_ENCODINGS = ("hex", "base64")                  # HMACAuthenticationPlan.signatureEncoding


def _url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("must be an http(s) URL such as https://example.ngrok.app")
    return value.rstrip("/")


def _public_url(value: str) -> str:
    value = _url(value)
    parts = urlsplit(value)
    if parts.username or parts.password:
        raise ValueError("must not carry user:password@ (Twilio drops credentials when signing)")
    if parts.netloc != parts.netloc.lower():
        raise ValueError("host must be lowercase (Twilio signs the lowercase host)")
    return value


def _mode(value: str) -> Mode:
    try:
        return Mode(value)
    except ValueError:
        raise ValueError(f"must be one of {', '.join(MODES)}") from None


def _choice(options: tuple[str, ...]) -> Callable[[str], str]:
    def cast(value: str) -> str:
        if value not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return value
    return cast


def _account_sid(value: str) -> str:
    if not re.fullmatch(r"AC[0-9a-fA-F]{32}", value):
        raise ValueError("must be 'AC' followed by 32 hex characters (Twilio Console > Account Info)")
    return value


def _positive_float(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise ValueError("must be a positive number")
    return number


def _positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise ValueError("must be a positive whole number")
    return number


def _flag(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be 1 or 0 (true/false, yes/no, on/off)")


def _header_name(value: str) -> str:
    if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", value):
        raise ValueError("must be an HTTP header name such as x-signature")
    return value.lower()


def _payload_format(value: str) -> str:
    if "{body}" not in value:
        raise ValueError("must contain {body} (placeholders: {body} {timestamp} {method} {url} {svix-id})")
    return value


def _sim_latency(value: str) -> str:
    from .sim.latency import scale_of  # stdlib only: the simulators' latency table owns the names

    scale_of(value)
    return value.strip().lower()


def _port(value: str) -> int:
    number = int(value)
    if not 0 <= number <= 65535:
        raise ValueError("must be a port number from 0 to 65535")
    return number


E164 = re.compile(r"\+[1-9]\d{6,14}")
SIP_URI = re.compile(r"sips?:[^\s@]+@[^\s@]+|sips?:[^\s@]+", re.IGNORECASE)


def destination_problem(value: str) -> str | None:
    """Why ``value`` is no transfer destination (an E.164 number or a sip: URI), or None."""
    if E164.fullmatch(value) or SIP_URI.fullmatch(value):
        return None
    return f"{value!r} is neither an E.164 number (+14155550100) nor a SIP URI (sip:agent@example.com)"


def _destinations(value: str) -> tuple[tuple[str, str], ...]:
    """``name=destination`` pairs, comma-separated; a destination is an E.164 number or a sip: URI."""
    pairs: list[tuple[str, str]] = []
    for item in (part.strip() for part in value.split(",")):
        name, sep, destination = item.partition("=")
        name, destination = name.strip(), destination.strip()
        if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"{item!r} is not name=destination (e.g. sales=+14155550100,"
                             "support=sip:support@example.com)")
        problem = destination_problem(destination)
        if problem:
            raise ValueError(f"{name}: {problem}")
        if name in dict(pairs):
            raise ValueError(f"{name} is listed twice")
        pairs.append((name, destination))
    return tuple(pairs)


@dataclass(frozen=True)
class Setting:
    attr: str
    env: str
    default: Any
    help: str
    cast: Callable[[str], Any] = str
    secret: bool = False


SETTINGS: tuple[Setting, ...] = (
    Setting("twilio_account_sid", "TWILIO_ACCOUNT_SID", None,
            "Twilio account SID (AC...), for provisioning and the simulated account.", _account_sid),
    Setting("twilio_auth_token", "TWILIO_AUTH_TOKEN", None,
            "Twilio primary Auth Token: signs and validates X-Twilio-Signature.", secret=True),
    Setting("twilio_api_base_url", "TWILIO_API_BASE_URL", "https://api.twilio.com",
            "Base URL of Twilio's REST API (point it at `twivapi sim` for local work).", _url),
    Setting("vapi_api_key", "VAPI_API_KEY", None, "Vapi private API key (Bearer).", secret=True),
    Setting("vapi_base_url", "VAPI_BASE_URL", "https://api.vapi.ai",
            "Base URL of Vapi's REST API (point it at `twivapi sim` for local work).", _url),
    Setting("vapi_webhook_secret", "VAPI_WEBHOOK_SECRET", None,
            "Secret Vapi sends with server-URL messages (X-Vapi-Secret, Bearer or HMAC key).", secret=True),
    Setting("vapi_hmac_algorithm", "VAPI_HMAC_ALGORITHM", "sha256",
            "HMAC credential (HMACAuthenticationPlan.algorithm): sha256 | sha512 | sha1.", _choice(HMAC_ALGORITHMS)),
    Setting("vapi_hmac_encoding", "VAPI_HMAC_ENCODING", "hex",
            "HMAC credential's signatureEncoding: hex | base64.", _choice(HMAC_ENCODINGS)),
    Setting("vapi_hmac_signature_header", "VAPI_HMAC_SIGNATURE_HEADER", "x-signature",
            "HMAC credential's signatureHeader: the header the signature comes in.", _header_name),
    Setting("vapi_hmac_timestamp_header", "VAPI_HMAC_TIMESTAMP_HEADER", "x-timestamp",
            "HMAC credential's timestampHeader (checked within 5 minutes, ms or s).", _header_name),
    Setting("vapi_hmac_include_timestamp", "VAPI_HMAC_INCLUDE_TIMESTAMP", True,
            "HMAC credential's includeTimestamp: 0 = no timestamp header; the payload is the raw body.", _flag),
    Setting("vapi_hmac_payload_format", "VAPI_HMAC_PAYLOAD_FORMAT", None,
            "HMAC credential's payloadFormat (default {timestamp}.{body}, or {body} without a timestamp; "
            "also {method} {url} {svix-id}).", _payload_format),
    Setting("vapi_hmac_signature_prefix", "VAPI_HMAC_SIGNATURE_PREFIX", None,
            "HMAC credential's signaturePrefix, e.g. sha256= (none: an <algorithm>= prefix is accepted anyway)."),
    Setting("vapi_hmac_message_id_header", "VAPI_HMAC_MESSAGE_ID_HEADER", None,
            "HMAC credential's messageIdHeader: the header {svix-id} is read from.", _header_name),
    Setting("vapi_hmac_secret_is_base64", "VAPI_HMAC_SECRET_IS_BASE64", False,
            "HMAC credential's secretIsBase64: VAPI_WEBHOOK_SECRET is base64, decoded into the HMAC key.", _flag),
    Setting("vapi_public_key", "VAPI_PUBLIC_KEY", None,
            "Vapi public API key: set, assistants get monitorPlan.controlAuthenticationEnabled and Live Call "
            "Control requests (ending calls) carry it as Bearer, as the spec asks.", secret=True),
    Setting("vapi_assistant_id", "VAPI_ASSISTANT_ID", None,
            "Vapi assistant used for calls and answered to assistant-request."),
    Setting("vapi_phone_number_id", "VAPI_PHONE_NUMBER_ID", None,
            "Vapi phone-number id (bypass mode's POST /call needs it; default: the one `twivapi provision` "
            "imported, from the provision state)."),
    Setting("public_url", "TWIVAPI_PUBLIC_URL", None,
            "Public https base URL Twilio calls; signatures are validated against it.", _public_url),
    Setting("store", "TWIVAPI_STORE", None,
            "Where state lives: sqlite:///path.db, memory://, redis://host:port/db "
            "(default: SQLite in the state dir)."),
    Setting("redis_prefix", "TWIVAPI_REDIS_PREFIX", "twivapi:",
            "Key prefix in Redis (several bridges or tests can share one server)."),
    Setting("mode", "TWIVAPI_MODE", Mode.STREAM, "stream | bypass | native.", _mode),
    Setting("audio_format", "TWIVAPI_AUDIO_FORMAT", "mulaw-8k",
            "Audio to Vapi's WebSocket transport: mulaw-8k (passthrough) | pcm16-16k.",
            _choice(AUDIO_FORMATS)),
    Setting("barge_in", "TWIVAPI_BARGE_IN", "interrupted",
            "When Twilio's buffer is cleared: interrupted (on Vapi's user-interrupted: Vapi decides, so "
            "backchannels such as \"uh-huh\" do not cut the assistant) | speech (also on the caller's "
            "speech-update started).", _choice(BARGE_IN)),
    Setting("media_signature", "TWIVAPI_MEDIA_SIGNATURE", "optional",
            "X-Twilio-Signature on the media stream's upgrade: optional (checked and logged when present; the "
            "stream is authenticated by the per-call token in its start message) | required (a valid one is "
            "needed as well).", _choice(MEDIA_SIGNATURE)),
    Setting("host", "TWIVAPI_HOST", "127.0.0.1", "Interface `serve` listens on."),
    Setting("port", "TWIVAPI_PORT", 8080, "Public port `serve` listens on.", _port),
    Setting("workers", "TWIVAPI_WORKERS", 1,
            "Processes `serve` runs on its one port (SO_REUSEPORT: the kernel spreads connections), one "
            "event loop per core; above 1 the store must be Redis (redis://...), which they share.",
            _positive_int),
    Setting("admin_port", "TWIVAPI_ADMIN_PORT", 0,
            "Loopback-only admin port for tail/metrics (0 = pick a free one).", _port),
    Setting("state_dir", "TWIVAPI_STATE_DIR", ".twivapi",
            "Directory for the SQLite store, provision state and the bridge's admin address.", Path),
    Setting("bypass_timeout", "TWIVAPI_BYPASS_TIMEOUT", 5.0,
            "Seconds bypass mode waits for Vapi before answering with fallback TwiML.", _positive_float),
    Setting("session_ttl", "TWIVAPI_SESSION_TTL", 4 * 3600.0,
            "Seconds after which a session that never ended is expired.", _positive_float),
    Setting("setup_queue_limit", "TWIVAPI_SETUP_QUEUE_LIMIT", 2000,
            "Vapi call setups that may wait at once; past it callers get the fallback TwiML.", int),
    Setting("setup_concurrency", "TWIVAPI_SETUP_CONCURRENCY", 256,
            "Vapi call setups (POST /call) in flight at once, and the Vapi client's connection pool; "
            "a burst needs rate x Vapi's latency (100 calls/s at 800 ms: 80).", _positive_int),
    Setting("stream_start_timeout", "TWIVAPI_STREAM_START_TIMEOUT", 15.0,
            "Seconds a stream-mode call may wait, its Vapi call ready, for Twilio to open the media stream; "
            "then it is ended (stream-never-started), Vapi side too, instead of being billed until a timeout.",
            _positive_float),
    Setting("drain_timeout", "TWIVAPI_DRAIN_TIMEOUT", 25.0,
            "Seconds a stopping bridge (SIGTERM, Ctrl-C) lets its live calls go on before ending them; "
            "below a typical orchestrator's 30 s grace period, so it exits 0 before being killed.",
            _positive_float),
    Setting("keepalive_timeout", "TWIVAPI_KEEPALIVE_TIMEOUT", 75.0,
            "Seconds an idle keep-alive connection stays open; above what proxies and load balancers "
            "idle theirs (ngrok, a cloud LB: 60 s), so they never reuse one the bridge just closed.",
            _positive_float),
    Setting("body_timeout", "TWIVAPI_BODY_TIMEOUT", 10.0,
            "Seconds a request's body may take to arrive; a client that stalls mid-body gets a 408 and "
            "the connection is closed (Twilio and Vapi send theirs in milliseconds).", _positive_float),
    Setting("transfer_destinations", "TWIVAPI_TRANSFER_DESTINATIONS", None,
            "Where transfer-destination-request sends callers: name=destination pairs, comma-separated "
            "(sales=+14155550100,support=sip:support@example.com); the one named default, else the first.",
            _destinations),
    Setting("record_dir", "TWIVAPI_RECORD_DIR", None,
            "`serve --record DIR`: per call, DIR/<CallSid>.wav (stereo 8 kHz: left the caller, right what the "
            "caller heard) and DIR/<CallSid>.json (its events, with offsets into the audio). Off when unset.", Path),
    Setting("record_max_mb", "TWIVAPI_RECORD_MAX_MB", 1000.0,
            "Most megabytes of recordings kept in the record dir; past it the oldest calls are deleted.",
            _positive_float),
    Setting("record_max_age_days", "TWIVAPI_RECORD_MAX_AGE_DAYS", 7.0,
            "Recordings older than this many days are deleted from the record dir.", _positive_float),
    Setting("forward_url", "TWIVAPI_FORWARD_URL", None,
            "`serve --forward-to`: your app's URL; every Vapi server message is forwarded to it as Vapi sent it "
            "(same body and credential), and request messages (tool-calls...) are answered with its answer.", _url),
    Setting("forward_twilio_url", "TWIVAPI_FORWARD_TWILIO_URL", None,
            "`serve --forward-twilio-to`: your app's URL for Twilio's status callbacks, re-signed "
            "(X-Twilio-Signature) for it.", _url),
    Setting("forward_timeout", "TWIVAPI_FORWARD_TIMEOUT", 8.0,
            "Seconds your app has to answer a forwarded request message (below Vapi's 20 s server timeout); "
            "then, or on an error, Vapi gets the bridge's built-in answer.", _positive_float),
    Setting("forward_queue_limit", "TWIVAPI_FORWARD_QUEUE_LIMIT", 1000,
            "Informational messages waiting to be forwarded at once; past it new ones are dropped and counted "
            "(forward.dropped).", _positive_int),
    Setting("forward_retries", "TWIVAPI_FORWARD_RETRIES", 5,
            "Attempts per forwarded informational message (exponential backoff from 0.25 s) before it is "
            "dropped and counted.", _positive_int),
    Setting("tools", "TWIVAPI_TOOLS", None,
            "`serve --tools module:attr` (or path/to/tools.py:attr): your Python tool functions, beside the "
            "built-in ones."),
    Setting("tool_timeout", "TWIVAPI_TOOL_TIMEOUT", 10.0,
            "Seconds a tool function (--tools) may run before the call gets an error result.", _positive_float),
    Setting("sim_latency", "TWIVAPI_SIM_LATENCY", "realistic",
            "How slowly `twivapi sim` answers: realistic (as the real APIs: Vapi's POST /call 300-600 ms, other "
            "requests 30-150 ms) | none (at once) | a scale factor such as 0.5.", _sim_latency),
    Setting("ngrok_authtoken", "NGROK_AUTHTOKEN", None, "ngrok auth token for `serve --tunnel`.",
            secret=True),
    Setting("ngrok_path", "TWIVAPI_NGROK_PATH", None,
            "The ngrok binary for `serve --tunnel` (default: ngrok on PATH, else pyngrok's copy); when "
            "set, it must exist: nothing is downloaded instead."),
    Setting("ngrok_install", "TWIVAPI_NGROK_INSTALL", False,
            "1: `serve --tunnel` downloads ngrok with pyngrok, without asking, when none is installed "
            "(as --yes); otherwise it asks on a terminal and stops elsewhere.", _flag),
)

_BY_ATTR = {s.attr: s for s in SETTINGS}


@dataclass(frozen=True)
class Settings:
    twilio_account_sid: str | None = None
    twilio_auth_token: Secret | None = None
    twilio_api_base_url: str = "https://api.twilio.com"
    vapi_api_key: Secret | None = None
    vapi_base_url: str = "https://api.vapi.ai"
    vapi_webhook_secret: Secret | None = None
    vapi_hmac_algorithm: str = "sha256"
    vapi_hmac_encoding: str = "hex"
    vapi_hmac_signature_header: str = "x-signature"
    vapi_hmac_timestamp_header: str = "x-timestamp"
    vapi_hmac_include_timestamp: bool = True
    vapi_hmac_payload_format: str | None = None
    vapi_hmac_signature_prefix: str | None = None
    vapi_hmac_message_id_header: str | None = None
    vapi_hmac_secret_is_base64: bool = False
    vapi_public_key: Secret | None = None
    vapi_assistant_id: str | None = None
    vapi_phone_number_id: str | None = None
    public_url: str | None = None
    store: str | None = None
    redis_prefix: str = "twivapi:"
    mode: Mode = Mode.STREAM
    audio_format: str = "mulaw-8k"
    barge_in: str = "interrupted"
    media_signature: str = "optional"
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    admin_port: int = 0
    state_dir: Path = field(default_factory=lambda: Path(".twivapi"))
    bypass_timeout: float = 5.0
    session_ttl: float = 4 * 3600.0
    setup_queue_limit: int = 2000
    setup_concurrency: int = 256
    keepalive_timeout: float = 75.0
    drain_timeout: float = 25.0
    stream_start_timeout: float = 15.0
    body_timeout: float = 10.0
    transfer_destinations: tuple[tuple[str, str], ...] = ()
    record_dir: Path | None = None
    record_max_mb: float = 1000.0
    record_max_age_days: float = 7.0
    forward_url: str | None = None
    forward_twilio_url: str | None = None
    forward_timeout: float = 8.0
    forward_queue_limit: int = 1000
    forward_retries: int = 5
    tools: str | None = None
    tool_timeout: float = 10.0
    sim_latency: str = "realistic"
    ngrok_authtoken: Secret | None = None
    ngrok_path: str | None = None
    ngrok_install: bool = False

    def require(self, *attrs: str) -> None:
        """Fail with one message naming every missing variable and how to set it."""
        missing = [_BY_ATTR[a] for a in attrs if not getattr(self, a)]
        if missing:
            names = ", ".join(s.env for s in missing)
            raise ConfigError(
                f"missing setting: {names}",
                hint=f"set {'it' if len(missing) == 1 else 'them'} in the environment or in .env "
                     f"(see .env.example), e.g. {missing[0].env}=...",
            )

    @property
    def store_url(self) -> str:
        return self.store or f"sqlite:///{self.state_dir / 'twivapi.db'}"

    def with_overrides(self, **values: Any) -> Settings:
        return replace(self, **values)


def _cast(setting: Setting, raw: Any, source: str) -> Any:
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str):
        value = raw
    else:
        try:
            value = setting.cast(raw.strip())
        except (ValueError, TypeError) as exc:
            # a cast error may quote the value: never show it for a secret
            detail = "is malformed" if setting.secret else f"{raw!r} {exc}"
            raise ConfigError(f"{setting.env} from {source}: {detail}",
                              hint=f"fix {setting.env} in the environment or .env") from None
    return Secret(value) if setting.secret and not isinstance(value, Secret) else value


def load_settings(flags: Mapping[str, Any] | None = None, *, environ: Mapping[str, str] | None = None,
                  env_file: str | Path | None = ".env") -> Settings:
    """Build Settings: flags (by attribute name, None = not given) > environ > .env file > defaults."""
    from dotenv import dotenv_values

    environ = os.environ if environ is None else environ
    file_values: Mapping[str, str | None] = {}
    if env_file is not None:
        path = Path(env_file)
        if path.is_file():
            file_values = dotenv_values(path)
        elif str(env_file) != ".env":
            raise ConfigError(f"--env-file {env_file} does not exist")
    values: dict[str, Any] = {}
    flags = flags or {}
    for setting in SETTINGS:
        for source, raw in (("a flag", flags.get(setting.attr)), ("the environment", environ.get(setting.env)),
                            (f"{env_file}", file_values.get(setting.env))):
            value = _cast(setting, raw, source)
            if value is not None:
                values[setting.attr] = value
                break
    if "vapi_phone_number_id" not in values:   # what provision imported (bypass mode needs it)
        provisioned = provisioned_phone_number_id(values.get("state_dir") or _BY_ATTR["state_dir"].default)
        if provisioned:
            values["vapi_phone_number_id"] = provisioned
    known = {f.name for f in fields(Settings)}
    return Settings(**{k: v for k, v in values.items() if k in known})


def provisioned_phone_number_id(state_dir: str | Path) -> str | None:
    """The Vapi phone-number id `twivapi provision` recorded (``<state dir>/provision.json``,
    ``vapi_phone_number.id``: the number it imported for bypass or native mode), or None."""
    import json
    try:
        data = json.loads((Path(state_dir) / "provision.json").read_text())
    except (OSError, ValueError):
        return None
    imported = data.get("vapi_phone_number") if isinstance(data, dict) else None
    found = imported.get("id") if isinstance(imported, dict) else None
    return found if isinstance(found, str) and found else None


def settings_table() -> list[tuple[str, str, str]]:
    """(variable, default, help) rows, for the README and `twivapi config`."""
    rows = []
    for s in SETTINGS:
        default = "" if s.default is None else str(s.default)
        rows.append((s.env, default, s.help))
    return rows


def output_columns() -> int | None:
    """``COLUMNS`` when it is set to a number: an output width the user chose (rich honours it too);
    the CLI then lays tables out at that width even when stdout is not a terminal."""
    value = os.environ.get("COLUMNS", "")
    return int(value) if value.isdigit() else None
