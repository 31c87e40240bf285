"""One call's per-turn latency, as the bridge measures it: from the caller's end of speech (Vapi's
``speech-update`` ``stopped`` reaching the bridge) to the turn's first assistant frame sent to
Twilio, split into where the time went.

    relay_in_ms    the caller's last frame: Twilio -> the bridge -> Vapi's socket
    vapi_ms        end of speech -> Vapi's first audio of the turn at the bridge
    relay_out_ms   that audio in the bridge until queued for Twilio (transcoding, framing)
    pacing_ms      queued -> sent to Twilio (what the pacer held it)

``media.first-audio`` carries these; Vapi's own split of its part (``end-of-call-report``'s
``turnLatencies``: transcriber, endpointing, model, voice) is joined with them turn by turn in
``tail.turn_budget``.
"""

from __future__ import annotations

from typing import Any


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


class TurnClock:
    def __init__(self) -> None:
        self.turn = 0
        self.speech_ended: float | None = None
        self.relay_in_ms: float | None = None
        self.vapi_first: float | None = None
        self.queued: float | None = None

    def caller_stopped(self, now: float, relay_in_ms: float | None) -> None:
        # the latest report counts (as the outbound's own clock): the caller may have spoken again
        self.speech_ended, self.relay_in_ms = now, relay_in_ms
        self.vapi_first = self.queued = None

    def vapi_audio(self, received: float, queued: float) -> None:
        """A chunk of Vapi's audio, received and queued at these times: the turn's first is kept."""
        if self.speech_ended is not None and self.vapi_first is None:
            self.vapi_first, self.queued = received, queued

    def first_audio(self, sent: float) -> dict[str, Any]:
        """The turn's first frame went to Twilio at ``sent``: its split (then the next turn)."""
        self.turn += 1
        ended, first, queued = self.speech_ended, self.vapi_first, self.queued
        self.speech_ended = None
        split: dict[str, Any] = {"turn": self.turn, "relay_in_ms": self.relay_in_ms}
        if ended is not None and first is not None and queued is not None:
            split.update(vapi_ms=_ms(first - ended), relay_out_ms=_ms(queued - first), pacing_ms=_ms(sent - queued))
        return split
