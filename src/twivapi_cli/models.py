"""Domain models: the per-call state machine, sessions and the event log.

A call's state is an enum with one guarded ``transition()``: illegal moves raise
``IllegalTransition`` (the bridge records them as events) instead of silently overwriting state.
That is where the seed's races (hang-up before Vapi is ready, status callbacks out of order)
become visible and testable.
"""

from __future__ import annotations

import enum
import time
from dataclasses import asdict, dataclass, field
from typing import Any


class CallState(str, enum.Enum):
    RINGING = "ringing"        # Twilio's voice webhook arrived; TwiML answered
    SETTING_UP = "setting-up"  # the Vapi call is being created in the background
    READY = "ready"            # Vapi call exists (id known); waiting for media / Vapi to connect
    ACTIVE = "active"          # audio flowing (media stream linked, or Vapi reported in-progress)
    ENDED = "ended"            # ended normally (status callback, stop, end-of-call); terminal
    FAILED = "failed"          # setup failed, caller got the fallback; terminal

    @property
    def terminal(self) -> bool:
        return self in (CallState.ENDED, CallState.FAILED)


ALLOWED: dict[CallState, frozenset[CallState]] = {
    CallState.RINGING: frozenset({CallState.SETTING_UP, CallState.READY, CallState.ACTIVE,
                                  CallState.ENDED, CallState.FAILED}),
    CallState.SETTING_UP: frozenset({CallState.READY, CallState.ACTIVE, CallState.ENDED, CallState.FAILED}),
    CallState.READY: frozenset({CallState.ACTIVE, CallState.ENDED, CallState.FAILED}),
    CallState.ACTIVE: frozenset({CallState.ENDED, CallState.FAILED}),
    CallState.ENDED: frozenset(),
    CallState.FAILED: frozenset(),
}


class IllegalTransition(Exception):
    def __init__(self, call_sid: str, current: CallState, wanted: CallState):
        super().__init__(f"{call_sid}: {current.value} -> {wanted.value} is not allowed")
        self.call_sid, self.current, self.wanted = call_sid, current, wanted


def check_transition(call_sid: str, current: CallState, wanted: CallState) -> None:
    if wanted not in ALLOWED[current]:
        raise IllegalTransition(call_sid, current, wanted)


@dataclass
class Session:
    call_sid: str
    mode: str
    state: CallState = CallState.RINGING
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    vapi_call_id: str | None = None
    stream_sid: str | None = None
    websocket_call_url: str | None = None
    control_url: str | None = None
    from_number: str | None = None
    to_number: str | None = None
    ended_reason: str | None = None
    last_status_sequence: int = -1   # highest Twilio SequenceNumber applied
    instance: str | None = None      # which bridge instance answered / holds the media socket
    answer: str | None = None        # bypass mode: the TwiML answered, re-sent on a retried webhook

    def to_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)  # flat fields: no need for asdict's recursive copy (hot path)
        data["state"] = self.state.value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Session":
        data = dict(data)
        data["state"] = CallState(data["state"])
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class Event:
    """One line of the event log. ``seq`` is assigned by the store; times are epoch seconds."""

    type: str                      # e.g. "twilio.voice", "vapi.status-update", "state", "media.clear"
    call_sid: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    received_at: float = field(default_factory=time.time)
    acked_at: float | None = None
    processed_at: float | None = None
    seq: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Event":
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in known})


TERMINAL_TWILIO_STATUSES = frozenset({"completed", "busy", "no-answer", "canceled", "failed"})
