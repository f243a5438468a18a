"""REST API v1, mounted by the BentoML service at /v1. Routes parse, authenticate, call
`Graft`, and shape the answer; the work happens in `service/core.py`."""

from __future__ import annotations

import json
from typing import Annotated

import numpy as np
from fastapi import APIRouter, FastAPI, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse
from fastapi.routing import APIRoute
from prometheus_client import CollectorRegistry
from pydantic import BaseModel
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters.store import Head, Tenant
from models.quantize import Variant
from service.archive import examples_from_zip, inputs_from_zip
from service.auth import AdminOnly, CurrentTenant, GraftDep
from service.core import Graft
from service.errors import (
    BadInput,
    MethodNotAllowed,
    PayloadTooLarge,
    Unprocessable,
    UnsupportedMediaType,
    install_error_handlers,
)
from service.errors import NotFound as NotFoundError
from service.inputs import RawInput
from service.limits import BodySizeLimit
from service.metrics import RequestMetrics, RouteMetrics, render
from service.schemas import (
    BackboneList,
    BackbonePublic,
    ErrorResponse,
    ExamplesAdd,
    HeadCreate,
    HeadList,
    HeadPublic,
    HeadSpec,
    PredictOptions,
    PredictRequest,
    PredictResponse,
    ServingStats,
    TenantCreate,
    TenantCreated,
    TenantKey,
    TenantList,
    UnlabeledAdd,
)
from service.training import AUTO_BACKBONE

ERRORS = {
    status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 409, 413, 415, 422, 429)
}
ERRORS[429]["headers"] = {
    "Retry-After": {
        "description": "seconds until a request is let through",
        "schema": {"type": "integer"},
    }
}

tenants = APIRouter(prefix="/tenants", tags=["tenants (admin)"], dependencies=[AdminOnly])
operations = APIRouter(prefix="/stats", tags=["operations (admin)"], dependencies=[AdminOnly])
backbones = APIRouter(prefix="/backbones", tags=["backbones"])
heads = APIRouter(prefix="/heads", tags=["heads"])
ROUTERS = (tenants, operations, backbones, heads)


# Tenants (admin key) -----------------------------------------------------------------


@tenants.post("", status_code=201, response_model=TenantCreated, responses=ERRORS)
def create_tenant(body: TenantCreate, graft: GraftDep) -> dict:
    tenant, api_key = graft.store.create_tenant(name=body.name)
    return {**tenant.public(), "api_key": api_key}


@tenants.get("", response_model=TenantList, responses=ERRORS)
def list_tenants(graft: GraftDep) -> dict:
    return {"tenants": [t.public() for t in graft.store.list_tenants()]}


@tenants.delete("/{tenant_id}", status_code=204, responses=ERRORS)
def delete_tenant(tenant_id: str, graft: GraftDep) -> Response:
    graft.delete_tenant(tenant_id)
    return Response(status_code=204)


@tenants.post("/{tenant_id}/key", response_model=TenantKey, responses=ERRORS)
def rotate_key(tenant_id: str, graft: GraftDep) -> dict:
    """Issue the tenant a new API key; the old one is refused from now on."""
    return {"id": tenant_id, "api_key": graft.rotate_key(tenant_id)}


@operations.get("", response_model=ServingStats, responses=ERRORS)
def serving_stats(graft: GraftDep) -> dict:
    """What the predict path holds and does: the head cache and the batchers."""
    return graft.stats()


# Backbones (public) --------------------------------------------------------------------


@backbones.get("", response_model=BackboneList)
def list_backbones(graft: GraftDep) -> dict:
    return {"backbones": [graft.backbone_public(backbone_id) for backbone_id in graft.backbones]}


@backbones.get("/{backbone_id}", response_model=BackbonePublic, responses=ERRORS)
def get_backbone(backbone_id: str, graft: GraftDep) -> dict:
    graft.backbone_spec(backbone_id)  # 404 for an unknown id
    return graft.backbone_public(backbone_id)


@backbones.get("/{backbone_id}/tokenizer.json", responses=ERRORS)
def get_tokenizer(backbone_id: str, graft: GraftDep) -> FileResponse:
    """The tokenizer (Hugging Face `tokenizers` JSON) that makes a text model's inputs."""
    spec = graft.backbone_spec(backbone_id)
    tokenizer_file = getattr(spec.preprocessing, "tokenizer_file", None)
    if tokenizer_file is None:
        raise NotFoundError(f"backbone {backbone_id} takes images", code="no_tokenizer")
    return FileResponse(tokenizer_file(), media_type="application/json")


