"""/v1/heads (tenant key): a tenant's heads, created from examples, grown, adapted to
their domain, read, exported and deleted. Predictions: `service/api/predict.py`."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from adapters.store import Head
from graft.schemas import (
    ExamplesAdd,
    HeadCreate,
    HeadList,
    HeadPublic,
    HeadSpec,
    UnlabeledAdd,
)
from models.quantize import Variant
from service.api.bodies import JSON, MULTIPART, archive_form, read_body
from service.api.document import BINARY, ERRORS, TRAINING_ERRORS, json_schema, request_body
from service.archive import examples_from_zip, inputs_from_zip
from service.auth import AppDep, CurrentTenant
from service.errors import Unprocessable
from service.inputs import RawInput
from service.training import AUTO_BACKBONE

router = APIRouter(prefix="/heads", tags=["heads"])

_HEAD_SPEC_FORM = json_schema(HeadSpec)
_ARCHIVE = {**BINARY, "description": "zip with one folder per label"}
_UNLABELED_ARCHIVE = {
    **BINARY,
    "description": "zip of images (or UTF-8 text files, one example each, or audio clips),"
    " in any folders",
}


def _head_answer(head: Head, done_status: int) -> JSONResponse:
    """201/200 when the head is trained within the request, 202 while it still trains."""
    status = 202 if head.status == "training" else done_status
    # Through the response schema, so the answer has the same fields as GET /heads/{id}.
    body = HeadPublic.model_validate(head.public()).model_dump(mode="json")
    return JSONResponse(body, status_code=status)


def _examples(items) -> list[tuple[str, RawInput]]:
    return [(e.label, RawInput.from_json(e.image, e.text, e.audio)) for e in items]


@router.post(
    "",
    status_code=201,
    response_model=HeadPublic,
    responses=TRAINING_ERRORS,
    openapi_extra=request_body(
        {
            JSON: json_schema(HeadCreate),
            # The form's fields are HeadSpec's, checked by it, and the zip.
            MULTIPART: {
                **_HEAD_SPEC_FORM,
                "required": [*_HEAD_SPEC_FORM["required"], "archive"],
                "additionalProperties": False,
                "properties": {**_HEAD_SPEC_FORM["properties"], "archive": _ARCHIVE},
            },
        }
    ),
)
async def create_head(request: Request, tenant: CurrentTenant, graft: AppDep) -> JSONResponse:
    """Create a head from labelled examples, as JSON or as a zip (multipart/form-data)."""

    async def from_json(request: Request) -> tuple[HeadSpec, list, dict[str, str]]:
        body = HeadCreate.model_validate_json(await request.body())
        return body, _examples(body.examples), body.label_descriptions

    async def from_zip(request: Request) -> tuple[HeadSpec, list, dict[str, str]]:
        data, fields = await archive_form(request, max_fields=10)
        spec = HeadSpec.model_validate(fields)
        backbone = graft.backbone(spec.backbone) if spec.backbone != AUTO_BACKBONE else None
        modality = backbone.modality if backbone is not None else None
        examples = await run_in_threadpool(examples_from_zip, data, modality, graft.settings)
        return spec, examples, {}

    body, examples, descriptions = await read_body(request, {JSON: from_json, MULTIPART: from_zip})
    head = await run_in_threadpool(
        graft.create_head,
        tenant,
        name=body.name,
        backbone_id=body.backbone,
        examples=examples,
        label_descriptions=descriptions,
        fine_tune=body.fine_tune,
        unknown_keep=body.unknown_keep,
    )
    return _head_answer(head, 201)


@router.get("", response_model=HeadList, responses=ERRORS)
def list_heads(tenant: CurrentTenant, graft: AppDep) -> dict:
    return {"heads": [h.public() for h in graft.store.list_heads(tenant_id=tenant.id)]}


@router.get("/{head_id}", response_model=HeadPublic, responses=ERRORS)
def get_head(head_id: str, tenant: CurrentTenant, graft: AppDep) -> dict:
    return graft.get_head(tenant, head_id).public()


@router.delete("/{head_id}", status_code=204, responses=ERRORS)
def delete_head(head_id: str, tenant: CurrentTenant, graft: AppDep) -> Response:
    graft.delete_head(tenant, head_id)
    return Response(status_code=204)


@router.post("/{head_id}/examples", response_model=HeadPublic, responses=TRAINING_ERRORS)
def add_examples(
    head_id: str, body: ExamplesAdd, tenant: CurrentTenant, graft: AppDep
) -> JSONResponse:
    """Add examples and retrain on all of the head's examples; the version goes up by one."""
    head = graft.add_examples(tenant, head_id, _examples(body.examples))
    return _head_answer(head, 200)


@router.post(
    "/{head_id}/unlabeled",
    response_model=HeadPublic,
    responses=TRAINING_ERRORS,
    openapi_extra=request_body(
        {
            JSON: json_schema(UnlabeledAdd),
            MULTIPART: {
                "type": "object",
                "required": ["archive"],
                "additionalProperties": False,
                "properties": {"archive": _UNLABELED_ARCHIVE},
            },
        }
    ),
)
async def add_unlabeled(
    head_id: str, request: Request, tenant: CurrentTenant, graft: AppDep
) -> JSONResponse:
    """Add unlabelled examples of the domain the head will serve, as JSON or as a zip
    (multipart/form-data), and retrain: the next version is adapted to that domain where
    that looks helpful, and `metrics.domain` says how far it lies and how well the head is
    expected to do there."""

    async def from_json(request: Request) -> list[RawInput]:
        body = UnlabeledAdd.model_validate_json(await request.body())
        return [RawInput.from_json(x.image, x.text, x.audio) for x in body.examples]

    async def from_zip(request: Request) -> list[RawInput]:
        data, fields = await archive_form(request, max_fields=1)
        if fields:
            raise Unprocessable("multipart form needs a zip file 'archive', only")
        head = await run_in_threadpool(graft.get_head, tenant, head_id)
        modality = graft.chosen_backbone(head).modality
        return await run_in_threadpool(inputs_from_zip, data, modality, graft.settings)

    inputs = await read_body(request, {JSON: from_json, MULTIPART: from_zip})
    head = await run_in_threadpool(graft.add_unlabeled, tenant, head_id, inputs)
    return _head_answer(head, 200)


@router.get(
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
    graft: AppDep,
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
