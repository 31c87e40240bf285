"""Twilio Media Streams, the protocol: its messages as types, one parser, one serializer.

This module owns the Media Streams wire format: the JSON shapes, their field names (``streamSid``,
``callSid``, ``customParameters``, ``mediaFormat``, ``sequenceNumber``... appear nowhere else), what
counts as a malformed message and why, and the http(s) -> ws(s) URL of a stream. The bridge, replay
and the simulated caller use it; none of them builds or reads the JSON by hand.

The protocol in brief (``shared/reference/twilio.md`` section 4). One WebSocket per stream, JSON
text frames only. Twilio -> server: ``connected`` first, then ``start`` once (stream, call and
account SIDs, tracks, the TwiML's ``<Parameter>``\\ s as ``customParameters``, and the media format,
always mu-law 8 kHz mono), then ``media`` (base64 raw mu-law, ``chunk`` and ``timestamp`` per
track, 20 ms frames at about 50 a second), ``dtmf``, ``mark`` (the echo of one of ours, when the
audio queued before it has played or was cleared) and ``stop``. Every message but ``connected``
carries a ``sequenceNumber`` (a string on the wire, counting from "1"). Server -> Twilio, on
bidirectional streams: ``media`` (just a payload, any size, played in order), ``mark`` (a name) and
``clear`` (drop the playback buffer; pending marks are echoed at once).

Why frozen dataclasses with slots and hand-written checks, not pydantic models: the bridge parses
about 50 of these per second per call and CPU per call-second is benchmarked. Almost every message
is a ``media`` frame; parsing one here costs about 5 us (``json.loads`` 2, the base64 decode 1, the
checks and the frozen dataclass the rest). A pydantic discriminated union validating the same JSON
is faster at that (about 2.5 us, measured with pydantic 2 on this machine), but the refusals and
their reasons, the base64 rules (exactly ``base64.b64decode(validate=True)``), what is read
liberally and the nesting limit would all have to be rebuilt from its errors and settings, for a
saving of ~0.1 ms of CPU per call-second. The types stay plain, immutable and cheap to compare.

``parse`` raises ``BadMessage`` (a ``ValueError``) with a short reason for anything malformed,
never anything else. It checks shapes only: whether a message fits the state of a call (``media``
before ``start``, a foreign ``streamSid``, a second ``start``) is for its caller to judge, and so is
a ``media`` frame of a track other than inbound (``Media.inbound``), which is not an error. Fields
nothing relies on are read liberally (a counter that is not one is ``None``, a number where text
belongs is its JSON text, a stop's body is optional), so a message whose audio is good is kept.
Absent optional fields parse as ``None`` and are left out again by ``serialize``, so
``parse(serialize(m)) == m`` for every message.
"""

from __future__ import annotations

import binascii
import ipaddress
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar
from urllib.parse import urlsplit

__all__ = [
    "MAX_PAYLOAD", "BadMessage", "Clear", "Connected", "Dtmf", "Mark", "Media", "MediaFormat", "Message", "Start",
    "Stop", "from_wire", "loopback", "media_frame", "numbered", "parse", "serialize", "stream_url_problems", "to_wire",
    "ws_url",
]

MAX_PAYLOAD = 16_000        # bytes of audio in one media message (2 s of mu-law) before it is called bad
MULAW = "audio/x-mulaw"
SAMPLE_RATE = 8000