# Heads (tenant key) ----------------------------------------------------------------------

# Routes that read their body themselves (JSON, multipart or bytes) declare its schema
# here; the models nested in it become components of the document (see create_app).
_NESTED_SCHEMAS: dict[str, dict] = {}


def _json_body(model: type[BaseModel]) -> dict:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    _NESTED_SCHEMAS.update(schema.pop("$defs", {}))
    return schema


_HEAD_CREATE_JSON = _json_body(HeadCreate)
_HEAD_SPEC_FORM = _json_body(HeadSpec)
_HEAD_CREATE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": _HEAD_CREATE_JSON},
            "multipart/form-data": {
                # The form's fields are HeadSpec's, checked by it, and the zip.
                "schema": {
                    **_HEAD_SPEC_FORM,
                    "required": [*_HEAD_SPEC_FORM["required"], "archive"],
                    "additionalProperties": False,
                    "properties": {
                        **_HEAD_SPEC_FORM["properties"],
                        "archive": {
                            "type": "string",
                            "format": "binary",
                            "description": "zip with one folder per label",
                        },
                    },
                }
            },
        },
    }
}


def _head_answer(head: Head, done_status: int) -> JSONResponse:
    """201/200 when the head is trained within the request, 202 while it still trains."""
    status = 202 if head.status == "training" else done_status
    # Through the response schema, so the answer has the same fields as GET /heads/{id}.
    body = HeadPublic.model_validate(head.public()).model_dump(mode="json")
    return JSONResponse(body, status_code=status)


def _examples(items) -> list[tuple[str, RawInput]]:
    return [(e.label, RawInput.from_json(e.image, e.text)) for e in items]


@heads.post(
    "",
    status_code=201,
    response_model=HeadPublic,
    responses={**ERRORS, 202: {"model": HeadPublic, "description": "still training; poll"}},
    openapi_extra=_HEAD_CREATE_BODY,
)
async def create_head(request: Request, tenant: CurrentTenant, graft: GraftDep) -> JSONResponse:
    """Create a head from labelled examples, as JSON or as a zip (multipart/form-data)."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form(max_files=1, max_fields=10)
        archive = form.get("archive")
        if not isinstance(archive, UploadFile):
            raise Unprocessable("multipart form needs a zip file 'archive'")
        body = HeadSpec.model_validate({k: v for k, v in form.items() if k != "archive"})
        modality = (
            "image" if body.backbone == AUTO_BACKBONE else graft.backbone(body.backbone).modality
        )
        data = await archive.read()
        examples = await run_in_threadpool(examples_from_zip, data, modality, graft.settings)
        descriptions: dict[str, str] = {}
    elif content_type.startswith("application/json") or not content_type:
        body = HeadCreate.model_validate_json(await request.body())
        examples = _examples(body.examples)
        descriptions = body.label_descriptions
    else:
        raise UnsupportedMediaType(
            f"content type {content_type!r}: send application/json or multipart/form-data"
        )
    head = await run_in_threadpool(
        graft.create_head,
        tenant,
        name=body.name,
        backbone_id=body.backbone,
        examples=examples,
        label_descriptions=descriptions,
        fine_tune=body.fine_tune,
    )
    return _head_answer(head, 201)


@heads.get("", response_model=HeadList, responses=ERRORS)
def list_heads(tenant: CurrentTenant, graft: GraftDep) -> dict:
    return {"heads": [h.public() for h in graft.store.list_heads(tenant_id=tenant.id)]}


@heads.get("/{head_id}", response_model=HeadPublic, responses=ERRORS)
def get_head(head_id: str, tenant: CurrentTenant, graft: GraftDep) -> dict:
    return graft.get_head(tenant, head_id).public()


@heads.delete("/{head_id}", status_code=204, responses=ERRORS)
def delete_head(head_id: str, tenant: CurrentTenant, graft: GraftDep) -> Response:
    graft.delete_head(tenant, head_id)
    return Response(status_code=204)


@heads.post(
    "/{head_id}/examples",
    response_model=HeadPublic,
    responses={**ERRORS, 202: {"model": HeadPublic, "description": "still training; poll"}},
)
def add_examples(
    head_id: str, body: ExamplesAdd, tenant: CurrentTenant, graft: GraftDep
) -> JSONResponse:
    """Add examples and retrain on all of the head's examples; the version goes up by one."""
    head = graft.add_examples(tenant, head_id, _examples(body.examples))
    return _head_answer(head, 200)


