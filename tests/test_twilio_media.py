"""twilio_media: the Media Streams messages, their parser and serializer, and the stream URL."""

from __future__ import annotations

import base64
import dataclasses
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twivapi_cli import twilio_media as tm
from twivapi_cli.twilio_media import (
    MAX_PAYLOAD,
    BadMessage,
    Clear,
    Connected,
    Dtmf,
    Mark,
    Media,
    MediaFormat,
    Start,
    Stop,
    parse,
    serialize,
)

SID = "MZ" + "a" * 32
CALL = "CA" + "b" * 32
ACCOUNT = "AC" + "c" * 32
FRAME = bytes(range(160))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def dumps(value) -> str:
    return json.dumps(value)


# --- round trips ------------------------------------------------------------------------------------

MESSAGES = [
    Connected(),
    Connected("Call", "2.0.0"),
    Start(SID, CALL, ACCOUNT, ("inbound",), {"callSid": CALL, "token": "t0k"}, MediaFormat(), 1),
    Start(SID, CALL),
    Start(SID, CALL, tracks=("inbound", "outbound"), custom_parameters={"a": "é \" \\ </x>"}),
    Media(SID, FRAME, "inbound", 1, 20, 2),
    Media(SID, FRAME),                               # a server's frame: a payload and nothing else
    Media(None, b"\xff"),
    Media(SID, b"\x00" * MAX_PAYLOAD, "outbound", 7, 140),
    Mark(SID, "0:120", 3),
    Mark(SID, ""),
    Mark(None, "utt-42 \u2603"),
    Dtmf(SID, "5", "inbound_track", 4),
    Dtmf(None, "#"),
    Stop(SID, CALL, ACCOUNT, 5),
    Stop(SID),
    Stop(None),
    Clear(SID),
    Clear(None),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: f"{type(m).__name__}")
def test_every_message_round_trips(message):
    text = serialize(message)
    assert parse(text) == message
    assert parse(text.encode()) == message
    assert json.loads(text)["event"] == message.event
    assert ", " not in text and '": ' not in text     # compact


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: f"{type(m).__name__}")
def test_wire_form_is_what_serialize_writes(message):
    assert json.loads(serialize(message)) == tm.to_wire(message)
    assert tm.from_wire(tm.to_wire(message)) == message
    assert message["event"] == message.event           # item access to the wire form, for dict-era code


def test_twilios_own_messages_parse():
    """The examples of shared/reference/twilio.md section 4.2, as Twilio sends them."""
    payload = b64(b"\x7f" * 160)
    assert parse('{"event": "connected", "protocol": "Call", "version": "1.0.0"}') == Connected()
    start = parse(dumps({"event": "start", "sequenceNumber": "1", "start": {
        "accountSid": ACCOUNT, "streamSid": SID, "callSid": CALL, "tracks": ["inbound"],
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        "customParameters": {"FirstName": "Jane", "LastName": "Doe"}}, "streamSid": SID}))
    assert start == Start(SID, CALL, ACCOUNT, ("inbound",), {"FirstName": "Jane", "LastName": "Doe"},
                          MediaFormat("audio/x-mulaw", 8000, 1), 1)
    media = parse(dumps({"event": "media", "sequenceNumber": "4", "media": {
        "track": "inbound", "chunk": "2", "timestamp": "5", "payload": payload}, "streamSid": SID}))
    assert media == Media(SID, b"\x7f" * 160, "inbound", 2, 5, 4) and media.inbound
    assert parse(dumps({"event": "dtmf", "streamSid": SID, "sequenceNumber": "5",
                        "dtmf": {"track": "inbound_track", "digit": "1"}})) == Dtmf(SID, "1", "inbound_track", 5)
    assert parse(dumps({"event": "mark", "sequenceNumber": "4", "streamSid": SID,
                        "mark": {"name": "my label"}})) == Mark(SID, "my label", 4)
    assert parse(dumps({"event": "stop", "sequenceNumber": "5", "stop": {"accountSid": ACCOUNT, "callSid": CALL},
                        "streamSid": SID})) == Stop(SID, CALL, ACCOUNT, 5)


