"""A Python client of Graft's REST API, typed with the server's own schemas.

    from graft import Client

    graft = Client("http://127.0.0.1:3000", key="graft_...")   # or GRAFT_URL, GRAFT_API_KEY
    head = graft.create_head("flowers", from_dir="photos/", backbone="auto")
    print(head.metrics.cv_accuracy)
    graft.predict(head.id, images=["rose.jpg"]).predictions[0].label
    graft.predict(voices.id, clips=["hello.wav", numpy_samples]).predictions

What it sends (examples from folders, images, clips): `graft/inputs.py`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Literal, cast

import httpx

from graft.inputs import (
    ClipLike,
    Examples,
    ImageLike,
    clip_bytes,
    examples_of,
    image_bytes,
    inputs_json,
    one_kind,
)
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
# The server's own bound on inputs per predict (GRAFT_MAX_PREDICT_INPUTS, default 256).
PREDICT_CHUNK = 256

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
        examples = examples_of(examples, from_dir)
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
        examples = examples_of(examples, from_dir)
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
        inputs = inputs_json(images, texts, clips)
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
        one_kind(images, texts, clips)
        options = {"top_k": top_k, "reject_unknown": reject_unknown}
        answers = []
        for start in range(0, len(images or texts or clips), PREDICT_CHUNK):
            if images or clips:
                files = [
                    ("image", image_bytes(x)) for x in images[start : start + PREDICT_CHUNK]
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
