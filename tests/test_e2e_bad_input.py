"""Bad input gets a clear 4xx in the documented shape; the server stays healthy and
nothing already stored changes."""

from __future__ import annotations

import io
import zipfile

import pytest
from PIL import Image

from tests.inputs import assert_error, b64, crops, image_examples, text_examples

pytestmark = pytest.mark.e2e


def _png(width: int, height: int, mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


def _gif() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buffer, "GIF")
    return buffer.getvalue()


def _zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


JPEG = crops("china.jpg", 1, seed=3)[0]
IMAGE = "efficientnet_lite0"


def _create(examples, backbone=IMAGE) -> dict:
    return {"name": "bad", "backbone": backbone, "examples": examples}


def _image(data: bytes, label: str = "a") -> dict:
    return {"label": label, "image": b64(data)}


# (description, JSON body for POST /v1/heads, status, error code)
BAD_CREATES = [
    ("random bytes", [_image(b"\x00\x01garbage" * 50), _image(JPEG, "b")], 422, "invalid_image"),
    ("truncated jpeg", [_image(JPEG[: len(JPEG) // 3]), _image(JPEG, "b")], 422, "invalid_image"),
    (
        "text as image",
        [_image(b"hello, I am not a picture"), _image(JPEG, "b")],
        422,
        "invalid_image",
    ),
    ("gif", [_image(_gif()), _image(JPEG, "b")], 422, "unsupported_image_format"),
    ("zero bytes", [_image(b""), _image(JPEG, "b")], 422, "invalid_image"),
    ("absurd size", [_image(_png(5000, 5000)), _image(JPEG, "b")], 413, "image_too_large"),
    ("not base64", [{"label": "a", "image": "@@@"}, _image(JPEG, "b")], 422, "invalid_base64"),
    ("text to image backbone", text_examples(2), 422, "wrong_modality"),
    ("one label only", [_image(JPEG), _image(JPEG[:-1] + b"\xd9")], 422, "too_few_labels"),
    ("empty examples", [], 422, "invalid_request"),
    ("blank label", [_image(JPEG, " "), _image(JPEG, "b")], 422, "invalid_label"),
    (
        "both image and text",
        [{"label": "a", "image": b64(JPEG), "text": "x"}],
        422,
        "invalid_request",
    ),
    ("missing label", [{"image": b64(JPEG)}], 422, "invalid_request"),
]

TEXTS = text_examples(3)
# (description, label_descriptions, backbone, error code): all 422.
BAD_DESCRIPTIONS = [
    ("for an image backbone", {"a": "a temple"}, IMAGE, "invalid_label_descriptions"),
    (
        "of a label with no examples",
        {"chess": "board games"},
        "minilm_l6",
        "invalid_label_descriptions",
    ),
    ("blank", {"sports": "  "}, "minilm_l6", "invalid_request"),
    ("too long", {"sports": "s" * 501}, "minilm_l6", "invalid_request"),
    ("not a string", {"sports": 3}, "minilm_l6", "invalid_request"),
    ("not an object", ["sports"], "minilm_l6", "invalid_request"),
]


@pytest.fixture(scope="module")
def tenant(server):
    with server.new_tenant("bad-input") as client:
        yield client


@pytest.fixture(scope="module")
def stored(tenant) -> dict:
    """A head that must come through every bad request untouched."""
    response = tenant.post(
        "/v1/heads", json={**_create(image_examples(3, seed=8)), "name": "stored"}
    )
    assert response.status_code == 201, response.text
    return response.json()


@pytest.mark.parametrize(
    ("what", "examples", "status", "code"), BAD_CREATES, ids=[c[0] for c in BAD_CREATES]
)
def test_bad_head_creation(tenant, stored, what, examples, status, code) -> None:
    assert_error(tenant.post("/v1/heads", json=_create(examples)), status, code)


@pytest.mark.parametrize(
    ("what", "descriptions", "backbone", "code"),
    BAD_DESCRIPTIONS,
    ids=[c[0] for c in BAD_DESCRIPTIONS],
)
def test_bad_label_descriptions(tenant, stored, what, descriptions, backbone, code) -> None:
    examples = TEXTS if backbone == "minilm_l6" else image_examples(2, seed=4)
    body = {**_create(examples, backbone), "label_descriptions": descriptions}
    assert_error(tenant.post("/v1/heads", json=body), 422, code)


def test_bad_requests_of_every_kind(server, tenant, stored) -> None:
    head = f"/v1/heads/{stored['id']}"
    text_head = tenant.post(
        "/v1/heads", json={"name": "t", "backbone": "minilm_l6", "examples": text_examples(2)}
    ).json()["id"]
    text_head = f"/v1/heads/{text_head}"
    cases = [
        (
            tenant.post("/v1/heads", json=_create(image_examples(1, seed=1), "resnet_9000")),
            422,
            "unknown_backbone",
        ),
        (
            tenant.post("/v1/heads", json={**_create(image_examples(1, seed=1)), "extra": 1}),
            422,
            "invalid_request",
        ),
        (tenant.post("/v1/heads", json={"name": "x"}), 422, "invalid_request"),
        # NUL cannot be stored by PostgreSQL: refused in every name, on both engines.
        (
            tenant.post("/v1/heads", json={**_create(image_examples(1, seed=1)), "name": "a\x00"}),
            422,
            "invalid_request",
        ),
        (
            server.admin().post("/v1/tenants", json={"name": "t\x00"}),
            422,
            "invalid_request",
        ),
        (
            tenant.post(
                "/v1/heads", content=b"{not json", headers={"content-type": "application/json"}
            ),
            400,
            "invalid_json",
        ),
        (
            tenant.post(
                "/v1/heads",
                json=_create(
                    [{"label": "a", "text": "x"}] * 2 + [{"label": "b", "text": "y"}], "minilm_l6"
                )
                | {"examples": [{"label": "a", "text": "x" * 2001}, {"label": "b", "text": "y"}]},
            ),
            413,
            "text_too_long",
        ),
        (
            tenant.post(
                "/v1/heads",
                json=_create(
                    [{"label": "a", "text": "   "}, {"label": "b", "text": "y"}], "minilm_l6"
                ),
            ),
            422,
            "empty_text",
        ),
        (
            tenant.post("/v1/heads", json=_create([_image(JPEG, "x" * 500), _image(JPEG, "b")])),
            422,
            "invalid_label",
        ),
        # The body limit of the test server is 6 MiB.
        (
            tenant.post(
                "/v1/heads",
                json=_create([_image(b"\xff" * (5 * 1024 * 1024), "a"), _image(JPEG, "b")]),
            ),
            413,
            "payload_too_large",
        ),
        (tenant.post(f"{head}/predict", json={"inputs": []}), 422, "invalid_request"),
        (
            tenant.post(f"{head}/predict", json={"inputs": [{"image": b64(JPEG)}], "top_k": 0}),
            422,
            "invalid_request",
        ),
        (
            tenant.post(
                f"{head}/predict",
                json={"inputs": [{"image": b64(JPEG)}], "reject_unknown": "sometimes"},
            ),
            422,
            "invalid_request",
        ),
        (
            tenant.post(f"{head}/predict", json={"inputs": [{"text": "a temple"}]}),
            422,
            "wrong_modality",
        ),
        (
            tenant.post(f"{head}/predict", json={"inputs": [{"image": b64(b"junk")}]}),
            422,
            "invalid_image",
        ),
        (
            tenant.post(f"{head}/predict", json={"inputs": [{"image": b64(JPEG)}] * 17}),
            413,
            "too_many_inputs",
        ),
        (
            tenant.post("/v1/heads/0000/predict", json={"inputs": [{"image": b64(JPEG)}]}),
            404,
            "head_not_found",
        ),
        (
            tenant.post(f"{head}/examples", json={"examples": [_image(b"junk", "flower")]}),
            422,
            "invalid_image",
        ),
        (tenant.post(f"{head}/examples", json={"examples": []}), 422, "invalid_request"),
        (
            tenant.post(
                f"{head}/predict",
                content=b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                headers={"content-type": "application/json"},
            ),
            400,
            None,  # FastAPI's own body parser answers this one (code bad_request)
        ),
        (
            tenant.post(
                "/v1/heads",
                content=b"[" * 100_000 + b"]" * 100_000,
                headers={"content-type": "application/json"},
            ),
            400,
            "invalid_json",
        ),
        (
            # A lone surrogate is a valid JSON escape but not Unicode text.
            tenant.post(
                f"{text_head}/predict",
                content=b'{"inputs": [{"text": "\\ud800 lone"}]}',
                headers={"content-type": "application/json"},
            ),
            422,
            "invalid_text",
        ),
        (
            tenant.post(
                "/v1/heads",
                content=b'{"name": "x", "backbone": "minilm_l6", "examples": ['
                b'{"label": "a", "text": "\\ud800 lone"}, {"label": "b", "text": "y"}]}',
                headers={"content-type": "application/json"},
            ),
            400,
            "invalid_json",
        ),
        (
            tenant.post(
                "/v1/heads",
                data={"name": "x" * 300, "backbone": IMAGE},
                files={"archive": ("x.zip", _zip({"a/1.jpg": JPEG}), "application/zip")},
            ),
            422,
            "invalid_request",
        ),
        (
            tenant.post("/v1/heads", data={"name": "x", "backbone": IMAGE}),
            415,
            "unsupported_media_type",
        ),
        (
            tenant.post(
                "/v1/heads",
                data={"name": "x", "backbone": IMAGE},
                files={"not_archive": ("x.zip", b"PK", "application/zip")},
            ),
            422,
            "invalid_request",
        ),
        (tenant.get("/v1/no/such/route"), 404, "not_found"),
        # A newline in the path slips past BentoML's mount (found by schemathesis).
        (tenant.get("/v1/heads/a%0Ab"), 404, "not_found"),
        (tenant.get("/v1/backbones/efficientnet_lite0/tokenizer.json"), 404, "no_tokenizer"),
        (tenant.get("/v1/backbones/nope"), 404, "backbone_not_found"),
        # An input is an image or a text, each a string: null is neither (the document's
        # oneOf says the same).
        (
            tenant.post(f"{head}/predict", json={"inputs": [{"image": None}]}),
            422,
            "invalid_request",
        ),
        (
            tenant.post(f"{head}/predict", json={"inputs": [{"image": None, "text": "x"}]}),
            422,
            "invalid_request",
        ),
        (tenant.post(f"{head}/predict", json={"inputs": [{}]}), 422, "invalid_request"),
    ]
    for response, status, code in cases:
        assert_error(response, status, code)


def test_a_method_a_path_does_not_take_answers_405_with_allow(tenant, stored) -> None:
    head = f"/v1/heads/{stored['id']}"
    for method, path, allowed in [
        ("PUT", "/v1/heads", "GET, POST"),
        ("PUT", "/v1/backbones", "GET"),
        ("PATCH", head, "DELETE, GET"),
        ("GET", f"{head}/predict", "POST"),  # the predict path passes other methods on
        ("DELETE", "/v1/tenants", "GET, POST"),
    ]:
        answer = tenant.request(method, path)
        assert_error(answer, 405, "method_not_allowed")
        assert answer.headers["Allow"] == allowed, (method, path)
    assert_error(tenant.put("/v1/no/such/route"), 404, "not_found")


BAD_ARCHIVES = [
    ("not a zip", b"PK\x03\x04 but not really", "invalid_archive"),
    ("files at the top level", _zip({"a.jpg": JPEG, "b.jpg": JPEG}), "invalid_archive"),
    ("path traversal", _zip({"../evil/a.jpg": JPEG, "b/b.jpg": JPEG}), "invalid_archive"),
    ("one label only", _zip({"a/1.jpg": JPEG, "a/2.jpg": JPEG}), "too_few_labels"),
    ("corrupt image inside", _zip({"a/1.jpg": b"junk", "b/2.jpg": JPEG}), "invalid_image"),
    ("empty archive", _zip({}), "invalid_archive"),
]


@pytest.mark.parametrize(
    ("what", "archive", "code"), BAD_ARCHIVES, ids=[c[0] for c in BAD_ARCHIVES]
)
def test_bad_archives(tenant, stored, what, archive, code) -> None:
    response = tenant.post(
        "/v1/heads",
        data={"name": "zip", "backbone": IMAGE},
        files={"archive": ("x.zip", archive, "application/zip")},
    )
    assert_error(response, 422, code)


def test_bad_raw_image_predicts(tenant, stored) -> None:
    """Raw bytes get the same errors and limits as base64 in JSON."""
    predict = f"/v1/heads/{stored['id']}/predict"
    text_head = tenant.post(
        "/v1/heads", json={"name": "t2", "backbone": "minilm_l6", "examples": text_examples(2)}
    ).json()["id"]
    jpeg = {"Content-Type": "image/jpeg"}
    cases = [
        (tenant.post(predict, content=b"junk", headers=jpeg), 422, "invalid_image"),
        (tenant.post(predict, content=b"", headers=jpeg), 422, "invalid_image"),
        (tenant.post(predict, content=_gif(), headers={"Content-Type": "image/png"}), 422,
         "unsupported_image_format"),
        (tenant.post(predict, content=_png(3000, 2000), headers={"Content-Type": "image/png"}),
         413, "image_too_large"),
        (tenant.post(predict, content=JPEG, headers={"Content-Type": "image/gif"}), 415,
         "unsupported_media_type"),
        (tenant.post(f"{predict}?top_k=0", content=JPEG, headers=jpeg), 422, "invalid_request"),
        (tenant.post(f"/v1/heads/{text_head}/predict", content=JPEG, headers=jpeg), 422,
         "wrong_modality"),
        (tenant.post(predict, files=[("image", ("a.jpg", JPEG, "image/jpeg"))] * 17), 413,
         "too_many_inputs"),
        (tenant.post(predict, files=[("picture", ("a.jpg", JPEG, "image/jpeg"))]), 422,
         "invalid_request"),
        (tenant.post(predict, files={"image": (None, b"not a file")}), 422, "invalid_request"),
        (tenant.post(predict, data={"image": "a form"}), 415, "unsupported_media_type"),
        (tenant.post(predict, files=[("image", ("a.jpg", JPEG, "image/jpeg")),
                                     ("image", ("b.jpg", b"junk", "image/jpeg"))]), 422,
         "invalid_image"),
        (tenant.post(predict, content=b"x" * (7 * 1024 * 1024), headers=jpeg), 413,
         "payload_too_large"),
    ]  # fmt: skip
    for response, status, code in cases:
        assert_error(response, status, code)
    # The second file is named in the error, as the second JSON input would be.
    mixed = [("image", ("a.jpg", JPEG, "image/jpeg")), ("image", ("b.jpg", b"junk", "image/jpeg"))]
    assert "input 1" in tenant.post(predict, files=mixed).json()["error"]["message"]
    assert tenant.delete(f"/v1/heads/{text_head}").status_code == 204


def test_server_healthy_and_nothing_stored_changed(server, tenant, stored) -> None:
    """Runs after the bad requests above (pytest keeps file order)."""
    assert tenant.get(f"/v1/heads/{stored['id']}").json() == stored
    # No bad request left a head behind: only this module's two good heads exist.
    names = sorted(h["name"] for h in tenant.get("/v1/heads").json()["heads"])
    assert names == ["stored", "t"]
    answer = tenant.post(
        f"/v1/heads/{stored['id']}/predict",
        json={"inputs": [{"image": b64(crops("flower.jpg", 1, seed=50)[0])}]},
    )
    assert answer.status_code == 200 and answer.json()["predictions"][0]["label"] == "flower"
    with server.client() as anonymous:
        assert anonymous.get("/readyz").status_code == 200
    assert "Traceback" not in server.log()
