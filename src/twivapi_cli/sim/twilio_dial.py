"""``<Dial>`` in the simulated caller: a new leg to a simulated person who answers and speaks.

Twilio's side of ``<Dial><Number>`` and ``<Dial><Sip>``: the child leg gets its own CallSid
(``ParentCallSid`` the caller's, direction ``outbound-dial``; registered in the Twilio simulator's
state when there is one), the person answers after ``ring_s`` and speaks ``PERSON_HZ`` for
``person_ms`` (audio a test recognises: the assistant's tones are 440 and 660 Hz, a caller's 300,
500 and 800 Hz), which the caller hears in real time, then hangs up. The ``<Number>`` / ``<Sip>``
``statusCallback`` gets the leg's call-progress callbacks for its ``statusCallbackEvent``s
(``completed`` when none is named), numbered from 0 as Twilio numbers them; ``<Dial action>`` is
requested afterwards with ``DialCallStatus``, ``DialCallSid`` and ``DialCallDuration``, else the
TwiML goes on after the ``<Dial>``.

Checked as Twilio checks: a number that is not E.164, a SIP URI that is not ``sip:``, and a
``callerId`` that is neither one of the account's numbers nor the caller's own (an inbound call
may pass its caller through) fail the leg (``DialCallStatus=failed``, an error in the result).
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .. import audio
from .state import SimCall, TwilioState

PERSON_HZ = 880.0           # what the simulated person's voice is: a tone tests look for
PERSON_MS = 1500
RING_S = 0.2
E164 = re.compile(r"\+[1-9]\d{6,14}")
SIP = re.compile(r"sips?:\S+", re.IGNORECASE)


@dataclass
class DialLeg:
    """One ``<Dial>`` leg: where it went, how it ended, what the person said."""
    to: str
    kind: str                        # "number" | "sip"
    caller_id: str | None
    call_sid: str
    status: str = "failed"           # DialCallStatus
    error: str | None = None
    duration_s: int = 0
    callbacks: list[dict[str, str]] = field(default_factory=list)


@dataclass
class Person:
    """The simulated person at the far end of a ``<Dial>``."""
    speech_ms: int = PERSON_MS
    ring_s: float = RING_S
    hz: float = PERSON_HZ

    def voice(self) -> bytes:
        return audio.pcm16_to_ulaw(audio.tone(self.hz, self.speech_ms, rate=8000, amplitude=0.4))


Post = Callable[[str, dict[str, str]], Awaitable[Any]]   # (url, params) -> a signed status callback


class Dialer:
    """Runs ``<Dial>`` verbs for one call (``parent``: the caller's CallSid, From, To, AccountSid)."""

    def __init__(self, parent: dict[str, str], hear: Callable[[bytes], None], post: Post, *,
                 state: TwilioState | None = None, person: Person | None = None):
        self.parent, self.hear, self.post = parent, hear, post
        self.state, self.person = state, person or Person()
        self.action_params: dict[str, str] = {}   # for the <Dial action> request that follows a leg

    async def dial(self, verb: ET.Element) -> tuple[DialLeg, dict[str, str]]:
        """Run one ``<Dial>``; the leg and the ``<Dial action>`` parameters."""
        target = verb.find("Number")
        if target is None:
            target = verb.find("Sip")
        kind = "sip" if target is not None and target.tag == "Sip" else "number"
        to = ((target.text if target is not None else verb.text) or "").strip()
        leg = DialLeg(to, kind, verb.get("callerId"), "CA" + uuid.uuid4().hex)
        leg.error = self.refusal(leg)
        if leg.error is None:
            await self.connect(leg, target)
        return leg, {"DialCallStatus": leg.status, "DialCallSid": leg.call_sid,
                     "DialCallDuration": str(leg.duration_s)}

    def refusal(self, leg: DialLeg) -> str | None:
        if leg.kind == "number" and not E164.fullmatch(leg.to):
            return f"Dial: invalid phone number format {leg.to!r}"
        if leg.kind == "sip" and not SIP.fullmatch(leg.to):
            return f"Dial: invalid SIP URI {leg.to!r}"
        if leg.kind == "number" and leg.caller_id and not self._may_present(leg.caller_id):
            return f"Dial: invalid callerId value {leg.caller_id!r} (not a number of this account, nor the caller's)"
        return None

    def _may_present(self, caller_id: str) -> bool:
        if caller_id == self.parent.get("From"):
            return True
        return self.state is None or self.state.number_by_phone(caller_id) is not None

    async def connect(self, leg: DialLeg, target: ET.Element | None) -> None:
        callback = target.get("statusCallback") if target is not None else None
        events = (target.get("statusCallbackEvent") or "completed").split() if target is not None else []
        child = self._register(leg)
        sequence = 0

        async def progress(status: str, **extra: str) -> None:
            nonlocal sequence
            if child is not None:
                child.set_status(status)
            event = {"in-progress": "answered"}.get(status, status)
            if callback and event in events:
                params = {"CallSid": leg.call_sid, "ParentCallSid": self.parent["CallSid"],
                          "AccountSid": self.parent.get("AccountSid", ""), "From": leg.caller_id or self.parent.get("From", ""),
                          "To": leg.to, "Direction": "outbound-dial", "CallStatus": status,
                          "SequenceNumber": str(sequence), "CallbackSource": "call-progress-events", **extra}
                sequence += 1
                leg.callbacks.append(params)
                await self.post(callback, params)

        await progress("initiated")
        await progress("ringing")
        await asyncio.sleep(self.person.ring_s)
        answered = time.monotonic()
        await progress("in-progress")
        voice = self.person.voice()
        for i in range(0, len(voice), 160):   # heard as it is spoken: 20 ms at a time
            self.hear(voice[i:i + 160])
            await asyncio.sleep(max(0.0, answered + (i + 160) / 8000 - time.monotonic()))
        leg.status, leg.duration_s = "completed", int(time.monotonic() - answered)
        await progress("completed", CallDuration=str(leg.duration_s))

    def _register(self, leg: DialLeg) -> SimCall | None:
        if self.state is None:
            return None
        call = SimCall(sid=leg.call_sid, account_sid=self.parent.get("AccountSid", ""), to=leg.to,
                       from_=leg.caller_id or self.parent.get("From", ""), direction="outbound-dial", status="queued",
                       parent_call_sid=self.parent["CallSid"])
        return self.state.add_call(call)