def test_server_messages_are_exactly_twilios_shapes():
    """Section 4.3: what a server sends. A server's media frame has the payload only."""
    assert json.loads(serialize(Media(SID, FRAME))) == {"event": "media", "streamSid": SID,
                                                        "media": {"payload": b64(FRAME)}}
    assert json.loads(serialize(Mark(SID, "utt-42"))) == {"event": "mark", "streamSid": SID,
                                                          "mark": {"name": "utt-42"}}
    assert json.loads(serialize(Clear(SID))) == {"event": "clear", "streamSid": SID}


@pytest.mark.parametrize("stream_sid", [SID, None, 'MZ"\\\n\u00e9'])
@pytest.mark.parametrize("payload", [FRAME, b"\xff", bytes(range(256)) * 3])
def test_media_frame_is_serialize_of_a_server_media(stream_sid, payload):
    fast = tm.media_frame(stream_sid, payload)
    assert fast == serialize(Media(stream_sid, payload))
    assert fast == json.dumps(tm.to_wire(Media(stream_sid, payload)), separators=(",", ":"))
    assert parse(fast) == Media(stream_sid, payload)


@pytest.mark.parametrize(("chunk", "read"), [
    ("0", 0), ("7", 7), ("9" * 18, int("9" * 18)), ("9" * 40, int("9" * 40)),   # past the fast path: still read
    ("\u0663", None), ("", None), ("+1", None), (" 1", None), ("1.5", None), (3, 3), (-3, None), (True, None),
])
def test_counters_read_the_same_on_and_off_the_fast_path(chunk, read):
    text = dumps({"event": "media", "streamSid": SID, "media": {"chunk": chunk, "payload": b64(FRAME)}})
    assert parse(text) == Media(SID, FRAME, chunk=read)


def test_numbered_adds_the_sequence_number_where_twilio_sends_one():
    assert tm.numbered(Media(SID, FRAME), 9) == Media(SID, FRAME, sequence_number=9)
    assert tm.numbered(Start(SID, CALL), 1).sequence_number == 1
    assert tm.numbered(Stop(SID), 3).sequence_number == 3
    assert tm.numbered(Connected(), 1) == Connected()   # connected carries none
    assert tm.numbered(Clear(SID), 1) == Clear(SID)
    assert json.loads(serialize(tm.numbered(Mark(SID, "m"), 12)))["sequenceNumber"] == "12"   # a string


def test_messages_are_small_frozen_values():
    media = Media(SID, FRAME)
    with pytest.raises(dataclasses.FrozenInstanceError):
        media.payload = b""   # type: ignore[misc]
    assert not hasattr(media, "__dict__")   # slots
    assert hash(media) == hash(Media(SID, FRAME))
    assert BadMessage("x").reason == "x" and issubclass(BadMessage, ValueError)


