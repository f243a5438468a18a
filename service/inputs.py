"""What users send, checked and turned into backbone rows, in the API worker.

Images become uint8 NHWC arrays (decoded, resized, cropped), texts token-id arrays, clips
mono float32 waveforms: the rows that the runner (`service/runner.py`) batches. Every
check raises a typed error that names the input's position; nothing here touches the
store or the runner.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, cast

import numpy as np

from graft.schemas import holds_control_characters
from models.audio import decode_clips
from models.preprocess import InvalidInput, decode_images, text_rows
from models.registry import AudioPreprocessing, BackboneSpec, ImagePreprocessing
from service.errors import Forbidden, PayloadTooLarge, Unprocessable
from service.settings import Settings

InputKind = Literal["image", "text", "audio"]


@dataclass(frozen=True)
class RawInput:
    """One input as the user sent it: image bytes, a text, or a clip's bytes."""

    kind: InputKind
    data: bytes | str

    @classmethod
    def from_json(cls, image: str | None, text: str | None, audio: str | None = None) -> RawInput:
        if text is not None:
            return cls("text", text)
        kind: InputKind = "audio" if audio is not None else "image"
        encoded = audio if audio is not None else image
        try:
            return cls(kind, base64.b64decode(encoded or "", validate=True))
        except (binascii.Error, ValueError):
            raise InvalidInput("invalid_base64", f"'{kind}' is not valid base64") from None


def content_hash(raw: RawInput) -> str:
    # surrogatepass: never fails here; invalid text is refused when it is checked, and
    # for valid text this is plain UTF-8.
    data = raw.data if isinstance(raw.data, bytes) else raw.data.encode("utf-8", "surrogatepass")
    return hashlib.sha256(raw.kind.encode() + b"\0" + data).hexdigest()


def to_rows(
    spec: BackboneSpec, items: Sequence[tuple[int, RawInput]], settings: Settings
) -> np.ndarray | list[np.ndarray]:
    """(position, input) pairs to the backbone's rows: one uint8 NHWC array of images, a
    token-id array per text, or a waveform per clip. Errors name the input's position."""
    pre = spec.preprocessing
    if isinstance(pre, ImagePreprocessing):
        images = [(position, as_bytes(raw)) for position, raw in items]
        return decode_images(images, pre, settings.max_image_pixels)
    if isinstance(pre, AudioPreprocessing):
        clips = [(position, as_bytes(raw)) for position, raw in items]
        return decode_clips(clips, pre, settings.max_audio_seconds)
    texts = []
    for position, raw in items:
        try:
            texts.append(check_text(cast(str, raw.data), settings))  # a text's is a str
        except InvalidInput as exc:
            raise InvalidInput(exc.code, f"input {position}: {exc.message}") from None
    return text_rows(spec, texts)


def check_text(text: str, settings: Settings) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: valid as a JSON escape, not as text
        raise InvalidInput("invalid_text", "text is not valid Unicode") from None
    if not text.strip():
        raise InvalidInput("empty_text", "text is empty")
    if len(text) > settings.max_text_chars:
        raise InvalidInput(
            "text_too_long", f"text of {len(text)} characters; at most {settings.max_text_chars}"
        )
    return text


def check_modality(spec: BackboneSpec, inputs: Sequence[RawInput]) -> None:
    for i, raw in enumerate(inputs):
        if raw.kind != spec.modality:
            raise Unprocessable(
                f"input {i} is {raw.kind} but backbone {spec.id} takes {spec.modality}",
                code="wrong_modality",
            )


def check_labels(labels: list[str], existing: Sequence[str], settings: Settings) -> list[str]:
    s = settings
    if len(labels) > s.max_examples_per_request:
        raise PayloadTooLarge(
            f"{len(labels)} examples; at most {s.max_examples_per_request} per request",
            code="too_many_examples",
        )
    for label in set(labels):
        if not label.strip():
            raise Unprocessable("labels must not be empty or blank", code="invalid_label")
        if holds_control_characters(label):
            raise Unprocessable(
                f"label {label[:40]!r} holds a control character", code="invalid_label"
            )
        if len(label) > s.max_label_chars:
            raise Unprocessable(
                f"label of {len(label)} characters; at most {s.max_label_chars}",
                code="invalid_label",
            )
    distinct = set(existing) | set(labels)
    if len(distinct) < 2:
        raise Unprocessable(
            f"a head needs at least 2 labels; got {sorted(distinct)}", code="too_few_labels"
        )
    if len(distinct) > s.max_labels:
        raise Unprocessable(
            f"{len(distinct)} labels; at most {s.max_labels}", code="too_many_labels"
        )
    return labels


def check_head_size(
    stored: set[tuple[str, str]], content_hashes: list[str], labels: list[str], settings: Settings
) -> None:
    total = len(stored | set(zip(content_hashes, labels, strict=True)))
    if total > settings.max_examples_per_head:
        raise Forbidden(
            f"the head would hold {total} distinct examples; at most"
            f" {settings.max_examples_per_head}",
            code="example_limit_reached",
        )


def check_descriptions(spec: BackboneSpec, descriptions: dict[str, str], labels: list[str]) -> None:
    if not descriptions:
        return
    if spec.modality != "text":
        raise Unprocessable(
            f"label_descriptions need a text backbone; {spec.id} is an {spec.modality} backbone",
            code="invalid_label_descriptions",
        )
    unknown = sorted(set(descriptions) - set(labels))
    if unknown:
        raise Unprocessable(
            f"label_descriptions name labels without examples: {unknown[:5]}",
            code="invalid_label_descriptions",
        )


def as_bytes(raw: RawInput) -> bytes:
    """An input as stored: image or clip bytes, or a (checked, valid) text as UTF-8."""
    return raw.data if isinstance(raw.data, bytes) else raw.data.encode("utf-8")
