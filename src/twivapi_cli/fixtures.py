"""Replay fixtures: the file format (pydantic models, published as JSON Schema), loading with errors
that name the file, the step and the field, and ``{{variable}}`` templating.

A fixture is a named scenario of timed steps; each step is one of:

    {"twilio": "voice" | "status" | "after-stream" | "stream-status", "params": {...}}
    {"vapi": {"type": "...", ...message fields...}}
    {"media": "open" | "audio" | "dtmf" | "mark" | "stop" | "wait", ...}

plus, on any step: ``at_ms`` (from the scenario start) or ``after_ms`` (after the previous step),
``repeat``, ``expect`` and ``capture``. See the README's "Replaying scenarios" for every field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import FixtureError

TWILIO_WEBHOOKS = {"voice": "/twilio/voice", "status": "/twilio/status", "after-stream": "/twilio/after-stream",
                   "stream-status": "/twilio/stream-status"}
VAPI_AUTH = ("secret", "bearer", "hmac", "none", "wrong")
SIGNATURES = ("valid", "none", "wrong-token", "wrong-url")
VARIABLE = re.compile(r"\{\{\s*([A-Za-z0-9_.\-]+)\s*\}\}")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MediaExpect(Strict):
    clear_within_ms: float | None = Field(default=None, description="a clear must arrive within this many ms of the step")
    no_clear: bool | None = Field(default=None, description="no clear may arrive during the step")
    quiet_after_clear_ms: float | None = Field(
        default=None, description="no media for this long after a clear (stale audio of the interrupted turn)")
    min_audio_ms: float | None = Field(default=None, description="at least this much assistant audio heard so far")
    marks_echoed: bool | None = Field(default=None, description="every mark the server sent was played and echoed")
    closed: bool | None = Field(default=None, description="the server closed the socket by the end of the step")


class Expect(Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    status: int | list[int] | None = Field(default=None, description="HTTP status (or any of a list)")
    content_type: str | None = Field(default=None, description="the response's content type starts with this")
    twiml: dict[str, Any] | None = Field(
        default=None, description='XPath (ElementTree syntax, from <Response>) -> expected text/attribute, or true for exists;'
                          ' e.g. {"Connect/Stream/@url": "wss://host/twilio/media"}')
    json_paths: dict[str, Any] | None = Field(
        default=None, alias="json", description='JSON path like "results.0.result" -> expected value, or true for exists')
    max_ms: float | None = Field(default=None, description="latency budget for the step")
    media: MediaExpect | None = None


class Step(Strict):
    twilio: Literal["voice", "status", "after-stream", "stream-status"] | None = None
    vapi: dict[str, Any] | None = Field(default=None, description="a Vapi server message (goes inside {\"message\": ...})")
    media: Literal["open", "audio", "dtmf", "mark", "stop", "wait"] | None = None

    at_ms: float | None = Field(default=None, ge=0, description="when, from the scenario start")
    after_ms: float | None = Field(default=None, ge=0, description="when, after the previous step")
    repeat: int = Field(default=1, ge=1, le=1000, description="send the step this many times")
    name: str | None = None

    # twilio
    params: dict[str, str] = Field(default_factory=dict, description="form parameters (over realistic defaults)")
    path: str | None = Field(default=None, description="override the webhook path")
    json_body: bool = Field(default=False, description="send JSON, signed through bodySHA256")
    signature: Literal["valid", "none", "wrong-token", "wrong-url"] = "valid"
    idempotency_token: str | None = Field(default=None, description="reuse a token to replay a retry")
    headers: dict[str, str] = Field(default_factory=dict)
    # vapi
    auth: Literal["secret", "bearer", "hmac", "none", "wrong"] = "secret"
    # media
    url: str | None = Field(default=None, description="media open: the socket URL (default: the TwiML's Stream url)")
    tone_hz: float | None = Field(default=None, gt=0, lt=4000, description="media audio: a tone; omit for silence")
    file: str | None = Field(default=None, description="media audio: a WAV file (8 kHz mono, PCM16 or mu-law)")
    ms: float = Field(default=0, ge=0, le=600_000, description="media audio/wait: duration")
    settle_ms: float = Field(
        default=5000, ge=0, le=60_000,
        description="media wait: how much longer to wait, after ms, for audio, marks or a close still expected"
                    " (a loaded machine's lag); what must not happen is checked over the whole wait")
    amplitude: float = Field(default=0.5, gt=0, le=1)
    background: bool = Field(default=False, description="media audio: stream it in the background while the next "
                                                        "steps go on at their own times (a recorded call's audio); "
                                                        "a media stop waits for it to end")
    digit: str | None = Field(default=None, pattern=r"^[0-9*#A-D]$")
    mark: str | None = None

    expect: Expect = Field(default_factory=Expect)
    capture: dict[str, str] = Field(
        default_factory=dict, description='variable -> "twiml:XPATH", "json:PATH", "header:Name" or "status"')

    @model_validator(mode="after")
    def one_kind(self) -> Step:
        kinds = [k for k in ("twilio", "vapi", "media") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("a step is exactly one of: twilio, vapi, media")
        if self.at_ms is not None and self.after_ms is not None:
            raise ValueError("give at_ms or after_ms, not both")
        if self.vapi is not None and not isinstance(self.vapi.get("type"), str):
            raise ValueError("vapi: the message needs a string 'type'")
        if self.media == "audio" and self.file is None and self.ms <= 0:
            raise ValueError("media audio: give ms (and tone_hz for a tone) or a file")
        if self.media == "dtmf" and not self.digit:
            raise ValueError("media dtmf: give digit")
        return self

    @property
    def kind(self) -> str:
        return "twilio" if self.twilio else "vapi" if self.vapi is not None else "media"


class AssistantRequirements(Strict):
    greeting_ms: float | None = Field(
        default=None, gt=0, le=600_000,
        description="the assistant's first message lasts at least this long (ms of audio); a shorter one is "
                    "reported as this requirement not met, not as a bridge fault")


class Requirements(Strict):
    assistant: AssistantRequirements = Field(
        default_factory=AssistantRequirements,
        description="what the assistant behind the target must do for the expectations to hold")


class Fixture(Strict):
    name: str
    description: str = ""
    mode: Literal["stream", "bypass", "native"] = Field(default="stream", description="the bridge mode it expects")
    assistant: dict[str, Any] = Field(default_factory=dict,
                                      description="--in-process: the simulated assistant's behaviour")
    requires: Requirements = Field(
        default_factory=Requirements,
        description='what the fixture needs of the assistant behind the target, e.g. {"assistant": {"greeting_ms": '
                    '1500}}; --in-process shapes the simulated one to meet it')
    vars: dict[str, str] = Field(default_factory=dict)
    steps: list[Step] = Field(min_length=1)

    @model_validator(mode="after")
    def consistent_requirements(self) -> Fixture:
        wanted, given = self.requires.assistant.greeting_ms, self.assistant.get("greeting_ms")
        if wanted is not None and isinstance(given, (int, float)) and given < wanted:
            raise ValueError(f"assistant.greeting_ms ({given:g}) is shorter than requires.assistant.greeting_ms "
                             f"({wanted:g}): the simulated assistant would not meet the fixture's own requirement")
        return self


# --- what a fixture needs of the assistant -----------------------------------------------------------
# A fixture's audio expectations can depend on the assistant (how long it greets), not only on the
# bridge. ``requires`` says so; ``simulator_script`` shapes --in-process's simulated assistant to
# meet it, and ``explain_requirements`` turns a shortfall the assistant caused into a message that
# names the requirement instead of blaming the bridge.

DEFAULT_SIMULATOR = {"greeting_ms": 2000, "reply_ms": 500}
TURN_OVER_MS = 400   # no assistant audio for this long, every mark played: the utterance had ended


def describe_requirements(fixture: Fixture) -> str | None:
    """``requires`` in words (``fixtures validate`` prints it), or None when the fixture needs nothing."""
    greeting = fixture.requires.assistant.greeting_ms
    return None if greeting is None else f"needs an assistant whose greeting lasts at least {greeting:g} ms"


def simulator_script(fixture: Fixture) -> dict[str, Any]:
    """The simulated assistant's ``metadata.simulator`` for --in-process: the defaults, the fixture's
    ``assistant`` block over them, and a greeting at least as long as ``requires`` asks."""
    script = {**DEFAULT_SIMULATOR, **fixture.assistant}
    wanted = fixture.requires.assistant.greeting_ms
    if wanted is not None and float(script.get("greeting_ms") or 0) < wanted:
        script["greeting_ms"] = int(wanted + 0.999)
    return script


def explain_requirements(fixture: Fixture, step: Step, media: Any, problems: list[str],
                         now: float | None = None) -> list[str]:
    """A media step's problems, with a ``min_audio_ms`` shortfall the assistant caused restated as the
    fixture's ``requires.assistant.greeting_ms`` not met.

    ``media`` is replay's MediaSession (``result.heard`` / ``result.received``: the mu-law bytes
    played at the caller / received, ``media_times``: arrival of each frame, ``marks_sent`` /
    ``result.marks_echoed``). The assistant is the cause when its audio had stopped (nothing for
    TURN_OVER_MS before the step ended) and everything received, marks included, was played: the server relayed the whole utterance, which was shorter than
    the requirement. Anything else (no audio at all, audio still arriving, marks outstanding) stays
    the server's problem, as reported."""
    import time

    wanted = fixture.requires.assistant.greeting_ms
    expect = step.expect.media
    if wanted is None or expect is None or expect.min_audio_ms is None or media is None:
        return problems
    shortfall = [p for p in problems if p.startswith("heard ") and "expected at least" in p]
    times = list(getattr(media, "media_times", []) or [])
    if not shortfall or not times:
        return problems
    now = time.monotonic() if now is None else now
    heard_ms = len(media.result.heard) / 8
    marks = list(getattr(media, "marks_sent", []) or [])
    played = set(media.result.marks_echoed)
    everything_played = len(media.result.heard) >= len(media.result.received) and all(m in played for m in marks)
    turn_over = (now - times[-1]) * 1000 >= TURN_OVER_MS and everything_played
    if not turn_over or heard_ms >= wanted:
        return problems
    restated = (f"requirement not met: the assistant behind the target stopped speaking after {heard_ms:.0f} ms "
                f"(all of it relayed: no audio for the last {(now - times[-1]) * 1000:.0f} ms, every mark played); "
                f"this fixture requires an assistant whose greeting lasts at least {wanted:g} ms "
                f"(requires.assistant.greeting_ms): point it at such an assistant, or run it with --in-process")
    return [restated if p in shortfall else p for p in problems]