class BadMessage(ValueError):
    """A message that is not Twilio Media Streams, or not well formed; ``reason`` says why, briefly."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Message:
    """What every message has: its ``event`` name, and (read-only) item access to its wire form,
    ``message["event"]``, for code written against the JSON dicts."""

    __slots__ = ()
    event: ClassVar[str]

    def __getitem__(self, key: str) -> Any:
        if key == "event":
            return self.event
        return to_wire(self)[key]   # type: ignore[arg-type]   # every subclass is a Message


@dataclass(frozen=True, slots=True)
class Connected(_Message):
    event: ClassVar[str] = "connected"
    protocol: str = "Call"
    version: str = "1.0.0"


@dataclass(frozen=True, slots=True)
class MediaFormat:
    encoding: str = MULAW
    sample_rate: int = SAMPLE_RATE
    channels: int = 1


@dataclass(frozen=True, slots=True)
class Start(_Message):
    """``call_sid`` is ``start.callSid``, else ``customParameters.callSid``; ``stream_sid`` is
    ``start.streamSid``, else the message's. (Not hashable: ``custom_parameters`` is a dict.)"""

    event: ClassVar[str] = "start"
    stream_sid: str
    call_sid: str
    account_sid: str = ""
    tracks: tuple[str, ...] = ("inbound",)
    custom_parameters: dict[str, str] = field(default_factory=dict)
    media_format: MediaFormat = MediaFormat()
    sequence_number: int | None = None


@dataclass(frozen=True, slots=True)
class Media(_Message):
    """``payload`` is the audio itself (base64-decoded). ``track``, ``chunk`` and ``timestamp``
    (ms since the stream started) come from Twilio; a server's frames have none of them."""

    event: ClassVar[str] = "media"
    stream_sid: str | None
    payload: bytes
    track: str | None = None
    chunk: int | None = None
    timestamp: int | None = None
    sequence_number: int | None = None

    @property
    def inbound(self) -> bool:
        """The caller's audio: the inbound track (a frame without a track is inbound)."""
        return self.track is None or self.track == "inbound"


@dataclass(frozen=True, slots=True)
class Mark(_Message):
    event: ClassVar[str] = "mark"
    stream_sid: str | None
    name: str
    sequence_number: int | None = None


@dataclass(frozen=True, slots=True)
class Dtmf(_Message):
    event: ClassVar[str] = "dtmf"
    stream_sid: str | None
    digit: str
    track: str | None = None        # Twilio sends "inbound_track"
    sequence_number: int | None = None


@dataclass(frozen=True, slots=True)
class Stop(_Message):
    event: ClassVar[str] = "stop"
    stream_sid: str | None
    call_sid: str = ""
    account_sid: str = ""
    sequence_number: int | None = None


@dataclass(frozen=True, slots=True)
class Clear(_Message):
    """Server -> Twilio only: empty the playback buffer."""

    event: ClassVar[str] = "clear"
    stream_sid: str | None


Message = Connected | Start | Media | Mark | Dtmf | Stop | Clear


# --- parsing ------------------------------------------------------------------------------------

def parse(text: str | bytes, max_payload: int | None = MAX_PAYLOAD) -> Message:
    """One WebSocket text frame -> its message, or ``BadMessage``. ``max_payload`` bounds a media
    payload in bytes (``None``: no bound, as Twilio accepts any size from a server)."""
    try:
        data = json.loads(text)
    except RecursionError:
        raise BadMessage("JSON nested too deep") from None
    except (ValueError, TypeError):
        raise BadMessage("invalid JSON") from None
    return from_wire(data, max_payload)


def from_wire(data: Any, max_payload: int | None = MAX_PAYLOAD) -> Message:
    """A decoded JSON value (a dict, to be valid) -> its message, or ``BadMessage``."""
    if not isinstance(data, dict):
        raise BadMessage("not a JSON object")
    event = data.get("event")
    if event is None:
        raise BadMessage("no event")
    if not isinstance(event, str):
        raise BadMessage("event is not a string")
    reader = _READERS.get(event)
    if reader is None:
        raise BadMessage(f"unknown event {event[:40]!r}")
    try:
        return reader(data, max_payload)
    except RecursionError:   # a value nested nearly as deep as json.loads allows, written out as text
        raise BadMessage("JSON nested too deep") from None


def _text(data: dict[str, Any], key: str, where: str, default: Any = None) -> Any:
    value = data.get(key)
    if value is None:
        return default
    if not isinstance(value, str):
        raise BadMessage(f"{where}{key} is not a string")
    return value


