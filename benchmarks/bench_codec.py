"""Codec cost and quality per 20 ms frame, each direction, side by side with audioop.ratecv (state
carried) and soxr's stream resampler (pipecat's choice), measured in one run.

Columns: median and p99 µs per frame; SINAD of a tone (dB); image (inbound: energy above 4.3 kHz) or
alias (outbound: the 1830 Hz alias of a 6170 Hz tone) rejection, dBc; added delay (ms, from the
cross-correlation of input and output); share of calls that returned no audio (soxr's burstiness);
whether every frame gives the same output size.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings

import numpy as np

from twivapi_cli import audio

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_table  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

try:
    import soxr
except ImportError:  # the comparison is skipped, not faked
    soxr = None

FRAMES = 5000


def timed(fn, frames: list[bytes]) -> tuple[list[bytes], float, float]:
    outs, times = [], []
    for frame in frames[:200]:
        fn(frame)   # warm-up (the converter state is reset by the caller for the quality pass)
    for i in range(FRAMES):
        frame = frames[i % len(frames)]
        start = time.perf_counter_ns()
        out = fn(frame)
        times.append(time.perf_counter_ns() - start)
        outs.append(out)
    times.sort()
    return outs, times[len(times) // 2] / 1000, times[int(len(times) * 0.99)] / 1000


def chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data) - size + 1, size)]


NOISE = np.random.default_rng(7).normal(0, 4000, 8000 * 2)


def added_delay_ms(factory, frame_bytes: int, in_rate: int, out_rate: int, encode, decode) -> float:
    """Group delay (cross-correlation on noise) plus the most audio the converter ever held back."""
    rng_in = np.clip(NOISE[: in_rate * 2], -32768, 32767).astype("<i2").tobytes()
    fn = factory()
    data = encode(rng_in)
    outs, held, fed, produced = [], 0.0, 0, 0
    for frame in chunks(data, frame_bytes):
        out = fn(frame)
        outs.append(out)
        fed += len(frame)
        produced += len(out)
        held = max(held, fed / frame_bytes * 20 - produced / max(1, _out_frame(frame_bytes, in_rate, out_rate)) * 20)
    output = np.frombuffer(decode(b"".join(outs)), "<i2").astype(float)
    reference = np.frombuffer(rng_in, "<i2").astype(float)
    if in_rate != out_rate:   # compare at the output rate
        reference = np.interp(np.arange(len(reference) * out_rate // in_rate) * in_rate / out_rate,
                              np.arange(len(reference)), reference)
    n = min(len(reference), len(output))
    corr = np.correlate(output[:n], reference[:n], "full")[n - 1:n - 1 + out_rate // 5]   # lags 0..200 ms
    return round(int(np.argmax(corr)) / out_rate * 1000 + max(held, 0.0), 2)


def _out_frame(frame_bytes: int, in_rate: int, out_rate: int) -> float:
    return frame_bytes * (out_rate / in_rate) * (2 if in_rate == 8000 else 0.25)


def spectrum_db(pcm: bytes, rate: int, band: tuple[float, float], against: tuple[float, float]) -> float:
    x = np.frombuffer(pcm, "<i2").astype(float)
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    freqs = np.fft.rfftfreq(len(x), 1 / rate)
    a = spec[(freqs >= band[0]) & (freqs <= band[1])].max()
    b = spec[(freqs >= against[0]) & (freqs <= against[1])].max()
    return round(20 * math.log10(max(a, 1e-9) / b), 1)


def inbound_methods():
    """name -> factory of a callable: 160 B mu-law -> PCM16 16 kHz."""
    def ours():
        t = audio.InboundTranscoder()
        return t.convert

    def ratecv():
        state = [None]

        def convert(frame):
            out, state[0] = audioop.ratecv(audioop.ulaw2lin(frame, 2), 2, 1, 8000, 16000, state[0])
            return out
        return convert

    methods = {"twivapi FIR-63": ours, "audioop.ratecv (state)": ratecv}
    if soxr is not None:
        def soxr_stream():
            stream = soxr.ResampleStream(8000, 16000, 1, dtype="int16", quality="VHQ")
            return lambda frame: stream.resample_chunk(np.frombuffer(audioop.ulaw2lin(frame, 2), "<i2")).tobytes()
        methods["soxr stream VHQ"] = soxr_stream
    return methods


def outbound_methods():
    """name -> factory of a callable: 640 B PCM16 16 kHz -> mu-law 8 kHz."""
    def ours():
        return audio.OutboundTranscoder().convert

    def ratecv():
        state = [None]

        def convert(frame):
            out, state[0] = audioop.ratecv(frame, 2, 1, 16000, 8000, state[0])
            return audioop.lin2ulaw(out, 2)
        return convert

    methods = {"twivapi FIR-63": ours, "audioop.ratecv (state)": ratecv}
    if soxr is not None:
        def soxr_stream():
            stream = soxr.ResampleStream(16000, 8000, 1, dtype="int16", quality="VHQ")
            return lambda frame: audioop.lin2ulaw(stream.resample_chunk(np.frombuffer(frame, "<i2")).tobytes(), 2)
        methods["soxr stream VHQ"] = soxr_stream
    return methods


def run(quick: bool = False) -> list[dict]:
    global FRAMES
    FRAMES = 1000 if quick else 5000
    rows = []
    tone8 = audio.pcm16_to_ulaw(audio.tone(1031, 4000, 8000, 0.5))
    in_frames = chunks(tone8, 160)
    for name, factory in inbound_methods().items():
        _, median, p99 = timed(factory(), in_frames)
        fn = factory()
        outs = [fn(f) for f in in_frames]
        pcm = b"".join(outs)
        steady = pcm[len(pcm) // 8 * 2:]   # skip the first quarter (warm-up), sample-aligned
        rows.append({"direction": "in: mu-law 8k -> PCM16 16k", "method": name, "median_us": round(median, 1),
                     "p99_us": round(p99, 1), "sinad_db": round(audio.sinad_db(steady, 1031, 16000), 1),
                     "rejection_dbc": spectrum_db(steady, 16000, (4300, 8000), (1000, 1060)),
                     "added_delay_ms": added_delay_ms(factory, 160, 8000, 16000, lambda p: audioop.lin2ulaw(p, 2),
                                                      lambda o: o),
                     "empty_calls_pct": round(100 * sum(1 for o in outs if not o) / len(outs), 1),
                     "fixed_size": len({len(o) for o in outs}) == 1})
    mix = (np.frombuffer(audio.tone(1031, 4000, 16000, 0.4), "<i2").astype(int)
           + np.frombuffer(audio.tone(6170, 4000, 16000, 0.4), "<i2").astype(int))
    mixed = np.clip(mix, -32768, 32767).astype("<i2").tobytes()
    clean = audio.tone(1031, 4000, 16000, 0.5)
    for name, factory in outbound_methods().items():
        _, median, p99 = timed(factory(), chunks(mixed, 640))
        fn = factory()
        alias_out = audio.ulaw_to_pcm16(b"".join(fn(f) for f in chunks(mixed, 640)))
        fn = factory()
        outs = [fn(f) for f in chunks(clean, 640)]
        tone_out = audio.ulaw_to_pcm16(b"".join(outs))
        rows.append({"direction": "out: PCM16 16k -> mu-law 8k", "method": name, "median_us": round(median, 1),
                     "p99_us": round(p99, 1),
                     "sinad_db": round(audio.sinad_db(tone_out[len(tone_out) // 8 * 2:], 1031, 8000), 1),
                     "rejection_dbc": spectrum_db(alias_out[len(alias_out) // 8 * 2:], 8000, (1800, 1860), (1000, 1060)),
                     "added_delay_ms": added_delay_ms(factory, 640, 16000, 8000, lambda p: p,
                                                      lambda o: audioop.ulaw2lin(o, 2)),
                     "empty_calls_pct": round(100 * sum(1 for o in outs if not o) / len(outs), 1),
                     "fixed_size": len({len(o) for o in outs}) == 1})
    return rows


if __name__ == "__main__":
    print_table(run(quick="--quick" in sys.argv))
