"""Hostile and odd input over HTTP: odd-but-valid images are read and predicted; broken
images, hostile archives and malformed JSON get a 4xx in the documented shape, fast.
Nothing stored changes and the server log stays free of tracebacks."""

from __future__ import annotations

import io
import json
import struct
import time
import zipfile

import numpy as np
import pytest
from PIL import Image

from tests.inputs import assert_error, b64, crops, image_examples, text_examples

pytestmark = pytest.mark.e2e

IMAGE = "efficientnet_lite0"
TEXT = "minilm_l6"
JPEG = crops("flower.jpg", 1, seed=11)[0]


def _encode(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def _grey(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("L"))


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(Image.open(io.BytesIO(JPEG)).rotate(90, expand=True), "JPEG", exif=exif)


def _animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (40, 40), c) for c in ("red", "blue", "green")]
    return _encode(frames[0], fmt, save_all=True, append_images=frames[1:])


def _palette_with_transparency() -> bytes:
    image = Image.open(io.BytesIO(JPEG)).convert("P")
    return _encode(image, transparency=0)


# Odd but valid: each must be read and predicted (200).
ODD_IMAGES = {
    "1x1": _encode(Image.new("RGB", (1, 1), "red")),
    "20000x1": _encode(Image.new("RGB", (20000, 1), "red")),
    "1x20000": _encode(Image.new("L", (1, 20000), 99)),
    "animated png": _animated("PNG"),
    "animated webp": _animated("WEBP"),
    "cmyk jpeg": _encode(Image.open(io.BytesIO(JPEG)).convert("CMYK"), "JPEG"),
    "16-bit png": _encode(Image.fromarray(_grey(JPEG).astype(np.uint16) * 257)),
    "palette + transparency": _palette_with_transparency(),
    "rgba": _encode(Image.open(io.BytesIO(JPEG)).convert("RGBA")),
    "greyscale + alpha": _encode(Image.open(io.BytesIO(JPEG)).convert("LA")),
    "exif rotated": _exif_rotated(),
    "progressive jpeg": _encode(Image.open(io.BytesIO(JPEG)), "JPEG", progressive=True),
    "webp": _encode(Image.open(io.BytesIO(JPEG)), "WEBP"),
}

