"""Unlabelled examples of the domain a head will serve, over HTTP against the real server:
stored with the head, adapted to where that looks helpful, reported in `metrics.domain`."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image, ImageOps

from models.preprocess import decode_image
from tests.inputs import (
    assert_error,
    b64,
    crops,
    exported_image_preprocessing,
    image_examples,
    text_examples,
)

pytestmark = pytest.mark.e2e

DECISIONS = {"too_few_unlabeled", "no_shift_beyond_label_proportions", "estimated_gain",
             "estimated_gain_too_small", "estimated_harm"}  # fmt: skip
# The head's domain: the same two topics as chat messages.
CHAT = [
    "lol the ref was blind tonight, 2 red cards in the derby",
    "omg this lasagna is sooo good, recipe pls",
    "cant believe we lost on penalties AGAIN",
    "burnt the toast, smoke alarm going off haha",
    "who's watching the final tonight?? come on lads",
    "made pancakes for everyone this morning",
    "that last minute goal tho!!!",
    "too much garlic in the soup, whoops",
    "marathon training day 12, legs are dead",
    "anyone got a good curry recipe",
    "our keeper saved 2 pens, what a legend",
    "the bread didn't rise :( what did i do wrong",
]


def _grey(data: bytes) -> bytes:
    image = ImageOps.grayscale(Image.open(io.BytesIO(data))).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, "JPEG")
    return buffer.getvalue()


def test_unlabelled_texts_are_kept_reported_and_deduplicated(server) -> None:
    with server.new_tenant("chat") as client:
        head = client.post(
            "/v1/heads",
            json={
                "name": "topics",
                "backbone": "minilm_l6",
                "examples": text_examples(5),
                "fine_tune": "off",
            },
        ).json()
        path = f"/v1/heads/{head['id']}"
        assert head["metrics"]["domain"] is None

        adapted = client.post(f"{path}/unlabeled", json={"examples": [{"text": t} for t in CHAT]})
        assert adapted.status_code == 200, adapted.text
        body = adapted.json()
        assert body["version"] == 2 and body["status"] == "ready"
        domain = body["metrics"]["domain"]
        assert domain["n_unlabeled"] == len(CHAT) and domain["decision"] in DECISIONS
        assert 0.0 <= domain["domain_distance"] <= 1.0
        assert 0.0 <= domain["estimated_accuracy"] <= 1.0
        assert domain["adapted"] == (domain["decision"] == "estimated_gain")
        # The labelled examples' metrics are unchanged: unlabelled rows are no examples.
        assert body["metrics"]["n_examples"] == 10
        assert body["metrics"]["cv_accuracy"] == head["metrics"]["cv_accuracy"]
        assert client.get(path).json() == body

        answer = client.post(f"{path}/predict", json={"inputs": [{"text": CHAT[0]}]})
        assert answer.status_code == 200 and answer.json()["version"] == 2

        # The same texts again are no new examples; labelled examples keep the domain.
        again = client.post(f"{path}/unlabeled", json={"examples": [{"text": CHAT[0]}]}).json()
        assert again["version"] == 3 and again["metrics"]["domain"]["n_unlabeled"] == len(CHAT)
        grown = client.post(f"{path}/examples", json={"examples": text_examples(1, offset=5)})
        assert grown.json()["metrics"]["domain"]["n_unlabeled"] == len(CHAT)
        assert grown.json()["metrics"]["n_examples"] == 12


def test_unlabelled_images_from_a_zip_are_adapted_to_and_exported(server) -> None:
    with server.new_tenant("grey") as client:
        examples = image_examples(6, seed=0)
        head = client.post(
            "/v1/heads", json={"name": "g", "backbone": "efficientnet_lite0", "examples": examples}
        ).json()
        path = f"/v1/heads/{head['id']}"
        greys = [_grey(d) for name in ("china.jpg", "flower.jpg") for d in crops(name, 6, seed=7)]
        archive = io.BytesIO()
        with zipfile.ZipFile(archive, "w") as z:
            for i, data in enumerate(greys):
                z.writestr(f"scans/batch{i % 2}/{i}.jpg", data)  # any folders
        answer = client.post(
            f"{path}/unlabeled", files={"archive": ("greys.zip", archive.getvalue())}
        )
        assert answer.status_code == 200, answer.text
        metrics = answer.json()["metrics"]
        domain = metrics["domain"]
        assert domain["n_unlabeled"] == len(greys)
        # Grey photos are told from colour ones at once: a shift to judge, and a warning.
        assert domain["domain_distance"] >= 0.75
        assert domain["decision"] in {
            "estimated_gain",
            "estimated_gain_too_small",
            "estimated_harm",
        }
        assert any("another domain" in w for w in metrics["warnings"])

        # The served head, adapted or not, is what the exported model computes.
        predictions = client.post(
            f"{path}/predict",
            json={"inputs": [{"image": b64(g)} for g in greys], "top_k": 2},
        ).json()["predictions"]
        session = ort.InferenceSession(
            client.get(f"{path}/model.onnx").content, providers=["CPUExecutionProvider"]
        )
        meta = session.get_modelmeta().custom_metadata_map
        labels = json.loads(meta["graft.labels"])
        spec = exported_image_preprocessing(meta)
        batch = np.stack([decode_image(g, spec, 10**8) for g in greys])
        probabilities = session.run(["probabilities"], {"image": batch})[0]
        for row, prediction in zip(probabilities, predictions, strict=True):
            for item in prediction["top_k"]:
                assert row[labels.index(item["label"])] == pytest.approx(item["score"], abs=1e-4)


def test_bad_unlabelled_input_is_refused_and_changes_nothing(server) -> None:
    with server.new_tenant("careless") as client, server.new_tenant("other") as other:
        head = client.post(
            "/v1/heads",
            json={
                "name": "t",
                "backbone": "minilm_l6",
                "examples": text_examples(3),
                "fine_tune": "off",
            },
        ).json()
        url = f"/v1/heads/{head['id']}/unlabeled"
        assert_error(client.post(url, json={"examples": []}), 422)
        # Unlabelled means no label; an image for a text head is the wrong modality.
        assert_error(client.post(url, json={"examples": [{"text": "x", "label": "y"}]}), 422)
        png = io.BytesIO()
        Image.new("RGB", (8, 8)).save(png, "PNG")
        assert_error(client.post(url, json={"examples": [{"image": b64(png.getvalue())}]}), 422)
        assert_error(client.post(url, content=b"text", headers={"content-type": "text/plain"}), 415)
        assert_error(client.post(url, files={"other": ("a.zip", b"PK")}), 422)
        assert_error(client.post(url, files={"archive": ("a.zip", b"not a zip")}), 422)
        # Another tenant's head does not exist for this one.
        assert_error(other.post(url, json={"examples": [{"text": "hello"}]}), 404, "head_not_found")
        assert client.get(f"/v1/heads/{head['id']}").json() == head
