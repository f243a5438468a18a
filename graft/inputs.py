"""What the client sends: labelled examples read from folders, and images and clips as
the server takes them.

Folders hold one folder per label. Images: .jpg, .jpeg, .png or .webp files. Texts: .txt
files, one example per line (blank lines skipped), so a label's examples may sit in one
file or in one file each. Clips: .wav, .flac, .ogg or .mp3 files, one example each.
"""

from __future__ import annotations

import base64
import io
import os
import wave
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
TEXT_SUFFIX = ".txt"
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3")

Modality = Literal["image", "text", "audio"]
ImageLike = str | os.PathLike | bytes  # a path, or encoded JPEG/PNG/WebP bytes (or a PIL image)
# A path, encoded WAV/FLAC/OGG/MP3 bytes, or samples: a numpy array of floats in [-1, 1]
# ([samples] or [samples, channels]) at 16 kHz, or an (array, sample rate) pair.
ClipLike = str | os.PathLike | bytes | Any
SAMPLE_RATE = 16000


class Examples:
    """Labelled examples of one modality, read from a folder per label (see the module)."""

    def __init__(
        self,
        modality: Modality,
        items: list[tuple[str, bytes | str]],
        sources: list[str] | None = None,
    ) -> None:
        # `sources`: where each example came from (a file name), for the server's errors.
        self.modality, self.items = modality, items
        self.sources = sources or [f"{i:06d}" for i in range(len(items))]

    def __len__(self) -> int:
        return len(self.items)

    @property
    def labels(self) -> list[str]:
        return sorted({label for label, _ in self.items})

    @classmethod
    def from_dir(cls, folder: str | os.PathLike) -> Examples:
        root = Path(folder)
        if not root.is_dir():
            raise ValueError(f"{root} is not a folder")
        items: list[tuple[str, bytes | str]] = []
        sources: list[str] = []
        suffixes: set[Modality] = set()
        for label_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            if label_dir.name.startswith("."):
                continue
            for path in sorted(label_dir.rglob("*")):
                if not path.is_file() or path.name.startswith("."):
                    continue
                suffix = path.suffix.lower()
                name = path.relative_to(root).as_posix()
                if suffix in IMAGE_SUFFIXES or suffix in AUDIO_SUFFIXES:
                    items.append((label_dir.name, path.read_bytes()))
                    sources.append(name)
                    suffixes.add("image" if suffix in IMAGE_SUFFIXES else "audio")
                elif suffix == TEXT_SUFFIX:
                    lines = path.read_text(encoding="utf-8").splitlines()
                    texts = [line.strip() for line in lines if line.strip()]
                    items += [(label_dir.name, text) for text in texts]
                    sources += [name] * len(texts)
                    suffixes.add("text")
        if not items:
            raise ValueError(
                f"{root}: no examples; put them in one folder per label"
                f" (images: {', '.join(IMAGE_SUFFIXES)}; texts: {TEXT_SUFFIX}, one per line;"
                f" clips: {', '.join(AUDIO_SUFFIXES)})"
            )
        if len(suffixes) > 1:
            raise ValueError(
                f"{root}: holds {' and '.join(sorted(suffixes))} examples; a head takes one kind"
            )
        return cls(suffixes.pop(), items, sources)

    def as_json(self) -> list[dict]:
        key = self.modality
        return [
            {"label": label, key: value if key == "text" else _b64(value)}
            for label, value in self.items
        ]

    def as_zip(self) -> bytes:
        """One folder per label, as the server's archive upload takes them (stored: images
        and clips are compressed already). Each file keeps its name's suffix, which tells
        `backbone: auto` the archive's modality."""
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
            for index, ((label, value), source) in enumerate(
                zip(self.items, self.sources, strict=True)
            ):
                data = value.encode() if isinstance(value, str) else value
                # Numbered: two files of a label's subfolders may share a name.
                archive.writestr(f"{label}/{index:06d}-{Path(source).name}", data)
        return buffer.getvalue()


def examples_of(examples: Examples | None, from_dir: str | os.PathLike | None) -> Examples:
    """`examples`, or those read from `from_dir` (one of them)."""
    if (examples is None) == (from_dir is None):
        raise ValueError("give examples or from_dir (one of them)")
    if examples is not None:
        return examples
    assert from_dir is not None
    return Examples.from_dir(from_dir)


def _b64(data: bytes | str) -> str:
    return base64.b64encode(data if isinstance(data, bytes) else data.encode()).decode()


def one_kind(*kinds: Sequence) -> None:
    """Refuses a call given more than one kind of input, or none."""
    if sum(bool(inputs) for inputs in kinds) != 1:
        raise ValueError("give images, texts or clips (one of them)")


def inputs_json(
    images: Sequence[ImageLike], texts: Sequence[str], clips: Sequence[ClipLike]
) -> list[dict]:
    one_kind(images, texts, clips)
    return (
        [{"image": _b64(image_bytes(x))} for x in images]
        or [{"audio": _b64(clip_bytes(x))} for x in clips]
        or [{"text": t} for t in texts]
    )


def clip_bytes(clip: ClipLike) -> bytes:
    """A clip as the server takes it: a file's bytes, or samples written as 16-bit WAV."""
    if isinstance(clip, bytes):
        return clip
    if isinstance(clip, str | os.PathLike):
        return Path(clip).read_bytes()
    samples, rate = clip if isinstance(clip, tuple) else (clip, SAMPLE_RATE)
    if not hasattr(samples, "dtype"):
        raise TypeError(
            f"a clip is a path, bytes or a numpy array of samples, not {type(clip).__name__}"
        )
    # numpy's own methods: the client itself does not import numpy.
    channels = 1 if samples.ndim == 1 else samples.shape[1]
    pcm = (samples.clip(-1, 1) * 32767).round().astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(2)
        out.setframerate(int(rate))
        out.writeframes(pcm.tobytes())
    return buffer.getvalue()


def image_bytes(image) -> bytes:
    """An image as the server takes it: a file's bytes, or a PIL image as PNG."""
    if isinstance(image, bytes):
        return image
    if isinstance(image, str | os.PathLike):
        return Path(image).read_bytes()
    if hasattr(image, "save"):  # a PIL image: sent as PNG, which loses nothing
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        return buffer.getvalue()
    raise TypeError(f"an image is a path, bytes or a PIL image, not {type(image).__name__}")
