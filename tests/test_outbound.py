"""Assistant audio on its way to Twilio (``Outbound``): which marks follow it. A mark costs two
messages (ours and Twilio's echo), so one goes out where its echo is used: at the end of what was
sent, and every 100 ms while a recording needs the playback position."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from twivapi_cli.audio import transcoders
from twivapi_cli.bridge import outbound as outbound_module
from twivapi_cli.bridge.outbound import Outbound

STREAM = "MZ" + "0" * 32
FRAME = b"\xff" * 160


def kinds(sent: list[str]) -> list[str]:
    """The messages as ``media`` or the mark's name."""
    return [m["mark"]["name"] if m["event"] == "mark" else m["event"] for m in map(json.loads, sent)]


async def _until(condition: Callable[[], bool], timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


def started(record: bool = False) -> tuple[Outbound, list[str], asyncio.Task]:
    sent: list[str] = []

    async def send(text: str) -> None:
        sent.append(text)
    outbound = Outbound(transcoders("mulaw-8k")[1], send)
    outbound.stream_sid = STREAM
    if record:
        outbound.tap = lambda generation, ms, frame: None
    return outbound, sent, asyncio.create_task(outbound.pace())


def test_what_was_sent_ends_with_one_mark_and_no_mark_between():
    async def go() -> list[str]:
        outbound, sent, pacer = started()
        outbound.push(FRAME * 10)
        await _until(lambda: "0:200" in kinds(sent))
        await asyncio.sleep(0.1)   # nothing more follows
        pacer.cancel()
        return kinds(sent)
    assert asyncio.run(go()) == ["media"] * 10 + ["0:200"]


def test_a_recording_gets_the_position_every_100_ms():
    async def go() -> list[str]:
        outbound, sent, pacer = started(record=True)
        outbound.push(FRAME * 12)
        await _until(lambda: "0:240" in kinds(sent))
        pacer.cancel()
        return kinds(sent)
    assert asyncio.run(go()) == (["media"] * 5 + ["0:100"] + ["media"] * 5 + ["0:200"] + ["media"] * 2 + ["0:240"])


def test_audio_that_follows_before_the_quiet_is_over_is_the_same_run(monkeypatch):
    """A source at real time empties the queue after every frame: that is not a mark after each."""
    monkeypatch.setattr(outbound_module, "MARK_AFTER_QUIET_S", 2.0)

    async def go() -> tuple[list[str], list[str]]:
        outbound, sent, pacer = started()
        outbound.push(FRAME * 3)
        await _until(lambda: len(sent) == 3)   # sent, the queue empty, the quiet not over
        outbound.push(FRAME * 2)
        await _until(lambda: len(sent) == 5)
        before_quiet = kinds(sent)
        await _until(lambda: len(sent) == 6)
        pacer.cancel()
        return before_quiet, kinds(sent)
    before_quiet, after = asyncio.run(go())
    assert before_quiet == ["media"] * 5
    assert after == ["media"] * 5 + ["0:100"]


def test_a_barge_in_leaves_nothing_to_mark(monkeypatch):
    monkeypatch.setattr(outbound_module, "MARK_AFTER_QUIET_S", 2.0)

    async def go() -> list[str]:
        outbound, sent, pacer = started()
        outbound.push(FRAME * 3)
        await _until(lambda: len(sent) == 3)
        assert outbound.interrupt()   # cleared before the quiet was over: the next mark is the next turn's
        outbound.new_turn()
        outbound.push(FRAME)
        await _until(lambda: "1:20" in kinds(sent))
        pacer.cancel()
        return kinds(sent)
    assert asyncio.run(go()) == ["media"] * 4 + ["1:20"]