def _number(data: dict[str, Any], key: str, where: str) -> int | None:
    value = data.get(key)
    return None if value is None else _count(value, where + key)


def _count(value: Any, name: str) -> int:
    """Twilio's counters (``sequenceNumber``, ``chunk``, ``timestamp``): decimal strings; ints accepted."""
    if type(value) is str:
        if value.isdigit() and value.isascii():
            try:
                return int(value)
            except ValueError:   # past int()'s digit limit
                pass
    elif type(value) is int and value >= 0:
        return value
    raise BadMessage(f"{name} is not a number")


def _loose_count(value: Any) -> int | None:
    """A counter the bridge never relies on (``chunk``, ``timestamp``, ``sequenceNumber``): read
    when it is one, else None; a malformed one never makes its message bad (be liberal in what you
    accept: the audio in it is good)."""
    if type(value) is str and len(value) <= 18 and value.isdigit() and value.isascii():
        return int(value)   # the usual case, three times per media message: no try, no call
    try:
        return None if value is None else _count(value, "")
    except BadMessage:
        return None


def _loose_text(value: Any) -> str:
    """A field read as text whatever JSON it is (a mark name, a digit): what does not match what
    we sent or expect is simply not ours."""
    return value if type(value) is str else json.dumps(value)


def _body(data: dict[str, Any], key: str, required: bool = True) -> dict[str, Any]:
    body = data.get(key)
    if isinstance(body, dict):
        return body
    if body is not None:
        raise BadMessage(f"{key} is not an object")
    if required:
        raise BadMessage(f"{key} without a {key} object")
    return {}


def _read_connected(data: dict[str, Any], max_payload: int | None) -> Connected:
    return Connected(_text(data, "protocol", "", "Call"), _text(data, "version", "", "1.0.0"))


def _read_start(data: dict[str, Any], max_payload: int | None) -> Start:
    start = _body(data, "start")
    params = start.get("customParameters")
    params = {str(k): _loose_text(v) for k, v in params.items()} if isinstance(params, dict) else {}
    call_sid = _sid(start.get("callSid"), "start.callSid") or params.get("callSid")
    stream_sid = _sid(start.get("streamSid"), "start.streamSid") or _sid(data.get("streamSid"), "streamSid")
    if not call_sid or not stream_sid:
        raise BadMessage("start without callSid or streamSid")
    tracks = start.get("tracks")
    tracks = tuple(tracks) if isinstance(tracks, list) and all(type(t) is str for t in tracks) else ("inbound",)
    account = start.get("accountSid")
    return Start(stream_sid, call_sid, "" if account is None else _loose_text(account), tracks, params,
                 _media_format(start.get("mediaFormat")), _loose_count(data.get("sequenceNumber")))


def _sid(value: Any, name: str) -> str | None:
    """A SID as text; a number is text too (it will match no call), a list or object is malformed."""
    if value is None or type(value) is str:
        return value
    if isinstance(value, (int, float)):
        return _loose_text(value)
    raise BadMessage(f"{name} is not a string")


_DEFAULT_FORMAT = MediaFormat()


def _media_format(fmt: Any) -> MediaFormat:
    """Only mu-law at 8 kHz is supported (it is all Twilio sends); anything else is refused. The
    rate may be written as any number or numeric string that is 8000 as a whole number."""
    if not fmt:
        return _DEFAULT_FORMAT
    if isinstance(fmt, dict) and fmt.get("encoding") == MULAW:
        try:
            rate = int(fmt.get("sampleRate", SAMPLE_RATE))
        except (TypeError, ValueError, OverflowError):
            rate = 0
        if rate == SAMPLE_RATE:
            return _DEFAULT_FORMAT
    raise BadMessage(f"unsupported mediaFormat {str(fmt)[:80]}")


