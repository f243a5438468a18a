"""A Python client of Graft's REST API, typed with the server's own schemas.

    from graft import Client

    graft = Client("http://127.0.0.1:3000", key="graft_...")   # or GRAFT_URL, GRAFT_API_KEY
    head = graft.create_head("flowers", from_dir="photos/", backbone="auto")
    print(head.metrics.cv_accuracy)
    graft.predict(head.id, images=["rose.jpg"]).predictions[0].label
    graft.predict(voices.id, clips=["hello.wav", numpy_samples]).predictions

Folders hold one folder per label. Images: .jpg, .jpeg, .png or .webp files. Texts: .txt
files, one example per line (blank lines skipped), so a label's examples may sit in one
file or in one file each. Clips: .wav, .flac, .ogg or .mp3 files, one example each.
"""

from __future__ import annotations

import base64
import io
import os
import time
import wave
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Literal, cast

import httpx

from graft.schemas import (
    BackbonePublic,
    HeadPublic,
    PredictResponse,
    TenantCreated,
    TenantKey,
    TenantPublic,
    TrainingProgress,
)

DEFAULT_URL = "http://127.0.0.1:3000"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
TEXT_SUFFIX = ".txt"
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3")
# The server's own bound on inputs per predict (GRAFT_MAX_PREDICT_INPUTS, default 256).
PREDICT_CHUNK = 256

Modality = Literal["image", "text", "audio"]
ImageLike = str | os.PathLike | bytes  # a path, or encoded JPEG/PNG/WebP bytes (or a PIL image)
# A path, encoded WAV/FLAC/OGG/MP3 bytes, or samples: a numpy array of floats in [-1, 1]
# ([samples] or [samples, channels]) at 16 kHz, or an (array, sample rate) pair.
ClipLike = str | os.PathLike | bytes | Any
SAMPLE_RATE = 16000
# Called with the bytes sent so far and the request's size.
UploadCallback = Callable[[int, int], None]
# Called on each poll of a training head with its `progress` (None before it starts).
ProgressCallback = Callable[[TrainingProgress | None], None]


class GraftError(Exception):
    """An error answer of the API: its HTTP status and the `{"error": {code, message}}`."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.status, self.code, self.message = status, code, message

    @classmethod
    def from_response(cls, response: httpx.Response) -> GraftError:
        try:
            error = response.json()["error"]
            return cls(response.status_code, error["code"], error["message"])
        except (ValueError, KeyError, TypeError):  # not the API's shape (a proxy's page)
            text = response.text.strip()[:200] or response.reason_phrase
            return cls(response.status_code, f"http_{response.status_code}", text)


class TrainingFailed(GraftError):
    """The head's training ended `failed`; `head.error` says why."""

    def __init__(self, head: HeadPublic) -> None:
        super().__init__(200, "training_failed", head.error or "training failed")
        self.head = head


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


class _Counted(httpx.SyncByteStream):
    """A request body that reports how much of it has been sent."""

    def __init__(self, stream: Iterable[bytes], total: int, callback: UploadCallback) -> None:
        self.stream, self.total, self.callback = stream, total, callback

    def __iter__(self) -> Iterator[bytes]:
        sent = 0
        for chunk in self.stream:
            for start in range(0, len(chunk), 1 << 16):
                piece = chunk[start : start + (1 << 16)]
                yield piece
                sent += len(piece)
                self.callback(sent, self.total)


