"""What every body shares: the strict base, the error body, names and labels."""

from __future__ import annotations

import unicodedata
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


class Strict(BaseModel):
    """A request body: a field it does not define is refused, not ignored."""

    model_config = ConfigDict(extra="forbid")


class ErrorDetail(BaseModel):
    code: str = Field(examples=["head_not_found"])
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


def holds_control_characters(text: str) -> bool:
    """Control characters (NUL among them, which PostgreSQL cannot store) or lone
    surrogates (not UTF-8): refused in names and labels."""
    return any(unicodedata.category(c) in ("Cc", "Cs") for c in text)


def _printable(text: str) -> str:
    if holds_control_characters(text):
        raise ValueError("must not hold control characters")
    return text


# Patterns that say in the document what the server checks: no control characters
# (`_printable`, and labels in service/inputs.check_labels), and for a label some non-space.
_CONTROL = "\\u0000-\\u001f\\u007f-\\u009f"
Name = Annotated[
    str,
    Field(min_length=1, max_length=200, json_schema_extra={"pattern": f"^[^{_CONTROL}]*$"}),
    AfterValidator(_printable),
]
Label = Annotated[
    str,
    Field(
        min_length=1,
        json_schema_extra={
            "maxLength": 200,  # GRAFT_MAX_LABEL_CHARS's default
            "pattern": f"^[^{_CONTROL}]*[^\\s{_CONTROL}][^{_CONTROL}]*$",
        },
    ),
]


FineTuneMode = Literal["auto", "on", "off"]