_UNLABELED_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": _json_body(UnlabeledAdd)},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["archive"],
                    "additionalProperties": False,
                    "properties": {
                        "archive": {
                            "type": "string",
                            "format": "binary",
                            "description": "zip of images (or UTF-8 text files, one example"
                            " each), in any folders",
                        }
                    },
                }
            },
        },
    }
}


@heads.post(
    "/{head_id}/unlabeled",
    response_model=HeadPublic,
    responses={**ERRORS, 202: {"model": HeadPublic, "description": "still training; poll"}},
    openapi_extra=_UNLABELED_BODY,
)
async def add_unlabeled(
    head_id: str, request: Request, tenant: CurrentTenant, graft: GraftDep
) -> JSONResponse:
    """Add unlabelled examples of the domain the head will serve, as JSON or as a zip
    (multipart/form-data), and retrain: the next version is adapted to that domain where
    that looks helpful, and `metrics.domain` says how far it lies and how well the head is
    expected to do there."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form(max_files=1, max_fields=1)
        archive = form.get("archive")
        if not isinstance(archive, UploadFile) or set(form) != {"archive"}:
            raise Unprocessable("multipart form needs a zip file 'archive', only")
        head = await run_in_threadpool(graft.get_head, tenant, head_id)
        modality = graft.chosen_backbone(head).modality
        data = await archive.read()
        inputs = await run_in_threadpool(inputs_from_zip, data, modality, graft.settings)
    elif content_type.startswith("application/json") or not content_type:
        body = UnlabeledAdd.model_validate_json(await request.body())
        inputs = [RawInput.from_json(x.image, x.text) for x in body.examples]
    else:
        raise UnsupportedMediaType(
            f"content type {content_type!r}: send application/json or multipart/form-data"
        )
    head = await run_in_threadpool(graft.add_unlabeled, tenant, head_id, inputs)
    return _head_answer(head, 200)


# Predict takes JSON, or the image bytes themselves: one image as the body, or several as
# the `image` files of a multipart form (no base64: a third fewer bytes, no decode).
IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp")
_BINARY = {"type": "string", "format": "binary"}
_PREDICT_JSON = _json_body(PredictRequest)
_PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": _PREDICT_JSON},
            **{media: {"schema": _BINARY} for media in IMAGE_TYPES},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "additionalProperties": False,
                    "properties": {"image": {"type": "array", "items": _BINARY, "minItems": 1}},
                }
            },
        },
    }
}


async def _predict_inputs(
    request: Request, max_inputs: int, query: PredictOptions
) -> tuple[list[RawInput], PredictOptions]:
    """The inputs of a predict body, and its options: a JSON body carries its own, image
    bodies take those of the query."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type in IMAGE_TYPES:
        return [RawInput("image", await request.body())], query
    if content_type == "multipart/form-data":
        try:
            # One file more than allowed, so that too many is the same 413 as in JSON.
            form = await request.form(max_files=max_inputs + 1, max_fields=8)
        except StarletteHTTPException as exc:
            if "Too many files" in str(exc.detail):
                raise PayloadTooLarge(
                    f"over {max_inputs} images; at most {max_inputs} per call",
                    code="too_many_inputs",
                ) from None
            raise
        files = form.getlist("image")
        if not files or set(form) != {"image"} or not all(isinstance(f, UploadFile) for f in files):
            raise Unprocessable("a multipart predict takes image files named 'image', only")
        return [RawInput("image", await f.read()) for f in files], query
    if content_type in ("application/json", ""):
        # Python's parser, as FastAPI's own: a lone surrogate escape is valid JSON, and
        # then refused as text (422 invalid_text), where pydantic's parser says 400.
        try:
            payload = json.loads(await request.body())
        except ValueError:  # JSONDecodeError and UnicodeDecodeError
            raise BadInput("the request body is not valid JSON", code="invalid_json") from None
        body = PredictRequest.model_validate(payload)
        return [RawInput.from_json(x.image, x.text) for x in body.inputs], body
    raise UnsupportedMediaType(
        f"content type {content_type!r}: send application/json, {', '.join(IMAGE_TYPES)}"
        " or multipart/form-data"
    )