def _read_media(data: dict[str, Any], max_payload: int | None) -> Media:
    # the hot path (50 a second per call): the checks of _text/_number/_body, inlined
    media = data.get("media")
    if type(media) is not dict:
        media = _body(data, "media")
    encoded = media.get("payload")
    if type(encoded) is not str:
        raise BadMessage("media without payload" if encoded is None else "media payload is not a string")
    try:
        payload = binascii.a2b_base64(encoded, strict_mode=True)   # = base64.b64decode(validate=True)
    except (binascii.Error, ValueError):   # ValueError: not ASCII
        raise BadMessage("media payload is not base64") from None
    if not payload or (max_payload is not None and len(payload) > max_payload):
        raise BadMessage(f"media payload of {len(payload)} bytes")
    stream_sid, track = data.get("streamSid"), media.get("track")
    if stream_sid is not None and type(stream_sid) is not str:
        raise BadMessage("streamSid is not a string")
    if track is not None and type(track) is not str:
        track = str(track)   # not "inbound": another track's audio, ignored like any other
    return Media(stream_sid, payload, track, _loose_count(media.get("chunk")), _loose_count(media.get("timestamp")),
                 _loose_count(data.get("sequenceNumber")))


def _read_mark(data: dict[str, Any], max_payload: int | None) -> Mark:
    body = _body(data, "mark")
    if "name" not in body:
        raise BadMessage("mark without name")
    return Mark(_text(data, "streamSid", ""), _loose_text(body["name"]), _loose_count(data.get("sequenceNumber")))


def _read_dtmf(data: dict[str, Any], max_payload: int | None) -> Dtmf:
    dtmf = _body(data, "dtmf")
    if "digit" not in dtmf:
        raise BadMessage("dtmf without digit")
    track = dtmf.get("track")
    return Dtmf(_text(data, "streamSid", ""), _loose_text(dtmf["digit"]), None if track is None else _loose_text(track),
                _loose_count(data.get("sequenceNumber")))


def _read_stop(data: dict[str, Any], max_payload: int | None) -> Stop:
    stop = data.get("stop")
    stop = stop if isinstance(stop, dict) else {}   # nothing in it is needed: a stop is a stop
    call, account = stop.get("callSid"), stop.get("accountSid")
    return Stop(_text(data, "streamSid", ""), "" if call is None else _loose_text(call),
                "" if account is None else _loose_text(account), _loose_count(data.get("sequenceNumber")))


def _read_clear(data: dict[str, Any], max_payload: int | None) -> Clear:
    return Clear(_text(data, "streamSid", ""))


_READERS: dict[str, Callable[[dict[str, Any], int | None], Message]] = {
    "connected": _read_connected, "start": _read_start, "media": _read_media, "mark": _read_mark,
    "dtmf": _read_dtmf, "stop": _read_stop, "clear": _read_clear,
}


# --- serializing --------------------------------------------------------------------------------

def serialize(message: Message) -> str:
    """A message -> its compact JSON text frame (payloads base64-encoded)."""
    if type(message) is Media and message.track is None and message.chunk is None \
            and message.timestamp is None and message.sequence_number is None:
        return media_frame(message.stream_sid, message.payload)
    return json.dumps(to_wire(message), separators=(",", ":"))


_quote = json.encoder.encode_basestring_ascii   # C-accelerated, what json.dumps uses


def media_frame(stream_sid: str | None, payload: bytes) -> str:
    """The server's media message, fast (50 a second per call): the same text as
    ``serialize(Media(stream_sid, payload))``."""
    encoded = binascii.b2a_base64(payload, newline=False).decode("ascii")
    if stream_sid is None:
        return '{"event":"media","media":{"payload":"' + encoded + '"}}'
    return '{"event":"media","streamSid":' + _quote(stream_sid) + ',"media":{"payload":"' + encoded + '"}}'


