"""The speech encoder's graph and the clips it takes: resemblyzer's partial windows, the
mel frames against NumPy's FFT, the served ONNX graph against the torch module, batches
that change nothing, and every way a clip is decoded or refused."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile
import torch

from models.audio import decode_audio, pad_waveforms
from models.export import ensure_onnx
from models.preprocess import InvalidInput
from models.registry import AudioPreprocessing
from models.runtime import Backbone
from models.speech_backbone import mel_filter_bank, partial_counts
from service.settings import get_backbone
from tests.speech import VOICES, sox, speak

PRE = AudioPreprocessing()


def resemblyzer_partials(n_samples: int) -> int:
    """How many partials resemblyzer's `compute_partial_slices` cuts (rate 1.3, coverage
    0.75), as its loop does."""
    hop, frames = 160, 160
    n_frames = int(np.ceil((n_samples + 1) / hop))
    step = int(np.round((16000 / 1.3) / hop))
    starts = list(range(0, max(1, n_frames - frames + step + 1), step))
    coverage = (n_samples - starts[-1] * hop) / (frames * hop)
    return len(starts) - 1 if coverage < 0.75 and len(starts) > 1 else len(starts)


def test_partial_windows_are_resemblyzers() -> None:
    lengths = np.arange(1, 20 * 16000, 997)
    counted = partial_counts(torch.from_numpy(lengths), PRE).numpy()
    assert list(counted) == [resemblyzer_partials(int(n)) for n in lengths]
    assert counted.min() == 1 and counted.max() == 25


def test_mel_frames_are_a_windowed_power_spectrum_through_slaney_filters() -> None:
    """The strided-convolution DFT against NumPy's FFT of the same centred Hann frames."""
    spec = get_backbone("resemblyzer_ge2e")
    module = spec.build_module()
    module.pre = AudioPreprocessing(target_dbfs=-200.0)  # no volume change to compare
    wave = np.random.default_rng(0).normal(0, 0.1, 16000 + 123).astype(np.float32)
    with torch.no_grad():
        frames = module.mel_frames(torch.from_numpy(wave)[None], torch.tensor([len(wave)]))[0]
    padded = np.pad(wave, 200)
    windows = np.lib.stride_tricks.sliding_window_view(padded, 400)[::160]
    power = np.abs(np.fft.rfft(windows * np.hanning(401)[:-1], axis=1)) ** 2
    expected = power @ mel_filter_bank(16000, 400, 40).T
    assert np.allclose(frames.numpy()[: len(expected)], expected, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def encoder(backbone_dir) -> Backbone:
    spec = get_backbone("resemblyzer_ge2e")
    return Backbone(spec, ensure_onnx(spec, backbone_dir))


def test_the_served_graph_is_the_module_and_a_batch_changes_nothing(encoder) -> None:
    """Real speech of different lengths (one partial, several): the ONNX graph as the
    runner feeds it against PyTorch, and each clip alone against the padded batch."""
    clips = [
        decode_audio(speak(text, VOICES[i % 3]), PRE, 30)
        for i, text in enumerate(
            ["go", "seven", "the quick brown fox jumps over the lazy dog, twice over, slowly"]
        )
    ]
    assert len(clips[2]) > 2 * PRE.partial_samples > PRE.partial_samples > len(clips[0])
    batch = encoder.embed_rows(clips, depths=True)
    alone = np.vstack([encoder.embed_rows([clip], depths=True) for clip in clips])
    assert np.abs(batch - alone).max() < 1e-5
    module = encoder.spec.build_module()
    feeds = pad_waveforms(clips)
    with torch.no_grad():
        embedding, depths = module.forward_with_depths(
            torch.from_numpy(feeds["waveform"]), torch.from_numpy(feeds["samples"])
        )
    assert np.abs(batch - np.hstack([embedding.numpy(), depths.numpy()])).max() < 1e-4
    assert np.allclose(np.linalg.norm(batch[:, :256], axis=1), 1, atol=1e-5)


def test_the_shortest_clips_still_embed(encoder) -> None:
    """No trimming, so no clip becomes empty: one sample, a click in silence, a word."""
    click = np.zeros(16000, np.float32)
    click[8000] = 0.002  # just over the silence floor (-60 dBFS)
    rows = [np.array([0.1], np.float32), click, decode_audio(speak("go", VOICES[0]), PRE, 30)]
    embeddings = encoder.embed_rows(rows)
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1, atol=1e-5)


def _encoded(pcm: np.ndarray, rate: int, fmt: str) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, pcm, rate, format=fmt)
    return buffer.getvalue()


def test_clips_of_any_format_rate_and_channels_decode_alike() -> None:
    speech = speak("seven", VOICES[1])  # 22,050 Hz mono WAV, written as a stream
    reference = decode_audio(speech, PRE, 30)
    pcm, rate = soundfile.read(io.BytesIO(speech), dtype="float32")
    stereo = np.stack([pcm, pcm], axis=1)
    for data in [
        _encoded(stereo, rate, "WAV"),
        _encoded(pcm, rate, "FLAC"),
        _encoded(pcm, rate, "OGG"),
        sox(speech, "rate", "8000"),
        sox(speech, "rate", "48000", "channels", "2"),
    ]:
        decoded = decode_audio(data, PRE, 30)
        assert abs(len(decoded) - len(reference)) <= 2, len(decoded)
        assert decoded.dtype == np.float32
    # MP3's encoder adds its own delay and padding: the length is close, not equal.
    mp3 = decode_audio(_encoded(pcm, rate, "MP3"), PRE, 30)
    assert abs(len(mp3) - len(reference)) < 0.1 * PRE.sample_rate


def test_bad_clips_are_refused_with_their_codes() -> None:
    tone = (0.5 * np.sin(np.arange(16000) * 2 * np.pi * 440 / 16000)).astype(np.float32)
    whole = _encoded(tone, 16000, "WAV")
    flac = _encoded(tone, 16000, "FLAC")
    cases = {
        "invalid_audio": [b"not audio at all", whole[: len(whole) // 2], flac[: len(flac) // 2]],
        "empty_audio": [_encoded(np.zeros(0, np.float32), 16000, "WAV")],
        "silent_audio": [_encoded(np.zeros(16000, np.float32), 16000, "WAV")],
        "audio_too_long": [_encoded(np.tile(tone, 3), 16000, "FLAC")],
    }
    # A header's rate beyond any microphone's: refused before anything is decoded.
    cases["invalid_audio"].append(_encoded(tone, 500_000, "FLAC"))
    for code, clips in cases.items():
        for data in clips:
            with pytest.raises(InvalidInput) as refused:
                decode_audio(data, PRE, max_seconds=2.5)
            assert refused.value.code == code, (code, refused.value.message)
    assert len(decode_audio(whole, PRE, max_seconds=1.0)) == 16000  # exactly the limit
    # Many channels are mixed a block at a time: 64 channels of 2 s, in blocks of 16,384.
    many = _encoded(np.tile(tone[:, None], (2, 64)), 16000, "WAV")
    assert np.allclose(decode_audio(many, PRE, max_seconds=2.5), np.tile(tone, 2), atol=1e-4)
