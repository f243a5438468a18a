"""Reading a request body that comes as JSON, a multipart form or bytes: the routes that
take several media types name a reader for each, and `read_body` picks it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

from fastapi import Request
from starlette.datastructures import UploadFile

from service.errors import Unprocessable, UnsupportedMediaType

T = TypeVar("T")
JSON = "application/json"
MULTIPART = "multipart/form-data"


def media_type(request: Request) -> str:
    """The body's media type, without its parameters; none given counts as JSON."""
    value = request.headers.get("content-type", "").split(";")[0].strip().lower()
    return value or JSON


async def read_body(
    request: Request, readers: Mapping[str, Callable[[Request], Awaitable[T]]]
) -> T:
    """What the reader of the body's media type makes of it; 415 naming those accepted
    for any other."""
    media = media_type(request)
    if media in readers:
        return await readers[media](request)
    *others, last = readers
    accepted = f"{', '.join(others)} or {last}" if others else last
    raise UnsupportedMediaType(f"content type {media!r}: send {accepted}")


async def archive_form(request: Request, *, max_fields: int) -> tuple[bytes, dict[str, str]]:
    """A multipart form's zip file (`archive`) and its other fields."""
    form = await request.form(max_files=1, max_fields=max_fields)
    archive = form.get("archive")
    if not isinstance(archive, UploadFile):
        raise Unprocessable("multipart form needs a zip file 'archive'")
    # The form's only file is the archive (max_files=1): its other fields are strings.
    fields = {name: value for name, value in form.items() if isinstance(value, str)}
    return await archive.read(), fields
