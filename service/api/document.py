"""The API document's own parts: the error answers every route declares, the bodies of
routes that read their request themselves, and what FastAPI does not write (the nested
schemas of those bodies; links from a create to what it created)."""

from __future__ import annotations

from pydantic import BaseModel

from graft.schemas import ErrorResponse, HeadPublic

ERRORS: dict[int | str, dict] = {
    status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 409, 413, 415, 422, 429)
}
ERRORS[429]["headers"] = {
    "Retry-After": {
        "description": "seconds until a request is let through",
        "schema": {"type": "integer"},
    }
}
# The answers of a route that trains: 202 while it still trains.
TRAINING_ERRORS = {**ERRORS, 202: {"model": HeadPublic, "description": "still training; poll"}}
BINARY = {"type": "string", "format": "binary"}

# Routes that read their body themselves (JSON, multipart or bytes) declare its schema
# here; the models nested in it become components of the document (`complete`).
_NESTED_SCHEMAS: dict[str, dict] = {}
# What a create answers, and which path parameter its `id` fills.
_CREATES = {
    ("/tenants", "post"): ("tenant_id", ("201",)),
    ("/heads", "post"): ("head_id", ("201", "202")),
}


def json_schema(model: type[BaseModel]) -> dict:
    """`model`'s schema for a request body; its nested models go to the components."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    _NESTED_SCHEMAS.update(schema.pop("$defs", {}))
    return schema


def request_body(schemas: dict[str, dict]) -> dict:
    """`openapi_extra` declaring a required body: a schema per media type."""
    content = {media: {"schema": schema} for media, schema in schemas.items()}
    return {"requestBody": {"required": True, "content": content}}


def complete(document: dict) -> None:
    """Adds what FastAPI leaves out: the nested schemas of the bodies above, and OpenAPI
    links from each create's answer to every operation on what it created, so that
    clients and fuzzers (schemathesis's stateful phase) can follow them."""
    for name, schema in _NESTED_SCHEMAS.items():
        document["components"]["schemas"].setdefault(name, schema)
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