def test_what_is_not_an_error():
    # a track other than inbound is not the caller's audio, but not malformed either
    outbound = parse(dumps({"event": "media", "streamSid": SID, "media": {"track": "outbound", "payload": b64(FRAME)}}))
    assert isinstance(outbound, Media) and not outbound.inbound
    assert parse(dumps({"event": "media", "media": {"payload": b64(FRAME)}})) == Media(None, FRAME)   # no streamSid
    # the call SID may come from the TwiML's <Parameter name="callSid">, the stream SID from the message
    start = parse(dumps({"event": "start", "streamSid": SID, "start": {"customParameters": {"callSid": CALL}}}))
    assert isinstance(start, Start) and (start.stream_sid, start.call_sid) == (SID, CALL)
    assert start.media_format == MediaFormat() and start.tracks == ("inbound",)
    for fmt in ({}, None, {"encoding": "audio/x-mulaw"}, {"encoding": "audio/x-mulaw", "sampleRate": 8000.0}):
        assert isinstance(parse(dumps({"event": "start", "start": {"callSid": CALL, "streamSid": SID,
                                                                   "mediaFormat": fmt}})), Start)
    assert parse(dumps({"event": "stop", "streamSid": SID})) == Stop(SID)   # no stop object
    assert parse('{"event": "stop", "stop": null}') == Stop(None)
    # excess padding after a whole quantum decodes, as base64.b64decode(validate=True) does
    assert parse(dumps({"event": "media", "media": {"payload": "AAAA===="}})) == Media(None, b"\x00\x00\x00")
    assert parse(dumps({"event": "mark", "mark": {"name": "0:" + "9" * 5000}})).name == "0:" + "9" * 5000
    assert parse(dumps({"event": "media", "media": {"payload": b64(FRAME), "chunk": 3, "timestamp": 60}})) \
        == Media(None, FRAME, chunk=3, timestamp=60)   # numbers where Twilio sends strings: accepted


def test_payload_bounds():
    at_limit = dumps({"event": "media", "media": {"payload": b64(b"\x01" * MAX_PAYLOAD)}})
    over = dumps({"event": "media", "media": {"payload": b64(b"\x01" * (MAX_PAYLOAD + 1))}})
    assert len(parse(at_limit).payload) == MAX_PAYLOAD
    with pytest.raises(BadMessage, match=f"^media payload of {MAX_PAYLOAD + 1} bytes$"):
        parse(over)
    with pytest.raises(BadMessage, match="^media payload of 160 bytes$"):
        parse(serialize(Media(SID, FRAME)), max_payload=159)
    assert len(parse(over, max_payload=None).payload) == MAX_PAYLOAD + 1       # no bound
    with pytest.raises(BadMessage, match="^media payload of 0 bytes$"):
        parse(dumps({"event": "media", "media": {"payload": ""}}), max_payload=None)   # empty is always bad


# --- refusals ------------------------------------------------------------------------------------------

def start_with(**start) -> str:
    body = {"callSid": CALL, "streamSid": SID}
    body.update(start)
    return dumps({"event": "start", "start": {k: v for k, v in body.items() if v is not ...}})


def media_with(**media) -> str:
    body = {"payload": b64(FRAME)}
    body.update(media)
    return dumps({"event": "media", "streamSid": SID, "media": {k: v for k, v in body.items() if v is not ...}})


