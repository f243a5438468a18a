"""Errors that carry their HTTP status, and the one place they become the JSON error shape.

Every error answer is `{"error": {"code": "snake_case", "message": "human text"}}`.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.preprocess import InvalidInput

log = logging.getLogger(__name__)


class ApiError(Exception):
    status = 400
    code = "bad_request"

    def __init__(
        self, message: str, *, code: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers
        if code:
            self.code = code


class BadInput(ApiError):
    status, code = 400, "invalid_input"


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"


class Forbidden(ApiError):
    status, code = 403, "forbidden"


class NotFound(ApiError):
    status, code = 404, "not_found"


class MethodNotAllowed(ApiError):
    status, code = 405, "method_not_allowed"


class Conflict(ApiError):
    status, code = 409, "conflict"


class PayloadTooLarge(ApiError):
    status, code = 413, "payload_too_large"


class TooManyRequests(ApiError):
    status, code = 429, "rate_limited"


class Unavailable(ApiError):
    status, code = 503, "unavailable"


class UnsupportedMediaType(ApiError):
    status, code = 415, "unsupported_media_type"


class Unprocessable(ApiError):
    status, code = 422, "invalid_request"


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


async def send_error(
    send, status: int, code: str, message: str, headers: tuple[tuple[bytes, bytes], ...] = ()
) -> None:
    """The JSON error shape sent straight through ASGI, for middleware outside the app."""
    body = json.dumps(error_body(code, message)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _respond(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


def _describe(errors: list[dict]) -> str:
    """Pydantic's error list as one readable line: `examples.0.label: Field required`."""
    parts = []
    for error in errors[:5]:
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
        parts.append(f"{where}: {error.get('msg')}" if where else str(error.get("msg")))
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more


def error_response(request: Request, exc: Exception) -> JSONResponse:
    """Any exception a request raises, as its answer in the JSON error shape."""
    if isinstance(exc, ApiError):
        return _respond(exc.status, exc.code, exc.message, exc.headers)
    if isinstance(exc, InvalidInput):
        too_large = ("image_too_large", "text_too_long", "audio_too_long")
        status = 413 if exc.code in too_large else 422
        return _respond(status, exc.code, exc.message)
    if isinstance(exc, RequestValidationError | ValidationError):
        errors = list(exc.errors())
        if any(e.get("type") == "json_invalid" for e in errors):
            return _respond(400, "invalid_json", "the request body is not valid JSON")
        return _respond(422, "invalid_request", _describe(errors))
    if isinstance(exc, RecursionError):
        # json.loads recurses per nesting level; absurdly nested bodies end here.
        return _respond(400, "invalid_json", "the request body is nested too deeply")
    if isinstance(exc, StarletteHTTPException):
        phrase = HTTPStatus(exc.status_code).phrase
        code = phrase.lower().replace(" ", "_").replace("-", "_")
        message = exc.detail if isinstance(exc.detail, str) else phrase
        return _respond(exc.status_code, code, message, getattr(exc, "headers", None))
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _respond(500, "internal_error", "an unexpected error occurred; it has been logged")


async def _handle(request: Request, exc: Exception) -> JSONResponse:
    # A coroutine: Starlette runs a plain-function handler on its thread pool, a hop per
    # error answer (429s under overload included).
    return error_response(request, exc)


def install_error_handlers(app: FastAPI) -> None:
    for handled in (
        ApiError,
        InvalidInput,
        RequestValidationError,
        ValidationError,
        RecursionError,
        StarletteHTTPException,
        Exception,
    ):
        app.add_exception_handler(handled, _handle)


class JsonNotFoundUnderV1:
    """ASGI middleware for the BentoML app. A /v1 path its mount does not match (one with
    an encoded newline, say) gets BentoML's plain-text 404; this answers it in the JSON
    error shape like every other /v1 answer."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1"):
            await self.app(scope, receive, send)
            return
        replaced = False

        async def send_json(message) -> None:
            nonlocal replaced
            if message["type"] == "http.response.start" and message["status"] == 404:
                content_type = dict(message.get("headers", [])).get(b"content-type", b"")
                if not content_type.startswith(b"application/json"):
                    replaced = True
                    await send_error(send, 404, "not_found", "no such route; see /v1/docs")
                    return
            if not (replaced and message["type"] == "http.response.body"):
                await send(message)

        await self.app(scope, receive, send_json)