async def answer_predict(
    request: Request, graft: Graft, tenant: Tenant, head_id: str, query: PredictOptions
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


# Declared here for the API document; requests are answered by `service/predict_path.py`
# with the same function, in front of the framework's layers (BENCHMARKS.md).
@heads.post(
    "/{head_id}/predict",
    response_model=PredictResponse,
    responses={**ERRORS, 503: ERRORS[400]},
    openapi_extra=_PREDICT_BODY,
)
async def predict(
    head_id: str,
    request: Request,
    tenant: CurrentTenant,
    graft: GraftDep,
    query: Annotated[PredictOptions, Query()],
) -> JSONResponse:
    """Predict with JSON (`inputs`: base64 images or texts, and the options), one raw image
    as the body (image/jpeg, image/png, image/webp), or several as multipart `image` files
    (the options as query parameters)."""
    return await answer_predict(request, graft, tenant, head_id, query)


@heads.get(
    "/{head_id}/model.onnx",
    responses={
        **ERRORS,
        200: {
            "content": {"application/octet-stream": {}},
            "headers": {
                "Content-Disposition": {"schema": {"type": "string"}},
                "X-Graft-Head-Version": {
                    "description": "the head version in the model",
                    "schema": {"type": "integer"},
                },
            },
        },
    },
    response_class=Response,
)
def download_onnx(
    head_id: str,
    tenant: CurrentTenant,
    graft: GraftDep,
    variant: Variant | None = None,
) -> Response:
    """Backbone + head as one ONNX model; labels and preprocessing in its metadata.
    `variant=int8` gives the quantised backbone (default: the variant this service runs)."""
    head, model = graft.export_onnx(tenant, head_id, variant)
    return Response(
        model,
        media_type="application/octet-stream",
        headers={
            "Content-Disposition": f'attachment; filename="{head.id}-v{head.version}.onnx"',
            "X-Graft-Head-Version": str(head.version),
        },
    )


# What a create answers, and which path parameter its `id` fills.
_CREATES = {
    ("/tenants", "post"): ("tenant_id", ("201",)),
    ("/heads", "post"): ("head_id", ("201", "202")),
}


def _link_created(document: dict) -> None:
    """OpenAPI links from each create's answer to every operation on what it created, so
    that clients and fuzzers (schemathesis's stateful phase) can follow them."""
    paths = document["paths"]
    for (path, method), (parameter, statuses) in _CREATES.items():
        links = {
            operation["operationId"]: {
                "operationId": operation["operationId"],
                "parameters": {parameter: "$response.body#/id"},
            }
            for other, item in paths.items()
            if f"{{{parameter}}}" in other
            for operation in item.values()
        }
        for status in statuses:
            paths[path][method]["responses"][status]["links"] = links


def create_app(max_body_bytes: int) -> FastAPI:
    app = FastAPI(
        title="Graft",
        version="1",
        description="Per-tenant heads on shared frozen backbones. "
        'Errors: `{"error": {"code", "message"}}`.',
    )
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    # The application object (service/core.py) publishes its head cache here too.
    registry = app.state.metrics_registry = CollectorRegistry()
    app.state.route_metrics = RouteMetrics(registry)
    app.add_middleware(RequestMetrics, metrics=app.state.route_metrics)
    for router in ROUTERS:
        app.include_router(router)

    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            document = generate()
            for name, schema in _NESTED_SCHEMAS.items():
                document["components"]["schemas"].setdefault(name, schema)
            _link_created(document)
        return app.openapi_schema

    app.openapi = openapi

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        """Prometheus text format: requests and latency by route template."""
        body, content_type = render(registry)
        return Response(body, media_type=content_type)

    # BentoML mounts this app "passively": a path no route matches would fall through to
    # BentoML's plain-text 404. This last route keeps every /v1 answer in the JSON shape:
    # 405 with the methods the path has (Allow), or 404 for a path the API does not have.
    routes = [r for router in ROUTERS for r in router.routes if isinstance(r, APIRoute)]

    @app.api_route(
        "/{path:path}",
        methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE"],
        include_in_schema=False,
    )
    def no_such_route(path: str, request: Request) -> None:
        allowed = {m for r in routes if r.path_regex.match(f"/{path}") for m in r.methods}
        if allowed:
            raise MethodNotAllowed(
                f"{request.method} is not a method of /v1/{path}; it takes"
                f" {', '.join(sorted(allowed))}",
                headers={"Allow": ", ".join(sorted(allowed))},
            )
        raise NotFoundError(f"no route for {request.method} /v1/{path}; see /v1/docs")

    return app