REFUSED = [
    # the frame
    ("", "invalid JSON"),
    ("not json", "invalid JSON"),
    ('{"event": "media"', "invalid JSON"),
    (b"\xff\xfe\xfa", "invalid JSON"),
    ("[" * 100_000 + "]" * 100_000, "JSON nested too deep"),
    ('{"a":' * 100_000 + "1" + "}" * 100_000, "JSON nested too deep"),
    ("[]", "not a JSON object"),
    ('"media"', "not a JSON object"),
    ("null", "not a JSON object"),
    ("NaN", "not a JSON object"),
    ("{}", "no event"),
    ('{"event": null, "media": {}}', "no event"),
    ('{"event": 1}', "event is not a string"),
    ('{"event": ["media"]}', "event is not a string"),
    ('{"event": "hello"}', "unknown event 'hello'"),
    ('{"event": "' + "x" * 100 + '"}', "unknown event '" + "x" * 40 + "'"),
    ('{"event": "Media"}', "unknown event 'Media'"),
    ('{"event": "media", "streamSid": 0, "media": {"payload": "/w=="}}', "streamSid is not a string"),
    ('{"event": "mark", "streamSid": ["MZ"], "mark": {"name": "m"}}', "streamSid is not a string"),
    ('{"event": "clear", "streamSid": {}}', "streamSid is not a string"),
    ('{"event": "connected", "protocol": 1}', "protocol is not a string"),
    ('{"event": "connected", "version": 1.0}', "version is not a string"),
    # start
    ('{"event": "start"}', "start without a start object"),
    ('{"event": "start", "start": "MZ"}', "start is not an object"),
    ('{"event": "start", "start": [1]}', "start is not an object"),
    (start_with(callSid=..., streamSid=...), "start without callSid or streamSid"),
    (start_with(callSid=...), "start without callSid or streamSid"),
    (start_with(callSid=""), "start without callSid or streamSid"),
    (start_with(streamSid=...), "start without callSid or streamSid"),
    (start_with(callSid=..., customParameters={"other": "x"}), "start without callSid or streamSid"),
    (start_with(streamSid=["MZ"]), "start.streamSid is not a string"),
    (start_with(mediaFormat={"encoding": "audio/x-l16", "sampleRate": 16000}),
     "unsupported mediaFormat {'encoding': 'audio/x-l16', 'sampleRate': 16000}"),
    (start_with(mediaFormat={"encoding": "audio/x-mulaw", "sampleRate": 16000}),
     "unsupported mediaFormat {'encoding': 'audio/x-mulaw', 'sampleRate': 16000}"),
    (start_with(mediaFormat={"encoding": "audio/x-mulaw", "sampleRate": "8k"}),
     "unsupported mediaFormat {'encoding': 'audio/x-mulaw', 'sampleRate': '8k'}"),
    (start_with(mediaFormat={"encoding": "audio/x-mulaw", "sampleRate": [8000]}),
     "unsupported mediaFormat {'encoding': 'audio/x-mulaw', 'sampleRate': [8000]}"),
    (start_with(mediaFormat={"encoding": "audio/x-mulaw", "sampleRate": True}),
     "unsupported mediaFormat {'encoding': 'audio/x-mulaw', 'sampleRate': True}"),
    (start_with(mediaFormat={"sampleRate": 8000}), "unsupported mediaFormat {'sampleRate': 8000}"),
    (start_with(mediaFormat={"encoding": None}), "unsupported mediaFormat {'encoding': None}"),
    (start_with(mediaFormat="audio/x-mulaw"), "unsupported mediaFormat audio/x-mulaw"),
    (start_with(mediaFormat=[1]), "unsupported mediaFormat [1]"),
    (start_with(mediaFormat={"encoding": "audio/x-mulaw", "sampleRate": float("inf")}),   # Infinity
     "unsupported mediaFormat {'encoding': 'audio/x-mulaw', 'sampleRate': inf}"),
    (start_with(mediaFormat={"encoding": "audio/x-mulaw", "sampleRate": float("nan")}),   # NaN
     "unsupported mediaFormat {'encoding': 'audio/x-mulaw', 'sampleRate': nan}"),
    # media
    ('{"event": "media", "streamSid": "MZ1"}', "media without a media object"),
    ('{"event": "media", "media": null}', "media without a media object"),
    ('{"event": "media", "media": "/w=="}', "media is not an object"),
    ('{"event": "media", "media": 3}', "media is not an object"),
    (media_with(payload=...), "media without payload"),
    (media_with(payload=None), "media without payload"),
    (media_with(payload=5), "media payload is not a string"),
    (media_with(payload=[255]), "media payload is not a string"),
    (media_with(payload=""), "media payload of 0 bytes"),
    (media_with(payload="!!!!"), "media payload is not base64"),
    (media_with(payload=b64(FRAME)[:-1]), "media payload is not base64"),
    (media_with(payload=b64(FRAME) + "A"), "media payload is not base64"),
    (media_with(payload=b64(FRAME)[:8] + "\n" + b64(FRAME)[8:]), "media payload is not base64"),
    (media_with(payload=b64(FRAME).replace("+", "-")), "media payload is not base64"),
    (media_with(payload="é" + b64(FRAME)), "media payload is not base64"),
    # mark, dtmf, stop
    ('{"event": "mark", "streamSid": "MZ1"}', "mark without a mark object"),
    ('{"event": "mark", "mark": "m"}', "mark is not an object"),
    ('{"event": "mark", "mark": {}}', "mark without name"),
    ('{"event": "dtmf", "dtmf": []}', "dtmf is not an object"),
    ('{"event": "dtmf", "dtmf": {"track": "inbound_track"}}', "dtmf without digit"),
]