# Broken or hostile: each must get a 4xx (status, code).
BAD_IMAGES = {
    "truncated jpeg": (JPEG[: len(JPEG) // 2], 422, "invalid_image"),
    "jpeg with its middle zeroed": (
        JPEG[:600] + b"\x00" * (len(JPEG) - 1200) + JPEG[-600:],
        None,  # decoders conceal damage: a 200 is fine too, a 5xx is not
        None,
    ),
    "png of 5000x5000 (bomb)": (
        _encode(Image.new("1", (5000, 5000)), optimize=True),
        413,
        "image_too_large",
    ),
    "png of 30000x30000 (bomb)": (
        _encode(Image.new("1", (30000, 30000)), optimize=True),
        413,
        "image_too_large",
    ),
    "zip named .jpg": (b"PK\x03\x04" + b"\x00" * 100, 422, "invalid_image"),
    "html named .jpg": (b"<html><body>hello</body></html>", 422, "invalid_image"),
    "svg": (b'<svg xmlns="http://www.w3.org/2000/svg"/>', 422, "invalid_image"),
    "zero bytes": (b"", 422, "invalid_image"),
    "gif": (_encode(Image.new("RGB", (8, 8)), "GIF"), 422, "unsupported_image_format"),
    "tiff": (_encode(Image.new("RGB", (8, 8)), "TIFF"), 422, "unsupported_image_format"),
    "ico": (_encode(Image.new("RGB", (16, 16)), "ICO"), 422, "unsupported_image_format"),
    "png header only": (_encode(Image.new("RGB", (64, 64)))[:33], 422, "invalid_image"),
}


def _zip(files: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _symlink_zip() -> bytes:
    link = zipfile.ZipInfo("a/passwd.jpg")
    link.external_attr = (0o120777 << 16) | 0x20  # a symbolic link, as `zip -y` stores it
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("b/1.jpg", JPEG)
        archive.writestr(link, b"/etc/passwd")
    return buffer.getvalue()


def _patched(data: bytes, find: bytes, offset: int, value: bytes) -> bytes:
    """`value` written at `offset` into every record that starts with `find`."""
    out = bytearray(data)
    start = out.find(find)
    while start != -1:
        out[start + offset : start + offset + len(value)] = value
        start = out.find(find, start + 1)
    return bytes(out)


def _encrypted_zip() -> bytes:
    data = _zip({"a/1.jpg": JPEG, "b/1.jpg": JPEG}, zipfile.ZIP_STORED)
    flags = struct.pack("<H", 0x1)  # "encrypted" (zipfile cannot write a real one)
    data = _patched(data, b"PK\x03\x04", 6, flags)
    return _patched(data, b"PK\x01\x02", 8, flags)


def _unknown_compression_zip() -> bytes:
    data = _zip({"a/1.jpg": JPEG, "b/1.jpg": JPEG}, zipfile.ZIP_STORED)
    method = struct.pack("<H", 99)  # AES, which zipfile cannot read
    data = _patched(data, b"PK\x03\x04", 8, method)
    return _patched(data, b"PK\x01\x02", 10, method)


def _bad_crc_zip() -> bytes:
    data = bytearray(_zip({"a/1.jpg": JPEG, "b/1.jpg": JPEG}, zipfile.ZIP_STORED))
    data[200] ^= 0xFF  # inside the first file's bytes
    return bytes(data)


# Test server: at most 4 MiB uncompressed and 200 files per archive (conftest.TEST_LIMITS).
BAD_ARCHIVES = {
    "path traversal": (_zip({"../../etc/a.jpg": JPEG, "b/1.jpg": JPEG}), 422, "invalid_archive"),
    "absolute path": (_zip({"/etc/a/1.jpg": JPEG, "b/1.jpg": JPEG}), 422, "invalid_archive"),
    "windows traversal": (
        _zip({"..\\..\\a\\1.jpg": JPEG, "b/1.jpg": JPEG}),
        422,
        "invalid_archive",
    ),
    "symlink": (_symlink_zip(), 422, "invalid_archive"),
    "nested zip": (
        _zip({"a/inner.jpg": _zip({"x/1.jpg": JPEG}), "b/1.jpg": JPEG}),
        422,
        "invalid_archive",
    ),
    "nested gzip": (_zip({"a/1.jpg": b"\x1f\x8b\x08" + b"\x00" * 50, "b/1.jpg": JPEG}), 422, None),
    "zip bomb (50 MB of zeros)": (
        _zip({"a/1.jpg": b"\x00" * 50_000_000, "b/1.jpg": JPEG}),
        413,
        "archive_too_large",
    ),
    "file-count bomb": (
        _zip({f"a/{i}.jpg": b"" for i in range(5000)}),
        413,
        "archive_too_large",
    ),
    "encrypted entry": (_encrypted_zip(), 422, "invalid_archive"),
    "unknown compression": (_unknown_compression_zip(), 422, "invalid_archive"),
    "bad crc": (_bad_crc_zip(), 422, "invalid_archive"),
    "only empty folders": (_zip({"a/": b"", "b/": b""}), 422, "invalid_archive"),
    "files at the top level": (_zip({"1.jpg": JPEG, "2.jpg": JPEG}), 422, "invalid_archive"),
    "too deep": (_zip({"a/b/c/1.jpg": JPEG, "a/b/d/1.jpg": JPEG}), 422, "invalid_archive"),
    "truncated zip": (_zip({"a/1.jpg": JPEG, "b/1.jpg": JPEG})[:-30], 422, "invalid_archive"),
}


@pytest.fixture(scope="module")
def tenant(server):
    with server.new_tenant("hostile") as client:
        yield client


@pytest.fixture(scope="module")
def image_head(tenant) -> dict:
    response = tenant.post(
        "/v1/heads", json={"name": "kept", "backbone": IMAGE, "examples": image_examples(3, seed=4)}
    )
    assert response.status_code == 201, response.text
    return response.json()


@pytest.fixture(scope="module")
def text_head(tenant) -> dict:
    response = tenant.post(
        "/v1/heads",
        json={
            "name": "kept-text",
            "backbone": TEXT,
            "examples": text_examples(3),
            "fine_tune": "off",
        },
    )
    assert response.status_code == 201, response.text
    return response.json()


def _timed(call):
    started = time.perf_counter()
    response = call()
    assert time.perf_counter() - started < 30, "no hostile input may hang the server"
    return response


@pytest.mark.parametrize("what", list(ODD_IMAGES))
def test_odd_but_valid_images_are_predicted(tenant, image_head, what) -> None:
    response = _timed(
        lambda: tenant.post(
            f"/v1/heads/{image_head['id']}/predict",
            json={"inputs": [{"image": b64(ODD_IMAGES[what])}]},
        )
    )
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["label"] in image_head["labels"]


def test_exif_orientation_changes_nothing_for_the_head(tenant, image_head) -> None:
    path = f"/v1/heads/{image_head['id']}/predict"
    upright = tenant.post(path, json={"inputs": [{"image": b64(JPEG)}]}).json()
    rotated = tenant.post(path, json={"inputs": [{"image": b64(_exif_rotated())}]}).json()
    assert rotated["predictions"][0]["label"] == upright["predictions"][0]["label"] == "flower"
    assert abs(rotated["predictions"][0]["score"] - upright["predictions"][0]["score"]) < 0.05


@pytest.mark.parametrize("what", list(BAD_IMAGES))
def test_broken_images_are_refused(tenant, image_head, what) -> None:
    data, status, code = BAD_IMAGES[what]
    response = _timed(
        lambda: tenant.post(
            f"/v1/heads/{image_head['id']}/predict", json={"inputs": [{"image": b64(data)}]}
        )
    )
    if status is None:
        assert response.status_code in (200, 422), response.text
    else:
        assert_error(response, status, code)


@pytest.mark.parametrize("what", list(BAD_ARCHIVES))
def test_hostile_archives_are_refused(tenant, image_head, what) -> None:
    archive, status, code = BAD_ARCHIVES[what]
    response = _timed(
        lambda: tenant.post(
            "/v1/heads",
            data={"name": "zip", "backbone": IMAGE},
            files={"archive": ("x.zip", archive, "application/zip")},
        )
    )
    assert_error(response, status, code)


def test_empty_folders_in_an_archive_are_ignored(tenant) -> None:
    archive = _zip(
        {"empty/": b"", "a/": b"", "a/1.jpg": JPEG, "b/1.jpg": crops("china.jpg", 1, seed=2)[0]}
    )
    response = tenant.post(
        "/v1/heads",
        data={"name": "folders", "backbone": IMAGE},
        files={"archive": ("x.zip", archive, "application/zip")},
    )
    assert response.status_code == 201, response.text
    assert response.json()["labels"] == ["a", "b"]
    assert tenant.delete(f"/v1/heads/{response.json()['id']}").status_code == 204


def _texts(*pairs: tuple[str, str]) -> dict:
    return {"name": "t", "backbone": TEXT, "examples": [{"label": y, "text": x} for y, x in pairs]}


# (what, request kwargs for POST /v1/heads, status, code); status None: any 4xx.
BAD_JSON = [
    ("label with a newline", {"json": _texts(("a\nb", "x"), ("c", "y"))}, 422, "invalid_label"),
    ("label with NUL", {"json": _texts(("a\x00", "x"), ("c", "y"))}, 422, "invalid_label"),
    (
        "label of 10,000 characters",
        {"json": _texts(("a" * 10_000, "x"), ("c", "y"))},
        422,
        "invalid_label",
    ),
    (
        "1,001 labels",
        {"json": _texts(*[(f"label {i}", f"text {i}") for i in range(1001)])},
        422,
        "too_many_labels",
    ),
    ("whitespace-only text", {"json": _texts(("a", " \t\n "), ("b", "y"))}, 422, "empty_text"),
    ("empty text", {"json": _texts(("a", ""), ("b", "y"))}, 422, "empty_text"),
    ("text over the limit", {"json": _texts(("a", "x" * 2001), ("b", "y"))}, 413, "text_too_long"),
    (
        "invalid UTF-8",
        {
            "content": b'{"name": "t", "backbone": "minilm_l6", "examples": '
            + b'[{"label": "a", "text": "\xff\xfe"}]}'
        },
        400,
        "invalid_json",
    ),
    (
        "label is a number",
        {"json": {**_texts(("a", "x")), "examples": [{"label": 1, "text": "x"}]}},
        422,
        "invalid_request",
    ),
    (
        "examples is an object",
        {"json": {**_texts(), "examples": {"a": "x"}}},
        422,
        "invalid_request",
    ),
    ("body is a list", {"json": [1, 2, 3]}, 422, "invalid_request"),
    ("body is null", {"content": b"null"}, 422, "invalid_request"),
    ("body is a number", {"content": b"1e999999"}, 422, "invalid_request"),
    (
        "name is an object",
        {"json": {**_texts(("a", "x"), ("b", "y")), "name": {"$gt": ""}}},
        422,
        "invalid_request",
    ),
    (
        "extra field",
        {"json": {**_texts(("a", "x"), ("b", "y")), "admin": True}},
        422,
        "invalid_request",
    ),
    (
        "deeply nested",
        {"content": b'{"name": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"},
        400,
        "invalid_json",
    ),
    ("duplicate keys", {"content": b'{"name": "t", "name": {"x": 1}}'}, 422, "invalid_request"),
    (
        "multipart without boundary",
        {"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data"}},
        None,
        None,
    ),
    (
        "json sent as text/plain",
        {
            "content": json.dumps(_texts(("a", "x"), ("b", "y"))).encode(),
            "headers": {"content-type": "text/plain"},
        },
        415,
        "unsupported_media_type",
    ),
]


@pytest.mark.parametrize(
    ("what", "kwargs", "status", "code"), BAD_JSON, ids=[c[0] for c in BAD_JSON]
)
def test_malformed_json_is_refused(tenant, what, kwargs, status, code) -> None:
    kwargs = {"headers": {"content-type": "application/json"}, **kwargs}
    response = _timed(lambda: tenant.post("/v1/heads", **kwargs))
    if status is None:
        assert 400 <= response.status_code < 500, response.text
        assert_error(response, response.status_code)
    else:
        assert_error(response, status, code)


def test_control_characters_and_duplicates_in_texts_are_fine(tenant, text_head) -> None:
    examples = text_examples(3) * 3 + [
        {"label": "sports", "text": "a goal\x00 in the \x1b[31mlast\x7f minute"},
        {"label": "cooking", "text": "stir \u200b\ufeff the soup \U0001f372"},
    ]
    response = tenant.post(f"/v1/heads/{text_head['id']}/examples", json={"examples": examples})
    assert response.status_code == 200, response.text
    assert response.json()["metrics"]["n_examples"] == 8  # 6 distinct + 2 new
    answer = tenant.post(
        f"/v1/heads/{text_head['id']}/predict",
        json={"inputs": [{"text": "\x00\x01\x02"}, {"text": "🍲" * 500}]},
    )
    assert answer.status_code == 200, answer.text


def test_nothing_stored_changed_and_no_tracebacks(server, tenant, image_head) -> None:
    """Runs after the attacks above (pytest keeps file order)."""
    assert tenant.get(f"/v1/heads/{image_head['id']}").json() == image_head
    names = sorted(h["name"] for h in tenant.get("/v1/heads").json()["heads"])
    assert names == ["kept", "kept-text"]
    assert "Traceback" not in server.log()
