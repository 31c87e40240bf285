"""The codec: bit-exact G.711, a stateful anti-aliased resampler with fixed sizes, a lossless framer."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from twivapi_cli import audio

audioop = pytest.importorskip("audioop") if audio._audioop is None else audio._audioop


def test_mulaw_tables_are_bit_exact_with_audioop():
    codes = bytes(range(256))
    assert audio._DECODE.tobytes() == audioop.ulaw2lin(codes, 2)
    every_sample = np.arange(-32768, 32768, dtype="<i2").tobytes()
    assert audio._encode_table().tobytes() == audioop.lin2ulaw(every_sample, 2)


def frames(data: bytes, size: int):
    return [data[i:i + size] for i in range(0, len(data), size)]


def test_inbound_sizes_quality_and_image_rejection():
    mu = audio.pcm16_to_ulaw(audio.tone(1031, 2000, 8000, 0.5))
    inbound = audio.InboundTranscoder()
    outs = [inbound.convert(f) for f in frames(mu, 160)]
    assert {len(o) for o in outs} == {640}
    pcm = b"".join(outs)[3200:]   # skip the filter warm-up
    assert audio.sinad_db(pcm, 1031, 16000) >= 35
    x = np.frombuffer(pcm, "<i2").astype(float)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    freqs = np.fft.rfftfreq(len(x), 1 / 16000)
    assert 20 * math.log10(spectrum[freqs > 4300].max() / spectrum.max()) <= -60


def test_outbound_rejects_aliases_and_keeps_the_tone():
    loud_hiss = np.frombuffer(audio.tone(6170, 2000, 16000, 0.4), "<i2").astype(int)
    voice = np.frombuffer(audio.tone(1031, 2000, 16000, 0.4), "<i2").astype(int)
    mixed = np.clip(loud_hiss + voice, -32768, 32767).astype("<i2").tobytes()
    down = audio.Downsampler()
    outs = [down.process(f) for f in frames(mixed, 640)]
    assert {len(o) for o in outs} == {320}
    y = np.frombuffer(b"".join(outs)[1600:], "<i2").astype(float)
    spectrum = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    freqs = np.fft.rfftfreq(len(y), 1 / 8000)
    alias = spectrum[(freqs > 1800) & (freqs < 1860)].max()   # 6170 Hz folds to 1830 Hz
    tone = spectrum[(freqs > 1000) & (freqs < 1060)].max()
    assert 20 * math.log10(alias / tone) <= -60


def test_no_clicks_at_frame_edges():
    pcm = audio.tone(437, 3000, 8000, 0.5)
    up = audio.Upsampler()
    out = np.frombuffer(b"".join(up.process(f) for f in frames(pcm, 320)), "<i2").astype(float)[640:]
    t = np.arange(len(out)) / 16000
    delay = (audio.TAPS - 1) / 2 / 16000
    basis = np.column_stack((np.sin(2 * np.pi * 437 * (t + 640 / 16000 - delay)),
                             np.cos(2 * np.pi * 437 * (t + 640 / 16000 - delay))))
    coeffs, *_ = np.linalg.lstsq(basis, out, rcond=None)
    residual = (out - basis @ coeffs) ** 2
    edges = np.zeros(len(out), dtype=bool)
    for boundary in range(0, len(out), 320):
        edges[max(0, boundary - 2):boundary + 2] = True
    assert 10 * math.log10(residual[edges].mean() / residual[~edges].mean()) < 2.0


def test_odd_chunk_sizes_lose_nothing():
    pcm = audio.tone(500, 1000, 16000, 0.3)
    down = audio.Downsampler()
    out = b"".join(down.process(pcm[i:i + 333]) for i in range(0, len(pcm), 333))
    assert len(out) == len(pcm) // 2


@given(samples=st.lists(st.integers(min_value=-32768, max_value=32767), min_size=0, max_size=1500),
       cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=25))
def test_the_downsampler_does_not_care_how_its_input_is_chunked(samples, cuts):
    """Filter history carried across calls of any size (the buffers follow a new chunk size): cut
    anywhere, even mid-sample, the output is the one of a single call."""
    pcm = np.array(samples, dtype="<i2").tobytes()
    whole = audio.Downsampler().process(pcm)
    down = audio.Downsampler()
    points = sorted({0, len(pcm), *[c for c in cuts if c <= len(pcm)]})
    assert b"".join(down.process(pcm[a:b]) for a, b in itertools.pairwise(points)) == whole


def test_the_downsampler_reset_drops_its_history():
    down = audio.Downsampler()
    down.process(audio.tone(1000, 20, 16000, 0.9))
    down.reset()
    assert down.process(b"\x00\x00" * 320) == b"\x00\x00" * 160


def test_reset_drops_the_filter_history():
    up = audio.Upsampler()
    up.process(audio.tone(1000, 20, 8000, 0.9))
    up.reset()
    assert up.process(b"\x00\x00" * 160) == b"\x00\x00" * 320


def test_transcoders_factory():
    inbound, outbound = audio.transcoders("mulaw-8k")
    assert inbound.convert(b"\x01\x02") == b"\x01\x02" and outbound.convert(b"\xff") == b"\xff"
    with pytest.raises(ValueError):
        audio.transcoders("mp3")


@given(data=st.binary(max_size=2000), cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=20))
def test_framer_never_drops_or_pads(data, cuts):
    framer = audio.Framer(160)
    out = []
    points = sorted({0, len(data), *[c for c in cuts if c <= len(data)]})
    for a, b in itertools.pairwise(points):
        out += framer.push(data[a:b])
    assert all(len(f) == 160 for f in out)
    assert b"".join(out) + framer.flush() == data


def test_framer_hands_out_whole_frames_it_does_not_alias():
    framer = audio.Framer(160)
    assert framer.push(b"a" * 160) == [b"a" * 160]            # one frame, nothing waiting
    assert framer.push(b"b" * 320) == [b"b" * 160] * 2         # two at once
    assert framer.push(b"c" * 100) == [] and len(framer) == 100
    assert framer.push(b"d" * 160) == [b"c" * 100 + b"d" * 60] and framer.flush() == b"d" * 100
    chunk = bytearray(b"e" * 160)   # a mutable buffer: the frame is a copy, not a view of it
    frames = framer.push(chunk)
    chunk[:] = b"f" * 160
    assert frames == [b"e" * 160] and all(type(f) is bytes for f in frames)


def test_wav_round_trip(tmp_path):
    pcm = audio.tone(440, 100, 8000)
    audio.write_wav(tmp_path / "a.wav", pcm, 8000)
    assert audio.read_wav(str(tmp_path / "a.wav")) == (pcm, 8000)


def test_full_scale_square_waves_saturate_and_never_wrap(monkeypatch):
    """A half-band FIR overshoots a full-scale edge (Gibbs): its samples past int16 are held at the
    rails, never wrapped round to the other sign (a wrap is a loud click)."""
    filtered: list[np.ndarray] = []
    to_int16 = audio._to_int16

    def keeping(samples: np.ndarray) -> bytes:
        filtered.append(samples.copy())   # the filter's output before rounding and saturation
        return to_int16(samples)
    monkeypatch.setattr(audio, "_to_int16", keeping)
    square = np.tile(np.r_[np.full(20, 32767), np.full(20, -32768)], 8).astype("<i2")   # 320 samples
    up = np.frombuffer(audio.Upsampler().process(square.tobytes()), dtype="<i2")
    down = np.frombuffer(audio.Downsampler().process(np.repeat(square, 2).tobytes()), dtype="<i2")
    for out, before in zip((up, down), filtered, strict=True):   # one conversion each
        assert before.max() > 32767 and before.min() < -32768   # it did overshoot
        assert np.array_equal(out, np.clip(np.rint(before), -32768, 32767).astype("<i2"))