def test_a_deeply_nested_value_refused_from_deep_in_the_stack_is_still_bad():
    """A value nested nearly as deep as json.loads allows is shown in the reason: from any stack depth,
    that is a BadMessage, never a RecursionError."""
    def deep(levels: int, text: str) -> BaseException | None:
        if levels:
            return deep(levels - 1, text)
        try:
            parse(text)
        except BadMessage:
            return None
        except BaseException as exc:   # noqa: BLE001 - what escaped is the finding
            return exc
        return None
    for where in ("mediaFormat", "customParameters", "accountSid"):
        for depth in range(900, 1000, 3):
            nested = "[" * depth + "]" * depth
            text = start_with()[:-2] + f', "{where}": ' + (f'{{"a": {nested}}}' if where == "customParameters"
                                                            else nested) + "}}"
            for levels in (0, 7, 21, 35):
                assert deep(levels, text) is None
    for depth in range(900, 1000, 3):
        for levels in (0, 7, 21, 35):
            assert deep(levels, '{"event": "mark", "mark": {"name": ' + "[" * depth + "]" * depth + "}}") is None


# Liberal where nothing relies on the field (the bridge keeps such a message, its audio is good): a
# counter that is not one reads as None, a scalar where text belongs reads as its JSON text (a
# number SID matches no call, a number mark name no mark of ours), a stop's body is not needed.
TOLERATED = [
    ('{"event": "mark", "sequenceNumber": "x1", "mark": {"name": "m"}}', Mark(None, "m")),
    ('{"event": "mark", "sequenceNumber": -1, "mark": {"name": "m"}}', Mark(None, "m")),
    ('{"event": "mark", "sequenceNumber": true, "mark": {"name": "m"}}', Mark(None, "m")),
    ('{"event": "stop", "sequenceNumber": "\u0661", "stop": {}}', Stop(None)),
    (start_with(callSid=5), Start(SID, "5")),
    (start_with(accountSid=1), Start(SID, CALL, "1")),
    (start_with(customParameters=[["callSid", CALL]]), Start(SID, CALL)),
    (start_with(callSid=..., customParameters={"callSid": 5}), Start(SID, "5", custom_parameters={"callSid": "5"})),
    (start_with(tracks="inbound"), Start(SID, CALL)),
    (start_with(tracks=[1]), Start(SID, CALL)),
    (start_with(mediaFormat={"encoding": "audio/x-mulaw", "sampleRate": "8000"}), Start(SID, CALL)),
    (media_with(track=1), Media(SID, FRAME, "1")),
    (media_with(chunk="one"), Media(SID, FRAME)),
    (media_with(chunk=1.5), Media(SID, FRAME)),
    (media_with(timestamp="-5"), Media(SID, FRAME)),
    (media_with(timestamp="1" * 5000), Media(SID, FRAME)),   # past int()'s digit limit
    ('{"event": "mark", "mark": {"name": 5}}', Mark(None, "5")),
    ('{"event": "mark", "mark": {"name": ["0:20"]}}', Mark(None, '["0:20"]')),
    ('{"event": "dtmf", "dtmf": {"digit": 5}}', Dtmf(None, "5")),
    ('{"event": "dtmf", "dtmf": {"digit": "5", "track": 0}}', Dtmf(None, "5", "0")),
    ('{"event": "stop", "stop": "now"}', Stop(None)),
    ('{"event": "stop", "stop": {"callSid": 1}}', Stop(None, "1")),
    ('{"event": "stop", "stop": {"accountSid": []}}', Stop(None, account_sid="[]")),
]


