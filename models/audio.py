"""Clips as an audio backbone takes them: decoded, mixed to mono and resampled to the
backbone's rate in the service; the graph does the rest (`models/speech_backbone.py`).
No torch here.

libsndfile (through soundfile) reads WAV, FLAC, OGG (Vorbis, Opus) and MP3; soxr
resamples. A clip is refused, with the API's error code, when it is not audio, is cut
short, holds no samples, is silent or is longer than the limit.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import soundfile
import soxr

from models.preprocess import InvalidInput
from models.registry import AudioPreprocessing

# A clip whose loudest sample stays under -60 dBFS is silence (or a broken recording):
# the graph would raise its volume by more than 30 dB, making noise of it.
SILENT_PEAK = 10 ** (-60 / 20)
# A WAV written as a stream (espeak-ng --stdout, arecord) declares a data size it could not
# know: the format's largest, or nearly. Anything less that the body does not hold is a
# file cut short (libsndfile reads what is there and says nothing).
_STREAMED_WAV_SIZE = 0x7F000000
# Beyond any microphone's rate: a header that claims more is not a recording.
MAX_SAMPLE_RATE = 384_000
# Samples (all channels) decoded at a time: 4 MiB of float32.
_BLOCK_VALUES = 1 << 20


def decode_audio(data: bytes, pre: AudioPreprocessing, max_seconds: float) -> np.ndarray:
    """A clip's bytes to mono float32 PCM at the backbone's rate."""
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as clip:
            rate, kind = clip.samplerate, clip.format
            if rate > MAX_SAMPLE_RATE:
                raise InvalidInput(
                    "invalid_audio", f"a sample rate of {rate} Hz; at most {MAX_SAMPLE_RATE}"
                )
            mono = _mono(clip, limit=int(max_seconds * rate))
    except InvalidInput:
        raise
    except (soundfile.LibsndfileError, RuntimeError, ValueError, TypeError) as exc:
        raise InvalidInput(
            "invalid_audio", f"not a clip this server reads (WAV, FLAC, OGG, MP3): {exc}"
        ) from None
    if mono is None:
        raise InvalidInput(
            "audio_too_long",
            f"a clip of more than {max_seconds:g} s; at most {max_seconds:g} s per clip",
        )
    if kind == "WAV" and (missing := _missing_wav_bytes(data)):
        raise InvalidInput("invalid_audio", f"the clip is cut short: {missing} bytes are missing")
    if len(mono) == 0:
        raise InvalidInput("empty_audio", "the clip holds no samples")
    if not np.isfinite(mono).all():
        raise InvalidInput("invalid_audio", "the clip holds samples that are not numbers")
    if float(np.abs(mono).max()) < SILENT_PEAK:
        raise InvalidInput("silent_audio", "the clip is silent (its peak is under -60 dBFS)")
    if rate != pre.sample_rate:
        mono = soxr.resample(mono, rate, pre.sample_rate)
    return np.ascontiguousarray(mono, dtype=np.float32)


def _mono(clip: soundfile.SoundFile, limit: int) -> np.ndarray | None:
    """The clip's frames mixed to mono, read a block at a time (a header may claim any
    length, and a few kilobytes of FLAC may decode to minutes of many channels), so that
    no more than `limit` mono frames are ever held; None past the limit."""
    block = max(1, _BLOCK_VALUES // clip.channels)
    parts: list[np.ndarray] = []
    held = 0
    while held <= limit:
        frames = clip.read(frames=min(block, limit + 1 - held), dtype="float32", always_2d=True)
        if len(frames) == 0:
            return np.concatenate(parts) if parts else np.zeros(0, np.float32)
        parts.append(frames.mean(axis=1) if frames.shape[1] > 1 else frames[:, 0].copy())
        held += len(frames)
    return None


def _missing_wav_bytes(data: bytes) -> int:
    """How many bytes of its `data` chunk a RIFF WAV's header declares past the body's end
    (0 for a whole file, or one written as a stream)."""
    position = 12  # after "RIFF", the size and "WAVE"
    while position + 8 <= len(data):
        chunk, size = (
            data[position : position + 4],
            int.from_bytes(data[position + 4 : position + 8], "little"),
        )
        if chunk == b"data":
            held = len(data) - position - 8
            return 0 if size >= _STREAMED_WAV_SIZE else max(0, size - held)
        position += 8 + size + (size & 1)  # chunks are padded to an even size
    return 0


def decode_clips(
    items: Sequence[tuple[int, bytes]], pre: AudioPreprocessing, max_seconds: float
) -> list[np.ndarray]:
    """(position, bytes) pairs to waveforms; an error names the input's position."""
    rows = []
    for position, data in items:
        try:
            rows.append(decode_audio(data, pre, max_seconds))
        except InvalidInput as exc:
            raise InvalidInput(exc.code, f"input {position}: {exc.message}") from None
    return rows


def pad_waveforms(rows: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """`waveform` and `samples`: the rows padded with zeros to the longest of this batch."""
    longest = max((len(row) for row in rows), default=0)
    waveform = np.zeros((len(rows), longest), np.float32)
    for i, row in enumerate(rows):
        waveform[i, : len(row)] = row
    return {"waveform": waveform, "samples": np.array([len(r) for r in rows], np.int64)}


def example_audio_feeds(sample_rate: int) -> dict[str, np.ndarray]:
    """Two clips of noise, 3 s and 0.4 s long, as an audio graph's padded feeds (what an
    export is traced and checked with)."""
    noise = np.random.default_rng(0).normal(0, 0.1, 3 * sample_rate).astype(np.float32)
    return pad_waveforms([noise, noise[: int(0.4 * sample_rate)]])