def schema() -> dict[str, Any]:
    """The published JSON Schema of the fixture format (fixtures/schema.json)."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "twivapi replay fixture",
            **Fixture.model_json_schema()}


def load(path: str | Path) -> Fixture:
    """Read and validate one fixture; FixtureError names the file, step index and field."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise FixtureError(str(path), f"cannot read: {exc.strerror}") from None
    except ValueError as exc:
        raise FixtureError(str(path), f"not valid JSON: {exc}") from None
    try:
        fixture = Fixture.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = list(error["loc"])
        step_index = loc[1] if len(loc) > 1 and loc[0] == "steps" and isinstance(loc[1], int) else None
        field = ".".join(str(p) for p in (loc[2:] if step_index is not None else loc)) or None
        raise FixtureError(str(path), error["msg"], step=step_index, field=field) from None
    for index, step in enumerate(fixture.steps):
        if step.file and not (path.parent / step.file).is_file() and not Path(step.file).is_file():
            raise FixtureError(str(path), f"audio file {step.file} not found", step=index, field="file")
    return fixture


def expand(paths: Sequence[str | Path]) -> list[Path]:
    """Files and directories (their *.json, schema.json excepted), in order."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            out += sorted(p for p in path.glob("*.json") if p.name != "schema.json")
        else:
            out.append(path)
    return out


def render(value: Any, variables: dict[str, str], where: str = "") -> Any:
    """Substitute ``{{name}}`` in every string; an unknown name is an error naming it."""
    if isinstance(value, str):
        def sub(match: re.Match) -> str:
            name = match.group(1)
            if name not in variables:
                raise KeyError(name)
            return str(variables[name])
        return VARIABLE.sub(sub, value)
    if isinstance(value, dict):
        return {render(k, variables): render(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [render(v, variables) for v in value]
    return value