@pytest.mark.parametrize(("text", "message"), TOLERATED, ids=[t[:60] for t, _ in TOLERATED])
def test_fields_nothing_relies_on_are_read_liberally(text, message):
    assert parse(text) == message
    assert parse(serialize(message)) == message


@pytest.mark.parametrize(("text", "reason"), REFUSED, ids=[r for _, r in REFUSED])
def test_refusals_say_why(text, reason):
    with pytest.raises(BadMessage) as refused:
        parse(text)
    assert refused.value.reason == reason
    assert str(refused.value) == reason


# --- parse raises nothing but BadMessage ----------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12)

VALID_WIRE = [tm.to_wire(message) for message in MESSAGES]


def parse_or_refuse(text: str | bytes):
    try:
        message = parse(text)
    except BadMessage as exc:
        assert exc.reason and isinstance(exc.reason, str) and len(exc.reason) < 200
        return None
    assert parse(serialize(message)) == message   # whatever is accepted round-trips
    return message


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300) | st.binary(max_size=300))
def test_arbitrary_text_is_a_message_or_bad(text):
    parse_or_refuse(text)


@settings(max_examples=300, deadline=None)
@given(json_values, st.sampled_from(sorted(tm._READERS)) | st.none())
def test_arbitrary_json_is_a_message_or_bad(value, event):
    if event is not None and isinstance(value, dict):
        value["event"] = event
    parse_or_refuse(json.dumps(value))


@st.composite
def mutated(draw):
    """A valid message with one value, at any depth, replaced by arbitrary JSON, or removed."""
    wire = json.loads(json.dumps(draw(st.sampled_from(VALID_WIRE))))
    container = wire
    while True:
        key = draw(st.sampled_from(sorted(container)))
        if isinstance(container[key], dict) and container[key] and draw(st.booleans()):
            container = container[key]
            continue
        break
    if draw(st.booleans()):
        del container[key]
    else:
        container[key] = draw(json_values)
    return json.dumps(wire)


@settings(max_examples=500, deadline=None)
@given(mutated())
def test_mutated_messages_are_messages_or_bad(text):
    parse_or_refuse(text)


# --- the stream's URL -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("http_url", "ws"), [
    ("https://bridge.example.com", "wss://bridge.example.com"),
    ("https://bridge.example.com/twilio/media?x=https://y", "wss://bridge.example.com/twilio/media?x=https://y"),
    ("http://127.0.0.1:8080", "ws://127.0.0.1:8080"),
    ("http://[::1]:8080/twilio/media", "ws://[::1]:8080/twilio/media"),
    ("https://http-8080-abc.ngrok.app", "wss://http-8080-abc.ngrok.app"),   # the host keeps its name
    ("http://https.example.com/http", "ws://https.example.com/http"),
    ("HTTPS://Bridge.example.com", "wss://Bridge.example.com"),            # schemes are case-insensitive
    ("wss://bridge.example.com", "wss://bridge.example.com"),              # already a WebSocket URL
    ("ws://127.0.0.1:8080", "ws://127.0.0.1:8080"),
    ("ftp://example.com", "ftp://example.com"),                            # not http(s): as it is
    ("bridge.example.com", "bridge.example.com"),
    ("", ""),
])
def test_ws_url_changes_only_the_scheme(http_url, ws):
    assert tm.ws_url(http_url) == ws


def test_wire_names_appear_only_in_the_codec():
    """Outside twilio_media.py (and bridge/, which is yet to adopt it) no module spells the wire format."""
    package = Path(tm.__file__).parent
    wire_names = ("streamSid", "sequenceNumber", "customParameters", "mediaFormat")
    offenders = [str(path.relative_to(package)) for path in package.rglob("*.py")
                 if path.name != "twilio_media.py" and path.parent.name != "bridge"
                 and any(name in path.read_text() for name in wire_names)]
    assert offenders == []