def to_wire(message: Message) -> dict[str, Any]:
    """A message -> the JSON object Twilio sends or expects (a fresh dict)."""
    wire: dict[str, Any] = {"event": message.event}
    sequence = getattr(message, "sequence_number", None)
    if sequence is not None:
        wire["sequenceNumber"] = str(sequence)
    if isinstance(message, Connected):
        wire["protocol"], wire["version"] = message.protocol, message.version
        return wire
    if isinstance(message, Start):
        fmt = message.media_format
        wire["streamSid"] = message.stream_sid
        wire["start"] = {"accountSid": message.account_sid, "streamSid": message.stream_sid,
                         "callSid": message.call_sid, "tracks": list(message.tracks),
                         "customParameters": dict(message.custom_parameters),
                         "mediaFormat": {"encoding": fmt.encoding, "sampleRate": fmt.sample_rate,
                                         "channels": fmt.channels}}
        return wire
    if message.stream_sid is not None:
        wire["streamSid"] = message.stream_sid
    if isinstance(message, Media):
        media: dict[str, Any] = {}
        if message.track is not None:
            media["track"] = message.track
        if message.chunk is not None:
            media["chunk"] = str(message.chunk)
        if message.timestamp is not None:
            media["timestamp"] = str(message.timestamp)
        media["payload"] = binascii.b2a_base64(message.payload, newline=False).decode("ascii")
        wire["media"] = media
    elif isinstance(message, Mark):
        wire["mark"] = {"name": message.name}
    elif isinstance(message, Dtmf):
        wire["dtmf"] = {"digit": message.digit} if message.track is None else \
            {"track": message.track, "digit": message.digit}
    elif isinstance(message, Stop):
        wire["stop"] = {"accountSid": message.account_sid, "callSid": message.call_sid}
    return wire


def numbered(message: Message, sequence_number: int) -> Message:
    """The message as Twilio sends it, with its ``sequenceNumber``: every message but ``connected``
    (and the server's ``clear``, which Twilio never sends) carries one."""
    if isinstance(message, (Connected, Clear)):
        return message
    return replace(message, sequence_number=sequence_number)


# --- the stream's URL ---------------------------------------------------------------------------

def ws_url(http_url: str) -> str:
    """http://host -> ws://host, https://host -> wss://host. Only the scheme changes (a host such as
    ngrok's http-8080-....app keeps its name); a ws(s):// URL, or anything that is not http(s), is
    returned as it is."""
    scheme, sep, rest = http_url.partition("://")
    if sep:
        lowered = scheme.lower()
        if lowered == "https":
            return "wss://" + rest
        if lowered == "http":
            return "ws://" + rest
    return http_url


TWILIO_STREAM_PORT = 443   # Twilio opens media streams to wss:// on this port only (errors 31910, 31922)


def loopback(host: str | None) -> bool:
    """Whether ``host`` is this machine only (``localhost``, 127.0.0.0/8, ``::1``): local work with
    the simulators, which Twilio never reaches anyway."""
    if not host:
        return False
    host = host.strip("[]").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def stream_url_problems(base_url: str) -> tuple[str | None, str | None]:
    """(error, warning) for ``base_url`` as the base of the stream URL Twilio is told to open.

    Twilio opens media streams only to ``wss://`` on port 443 (errors 31910, 31922): an ``http://``
    base gives a ``ws://`` stream URL it refuses, so every call fails (an error, unless the host is
    loopback: local work with the simulators); an ``https://`` base on another port is a warning."""
    parts = urlsplit(base_url)
    try:
        port = parts.port
    except ValueError:   # not a port: nothing Twilio could open either
        port = None
    if parts.scheme.lower() != "https":
        if loopback(parts.hostname):
            return None, None
        return (f"{base_url} is not https://, so the media stream URL would start {ws_url(base_url)}, and Twilio "
                f"opens media streams only to wss:// on port {TWILIO_STREAM_PORT} (errors 31910, 31922): "
                "every call would fail"), None
    if port is not None and port != TWILIO_STREAM_PORT:
        return None, (f"{base_url} is on port {port}: Twilio opens media streams only to wss:// on port "
                      f"{TWILIO_STREAM_PORT} (errors 31910, 31922); put the bridge behind a URL on port 443 "
                      "(a tunnel or a proxy)")
    return None, None
