"""POST /v1/heads/{head_id}/predict (tenant key): JSON, one raw image or clip as the
body, or several as the `image` or `audio` files of a multipart form (no base64: a third
fewer bytes, no decode). `service/predict_path.py` answers it in front of the framework with
`answer_predict`; the route here declares it for the API document."""

from __future__ import annotations

import json
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters.store import Tenant
from graft.schemas import PredictOptions, PredictRequest, PredictResponse
from service.api.bodies import JSON, MULTIPART, read_body
from service.api.document import BINARY, ERRORS, json_schema, request_body
from service.auth import AppDep, CurrentTenant
from service.core import Application
from service.errors import BadInput, PayloadTooLarge, Unprocessable
from service.inputs import RawInput

router = APIRouter(prefix="/heads", tags=["heads"])

IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp")
# The names browsers and tools give WAV, FLAC, OGG and MP3 bodies.
AUDIO_TYPES = (
    "audio/wav",
    "audio/x-wav",
    "audio/wave",
    "audio/flac",
    "audio/x-flac",
    "audio/ogg",
    "audio/mpeg",
)


async def _predict_inputs(
    request: Request, max_inputs: int, query: PredictOptions
) -> tuple[list[RawInput], PredictOptions]:
    """The inputs of a predict body, and its options: a JSON body carries its own, image
    and audio bodies take those of the query."""

    async def from_json(request: Request) -> tuple[list[RawInput], PredictOptions]:
        # Python's parser, as FastAPI's own: a lone surrogate escape is valid JSON, and
        # then refused as text (422 invalid_text), where pydantic's parser says 400.
        try:
            payload = json.loads(await request.body())
        except ValueError:  # JSONDecodeError and UnicodeDecodeError
            raise BadInput("the request body is not valid JSON", code="invalid_json") from None
        body = PredictRequest.model_validate(payload)
        return [RawInput.from_json(x.image, x.text, x.audio) for x in body.inputs], body

    async def from_image(request: Request) -> tuple[list[RawInput], PredictOptions]:
        return [RawInput("image", await request.body())], query

    async def from_audio(request: Request) -> tuple[list[RawInput], PredictOptions]:
        return [RawInput("audio", await request.body())], query

    async def from_form(request: Request) -> tuple[list[RawInput], PredictOptions]:
        try:
            # One file more than allowed, so that too many is the same 413 as in JSON.
            form = await request.form(max_files=max_inputs + 1, max_fields=8)
        except StarletteHTTPException as exc:
            if "Too many files" in str(exc.detail):
                raise PayloadTooLarge(
                    f"over {max_inputs} inputs; at most {max_inputs} per call",
                    code="too_many_inputs",
                ) from None
            raise
        kinds = set(form)
        kind = next(iter(kinds)) if len(kinds) == 1 else None
        files = form.getlist(kind) if kind in ("image", "audio") else []
        if not files or not all(isinstance(f, UploadFile) for f in files):
            raise Unprocessable(
                "a multipart predict takes image files named 'image', or audio files named"
                " 'audio', only"
            )
        return [RawInput(kind, await f.read()) for f in files], query  # type: ignore[arg-type, union-attr]

    readers = {
        JSON: from_json,
        **dict.fromkeys(IMAGE_TYPES, from_image),
        **dict.fromkeys(AUDIO_TYPES, from_audio),
        MULTIPART: from_form,
    }
    return await read_body(request, readers)


async def answer_predict(
    request: Request, graft: Application, tenant: Tenant, head_id: str, query: PredictOptions
) -> JSONResponse:
    """The predict route's work, for the route below and for `service/predict_path.py`,
    which serves it in front of the framework."""
    inputs, options = await _predict_inputs(request, graft.settings.max_predict_inputs, query)
    head, ranked, similarity = await graft.predict(tenant, head_id, inputs, options.top_k)
    unknown = head.unknown(similarity)
    # Answered as built: the route's schema documents it, and validating every answer
    # against it again would cost the hot path for nothing.
    return JSONResponse(
        {
            "head_id": head.id,
            "version": head.version,
            "predictions": [
                {
                    "label": None if options.reject_unknown and is_unknown else row[0][0],
                    "score": row[0][1],
                    "unknown": bool(is_unknown),
                    "similarity": None if np.isnan(sim) else round(float(sim), 4),
                    "top_k": [{"label": label, "score": score} for label, score in row],
                }
                for row, sim, is_unknown in zip(ranked, similarity, unknown, strict=True)
            ],
        }
    )


@router.post(
    "/{head_id}/predict",
    response_model=PredictResponse,
    responses={**ERRORS, 503: ERRORS[400]},
    openapi_extra=request_body(
        {
            JSON: json_schema(PredictRequest),
            **dict.fromkeys(IMAGE_TYPES, BINARY),
            **dict.fromkeys(AUDIO_TYPES, BINARY),
            MULTIPART: {
                "type": "object",
                "additionalProperties": False,
                "minProperties": 1,
                "maxProperties": 1,
                "properties": {
                    kind: {"type": "array", "items": BINARY, "minItems": 1}
                    for kind in ("image", "audio")
                },
            },
        }
    ),
)
async def predict(
    head_id: str,
    request: Request,
    tenant: CurrentTenant,
    graft: AppDep,
    query: Annotated[PredictOptions, Query()],
) -> JSONResponse:
    """Predict with JSON (`inputs`: base64 images or clips, or texts, and the options), one
    raw image or clip as the body (image/jpeg, image/png, image/webp; audio/wav,
    audio/flac, audio/ogg, audio/mpeg), or several as multipart `image` or `audio` files
    (the options as query parameters)."""
    return await answer_predict(request, graft, tenant, head_id, query)
