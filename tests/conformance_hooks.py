"""schemathesis's hooks for tests/test_e2e_conformance.py (loaded by SCHEMATHESIS_HOOKS).

schemathesis's `positive_data_acceptance` fails any 4xx answer to a request the document
calls valid. Graft also refuses requests for what no schema can say: an image field
that is base64 of bytes that are no photo, a head with one label, a zip that is not a
zip. Those refusals carry their own codes (`invalid_image`, `too_few_labels`, …). This
check fails exactly the disagreements between the document and the server: a request
the document calls valid refused for its shape (`invalid_request`, `invalid_json`, or
the form parser's `bad_request`), or for its media type.
"""

from __future__ import annotations

import schemathesis

# The codes that say "this request is not of the documented shape".
SHAPE_CODES = {"invalid_request", "invalid_json", "bad_request", "unsupported_media_type"}


@schemathesis.check
def schema_valid_request_refused_for_its_shape(ctx, response, case) -> bool | None:
    if case.meta is None or not case.meta.generation.mode.is_positive:
        return None
    if response.status_code not in (400, 415, 422):
        return None
    try:
        code = response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = None
    if code in SHAPE_CODES:
        raise AssertionError(
            f"the document calls this request valid; the server refused its shape ({code})"
        )
    return None