class Client:
    """Graft over HTTP. Answers 429 and 503 are retried after their `Retry-After`; any
    other error answer raises `GraftError` with the API's code and message."""

    def __init__(
        self,
        url: str | None = None,
        key: str | None = None,
        *,
        timeout: float = 300,
        retries: int = 5,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        url = (url or os.environ.get("GRAFT_URL") or DEFAULT_URL).rstrip("/")
        key = key or os.environ.get("GRAFT_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.retries = retries
        self.http = httpx.Client(
            base_url=f"{url}/v1", headers=headers, timeout=timeout, transport=transport
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    # Transport -----------------------------------------------------------------------

    def _request(
        self, method: str, path: str, *, on_upload: UploadCallback | None = None, **kwargs
    ) -> httpx.Response:
        for attempt in range(self.retries + 1):
            request = self.http.build_request(method, path, **kwargs)
            if on_upload is not None:
                total = int(request.headers.get("content-length", 0))
                # A synchronous client's request: its body is a sync stream.
                request.stream = _Counted(cast(Iterable[bytes], request.stream), total, on_upload)
            response = self.http.send(request)
            if response.status_code not in (429, 503) or attempt == self.retries:
                break
            time.sleep(_retry_after(response, attempt))
        if response.status_code >= 400:
            raise GraftError.from_response(response)
        return response

    # Tenants (admin key) ---------------------------------------------------------------

    def create_tenant(self, name: str) -> TenantCreated:
        response = self._request("POST", "/tenants", json={"name": name})
        return TenantCreated.model_validate_json(response.content)

    def tenants(self) -> list[TenantPublic]:
        body = self._request("GET", "/tenants").json()
        return [TenantPublic.model_validate(t) for t in body["tenants"]]

    def rotate_key(self, tenant_id: str) -> TenantKey:
        response = self._request("POST", f"/tenants/{tenant_id}/key")
        return TenantKey.model_validate_json(response.content)

    def delete_tenant(self, tenant_id: str) -> None:
        self._request("DELETE", f"/tenants/{tenant_id}")

    # Backbones -------------------------------------------------------------------------

    def backbones(self) -> list[BackbonePublic]:
        body = self._request("GET", "/backbones").json()
        return [BackbonePublic.model_validate(b) for b in body["backbones"]]

    # Heads -----------------------------------------------------------------------------

    def heads(self) -> list[HeadPublic]:
        body = self._request("GET", "/heads").json()
        return [HeadPublic.model_validate(h) for h in body["heads"]]

    def head(self, head_id: str) -> HeadPublic:
        return HeadPublic.model_validate_json(self._request("GET", f"/heads/{head_id}").content)

    def delete_head(self, head_id: str) -> None:
        self._request("DELETE", f"/heads/{head_id}")

    def create_head(
        self,
        name: str,
        examples: Examples | None = None,
        *,
        from_dir: str | os.PathLike | None = None,
        backbone: str = "auto",
        fine_tune: Literal["auto", "on", "off"] = "auto",
        unknown_keep: float | None = None,
        label_descriptions: dict[str, str] | None = None,
        wait: bool = True,
        on_upload: UploadCallback | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> HeadPublic:
        """A new head from `examples` or a folder per label. Images and clips go up as one
        zip, texts as JSON. With `wait`, returns once trained (`TrainingFailed` if it failed).
        `label_descriptions`: text heads, a short description per label (README).
        `unknown_keep`: the share of its held-out examples the head's unknown threshold
        keeps (the server's default: 0.95)."""
        examples = _examples(examples, from_dir)
        spec: dict[str, Any] = {"name": name, "backbone": backbone, "fine_tune": fine_tune}
        if unknown_keep is not None:
            spec["unknown_keep"] = unknown_keep
        if examples.modality != "text" and not label_descriptions:
            archive = ("examples.zip", examples.as_zip(), "application/zip")
            kwargs: dict[str, Any] = {"data": spec, "files": {"archive": archive}}
        else:
            body: dict[str, Any] = {**spec, "examples": examples.as_json()}
            if label_descriptions:
                body["label_descriptions"] = label_descriptions
            kwargs = {"json": body}
        response = self._request("POST", "/heads", on_upload=on_upload, **kwargs)
        head = HeadPublic.model_validate_json(response.content)
        return self.wait(head, on_progress=on_progress) if wait else head

    def add_examples(
        self,
        head_id: str,
        examples: Examples | None = None,
        *,
        from_dir: str | os.PathLike | None = None,
        wait: bool = True,
        on_upload: UploadCallback | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> HeadPublic:
        """Add labelled examples; the head retrains on all of its examples (version + 1)."""
        examples = _examples(examples, from_dir)
        response = self._request(
            "POST",
            f"/heads/{head_id}/examples",
            json={"examples": examples.as_json()},
            on_upload=on_upload,
        )
        head = HeadPublic.model_validate_json(response.content)
        return self.wait(head, on_progress=on_progress) if wait else head

    def add_unlabeled(
        self,
        head_id: str,
        *,
        images: Sequence[ImageLike] = (),
        texts: Sequence[str] = (),
        clips: Sequence[ClipLike] = (),
        wait: bool = True,
        on_progress: ProgressCallback | None = None,
    ) -> HeadPublic:
        """Unlabelled examples of the domain the head will serve (another camera, another
        microphone); it retrains, adapting to them where that looks helpful
        (`metrics.domain` says how and why)."""
        inputs = _inputs_json(images, texts, clips)
        response = self._request("POST", f"/heads/{head_id}/unlabeled", json={"examples": inputs})
        head = HeadPublic.model_validate_json(response.content)
        return self.wait(head, on_progress=on_progress) if wait else head

    def wait(
        self,
        head: HeadPublic | str,
        *,
        on_progress: ProgressCallback | None = None,
        timeout: float = 3600,
        poll_s: float = 0.5,
    ) -> HeadPublic:
        """The head once it no longer trains; `on_progress` is called on every poll."""
        if isinstance(head, str):
            head = self.head(head)
        deadline = time.monotonic() + timeout
        while head.status == "training":
            if on_progress is not None:
                on_progress(head.progress)
            if time.monotonic() > deadline:
                raise TimeoutError(f"head {head.id} still training after {timeout} s")
            time.sleep(poll_s)
            head = self.head(head.id)
        if head.status == "failed":
            raise TrainingFailed(head)
        return head

    def predict(
        self,
        head_id: str,
        *,
        images: Sequence[ImageLike] = (),
        texts: Sequence[str] = (),
        clips: Sequence[ClipLike] = (),
        top_k: int = 1,
        reject_unknown: bool = False,
    ) -> PredictResponse:
        """Predict images (paths, bytes or PIL images), texts or clips (paths, bytes or
        numpy samples), in calls of at most 256 inputs; the answer holds every prediction
        in order."""
        _one_kind(images, texts, clips)
        options = {"top_k": top_k, "reject_unknown": reject_unknown}
        answers = []
        for start in range(0, len(images or texts or clips), PREDICT_CHUNK):
            if images or clips:
                files = [
                    ("image", _image_bytes(x)) for x in images[start : start + PREDICT_CHUNK]
                ] or [("audio", clip_bytes(x)) for x in clips[start : start + PREDICT_CHUNK]]
                kwargs: dict[str, Any] = {
                    "files": files,
                    "params": {k: str(v).lower() for k, v in options.items()},
                }
            else:
                inputs = [{"text": t} for t in texts[start : start + PREDICT_CHUNK]]
                kwargs = {"json": {"inputs": inputs, **options}}
            response = self._request("POST", f"/heads/{head_id}/predict", **kwargs)
            answers.append(PredictResponse.model_validate_json(response.content))
        first = answers[0]
        first.predictions = [p for answer in answers for p in answer.predictions]
        return first

    def export(
        self,
        head_id: str,
        path: str | os.PathLike | None = None,
        *,
        variant: Literal["fp32", "int8"] | None = None,
    ) -> bytes:
        """Backbone + head as one ONNX model (written to `path` too, when given)."""
        params = {"variant": variant} if variant else {}
        model = self._request("GET", f"/heads/{head_id}/model.onnx", params=params).content
        if path is not None:
            Path(path).write_bytes(model)
        return model


def _examples(examples: Examples | None, from_dir: str | os.PathLike | None) -> Examples:
    if (examples is None) == (from_dir is None):
        raise ValueError("give examples or from_dir (one of them)")
    if examples is not None:
        return examples
    assert from_dir is not None
    return Examples.from_dir(from_dir)


def _b64(data: bytes | str) -> str:
    return base64.b64encode(data if isinstance(data, bytes) else data.encode()).decode()


def _one_kind(*kinds: Sequence) -> None:
    if sum(bool(inputs) for inputs in kinds) != 1:
        raise ValueError("give images, texts or clips (one of them)")


def _inputs_json(
    images: Sequence[ImageLike], texts: Sequence[str], clips: Sequence[ClipLike]
) -> list[dict]:
    _one_kind(images, texts, clips)
    return (
        [{"image": _b64(_image_bytes(x))} for x in images]
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


def _image_bytes(image) -> bytes:
    if isinstance(image, bytes):
        return image
    if isinstance(image, str | os.PathLike):
        return Path(image).read_bytes()
    if hasattr(image, "save"):  # a PIL image: sent as PNG, which loses nothing
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        return buffer.getvalue()
    raise TypeError(f"an image is a path, bytes or a PIL image, not {type(image).__name__}")


def _retry_after(response: httpx.Response, attempt: int) -> float:
    """Seconds to wait: the answer's Retry-After (seconds or a date), else 0.5 s doubled
    per attempt; at most a minute."""
    value = response.headers.get("retry-after", "")
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            seconds = 0.5 * 2**attempt
    return min(max(seconds, 0.0), 60.0)
