"""Speech the tests make themselves: Debian's espeak-ng says words in several voices
(`apt-get install espeak-ng sox`; .ci/run does), and sox changes a clip's rate or adds
noise. Each clip is made once per run (`speak` is cached)."""

from __future__ import annotations

import base64
import functools
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

# Three voices, the "speakers" of a who-speaks head: a man's, a woman's and a whisper (of
# the variants tried, trios the speech encoder told apart best: synthetic voices differ
# less than people's).
VOICES = ("en-us+m3", "en-us+f2", "en+whisper")
# Words of a which-command head, and the words a speaker's clips say.
COMMANDS = ("yes", "no", "stop", "go")
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Variations of a voice that keep it: speaking rates, in words per minute (a pitch of
# its own would make the voices alike: the variant sets each one's).
STYLES = (175, 140, 210, 160, 190)


def need_espeak() -> None:
    if shutil.which("espeak-ng") is None or shutil.which("sox") is None:
        pytest.fail("espeak-ng and sox are needed (apt-get install espeak-ng sox; .ci/run does)")


@functools.cache
def speak(text: str, voice: str, style: int = 0) -> bytes:
    """WAV bytes (22,050 Hz mono, 16-bit) of `voice` saying `text` in style `style`."""
    need_espeak()
    speed = STYLES[style % len(STYLES)]
    return subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(speed), "--stdout", text],
        check=True,
        capture_output=True,
    ).stdout


def sox(data: bytes, *effects: str, out_type: str = "wav") -> bytes:
    """A clip through sox: another format (`out_type`: flac, ogg, ...) and `effects`.
    Through files, not pipes: a FLAC written to a pipe lacks the header sox fills in at
    the end, and libsndfile refuses it."""
    with tempfile.TemporaryDirectory() as scratch:
        source, target = Path(scratch) / "in.wav", Path(scratch) / f"out.{out_type}"
        source.write_bytes(data)
        subprocess.run(["sox", source, target, *effects], check=True, capture_output=True)
        return target.read_bytes()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def speaker_examples(per_voice: int, *, offset: int = 0) -> list[dict]:
    """Each voice saying `per_voice` different words, labelled by voice."""
    return [
        {"label": voice, "audio": b64(speak(WORDS[(offset + i) % len(WORDS)], voice, i))}
        for voice in VOICES
        for i in range(per_voice)
    ]


def command_examples(per_word: int, *, voices: tuple[str, ...] = VOICES) -> list[dict]:
    """Each command word said `per_word` times, by turns in each voice and style."""
    return [
        {"label": word, "audio": b64(speak(word, voices[i % len(voices)], i))}
        for word in COMMANDS
        for i in range(per_word)
    ]


def clip_folders(root: Path, per_word: int) -> Path:
    """A folder per command word, holding its clips as WAV files (for `--from`)."""
    for word in COMMANDS:
        (root / word).mkdir(parents=True, exist_ok=True)
        for i in range(per_word):
            (root / word / f"{i}.wav").write_bytes(speak(word, VOICES[i % len(VOICES)], i))
    return root
