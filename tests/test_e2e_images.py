"""The whole user path for an image head, over HTTP against the real server."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from models.preprocess import decode_image
from tests.inputs import b64, crops, exported_image_preprocessing, image_examples
from tests.server import poll_until_trained

pytestmark = pytest.mark.e2e


def test_image_head_lifecycle(server) -> None:
    with server.new_tenant("images") as client:
        created = client.post(
            "/v1/heads",
            json={
                "name": "places",
                "backbone": "efficientnet_lite0",
                "examples": image_examples(6, seed=1),
            },
        )
        assert created.status_code == 201, created.text
        head = created.json()
        assert head["status"] == "ready" and head["version"] == 1 and head["error"] is None
        assert head["labels"] == ["flower", "temple"]
        metrics = head["metrics"]
        assert metrics["n_examples"] == 12
        assert metrics["label_counts"] == {"flower": 6, "temple": 6}
        assert metrics["cv_accuracy"] is not None and metrics["cv_accuracy"] >= 0.8

        # Unseen crops of each photo (another seed) are recognised.
        temples = crops("china.jpg", 3, seed=99)
        flowers = crops("flower.jpg", 3, seed=99, fmt="PNG")
        inputs = [{"image": b64(x)} for x in temples + flowers]
        answer = client.post(f"/v1/heads/{head['id']}/predict", json={"inputs": inputs, "top_k": 2})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["head_id"] == head["id"] and body["version"] == 1
        assert [p["label"] for p in body["predictions"]] == ["temple"] * 3 + ["flower"] * 3
        for p in body["predictions"]:
            assert p["top_k"][0] == {"label": p["label"], "score": p["score"]}
            assert sum(s["score"] for s in p["top_k"]) == pytest.approx(1.0, abs=1e-5)

        # Adding examples retrains on the whole set and bumps the version; an example
        # already in the set is not counted twice.
        extra = image_examples(2, seed=2) + image_examples(6, seed=1)[:1]
        added = client.post(f"/v1/heads/{head['id']}/examples", json={"examples": extra})
        assert added.status_code == 200, added.text
        assert added.json()["version"] == 2
        assert added.json()["metrics"]["n_examples"] == 16
        assert client.get(f"/v1/heads/{head['id']}").json()["version"] == 2
        assert [h["id"] for h in client.get("/v1/heads").json()["heads"]] == [head["id"]]

        # The downloaded model gives the same scores as predict.
        scores = client.post(
            f"/v1/heads/{head['id']}/predict", json={"inputs": inputs, "top_k": 2}
        ).json()["predictions"]
        download = client.get(f"/v1/heads/{head['id']}/model.onnx")
        assert download.status_code == 200
        session = ort.InferenceSession(download.content, providers=["CPUExecutionProvider"])
        meta = session.get_modelmeta().custom_metadata_map
        labels = json.loads(meta["graft.labels"])
        assert labels == ["flower", "temple"] and meta["graft.version"] == "2"
        spec = exported_image_preprocessing(meta)
        batch = np.stack([decode_image(x, spec, 10**8) for x in temples + flowers])
        assert [i.name for i in session.get_inputs()] == ["image"]
        probabilities = session.run(["probabilities"], {"image": batch})[0]
        for row, prediction in zip(probabilities, scores, strict=True):
            for item in prediction["top_k"]:
                assert row[labels.index(item["label"])] == pytest.approx(item["score"], abs=1e-4)

        assert client.delete(f"/v1/heads/{head['id']}").status_code == 204
        assert client.get(f"/v1/heads/{head['id']}").status_code == 404


def test_raw_image_bytes_give_the_same_answers_as_base64(server) -> None:
    """Predict takes the bytes themselves: one image as the body, or several files."""
    with server.new_tenant("raw") as client:
        examples = image_examples(4, seed=5)
        created = client.post(
            "/v1/heads",
            json={"name": "raw", "backbone": "efficientnet_lite0", "examples": examples},
        )
        assert created.status_code == 201, created.text
        predict = f"/v1/heads/{created.json()['id']}/predict"
        images = crops("china.jpg", 2, seed=70) + crops("flower.jpg", 2, seed=70, fmt="PNG")
        webp = io.BytesIO()
        Image.open(io.BytesIO(images[0])).save(webp, "WEBP", lossless=True)
        images.append(webp.getvalue())
        as_json = client.post(
            predict, json={"inputs": [{"image": b64(x)} for x in images], "top_k": 2}
        )
        assert as_json.status_code == 200, as_json.text
        expected = as_json.json()["predictions"]

        media = ["image/jpeg"] * 2 + ["image/png"] * 2 + ["image/webp"]
        for image, content_type, want in zip(images, media, expected, strict=True):
            headers = {"Content-Type": content_type}
            one = client.post(f"{predict}?top_k=2", content=image, headers=headers)
            assert one.status_code == 200, one.text
            _same_predictions(one.json()["predictions"], [want])

        files = [
            ("image", (f"{i}.img", x, "application/octet-stream")) for i, x in enumerate(images)
        ]
        several = client.post(f"{predict}?top_k=2", files=files)
        assert several.status_code == 200, several.text
        _same_predictions(several.json()["predictions"], expected)


def _same_predictions(got: list[dict], expected: list[dict]) -> None:
    """Equal up to float noise (rows batched with others round differently)."""
    assert [p["label"] for p in got] == [p["label"] for p in expected]
    for a, b in zip(got, expected, strict=True):
        assert [s["label"] for s in a["top_k"]] == [s["label"] for s in b["top_k"]]
        assert [s["score"] for s in a["top_k"]] == pytest.approx(
            [s["score"] for s in b["top_k"]], abs=1e-6
        )
        assert a["similarity"] == pytest.approx(b["similarity"], abs=1e-3)


def test_head_from_zip_archive(server) -> None:
    """The layout users already have: a zip with one folder per label."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for label, name in (("temple", "china.jpg"), ("flower", "flower.jpg")):
            for i, data in enumerate(crops(name, 4, seed=5)):
                archive.writestr(f"photos/{label}/{i}.jpg", data)
        archive.writestr("photos/.DS_Store", b"finder junk")
    with server.new_tenant("zip") as client:
        created = client.post(
            "/v1/heads",
            data={"name": "from-zip", "backbone": "efficientnet_lite0"},
            files={"archive": ("photos.zip", buffer.getvalue(), "application/zip")},
        )
        assert created.status_code == 201, created.text
        head = created.json()
        assert head["labels"] == ["flower", "temple"]
        assert head["metrics"]["label_counts"] == {"flower": 4, "temple": 4}
        answer = client.post(
            f"/v1/heads/{head['id']}/predict",
            json={"inputs": [{"image": b64(crops("flower.jpg", 1, seed=77)[0])}]},
        )
        assert answer.json()["predictions"][0]["label"] == "flower"


def _picture_of_text() -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (320, 240), "white")
    ImageDraw.Draw(image).multiline_text((8, 8), "Quarterly report\nRevenue up 4%", fill="black")
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_auto_chooses_a_backbone_and_says_how(server) -> None:
    with server.new_tenant("auto") as client:
        image_ids = [b["id"] for b in client.get("/v1/backbones").json()["backbones"]
                     if b["modality"] == "image"]  # fmt: skip
        assert len(image_ids) >= 3
        created = client.post(
            "/v1/heads",
            json={"name": "places", "backbone": "auto", "examples": image_examples(4, seed=2)},
        )
        # A first version at once, on the first backbone embedded; the choice follows.
        assert created.status_code == 201, created.text
        first = created.json()
        assert first["status"] == "ready" and first["version"] == 1
        assert first["backbone"] in image_ids and first["metrics"]["backbone_selection"] is None
        assert any("other backbones are embedded" in w for w in first["metrics"]["warnings"])
        head = poll_until_trained(client, first["id"], settled=True)
        assert head["version"] == 2
        selection = head["metrics"]["backbone_selection"]
        # Every image backbone scored; the best two by LogME trained; one kept.
        assert set(selection["logme"]) == set(image_ids)
        ranked = sorted(selection["logme"], key=lambda b: -selection["logme"][b])
        assert selection["shortlist"] == ranked[:2]
        assert head["backbone"] == selection["chosen"] in selection["shortlist"]
        losses = selection["cv_log_loss"]
        assert losses[selection["chosen"]] <= min(losses.values()) + 1e-3
        # Temples from flowers: every backbone tells them apart, its rows in step with
        # the labels (each backbone's set is read before or after the first version).
        assert all(a == 1.0 for a in selection["cv_accuracy"].values()), selection

        # The head lives on its chosen backbone: predict, examples and export use it.
        url = f"/v1/heads/{head['id']}"
        flower, text = b64(crops("flower.jpg", 1, seed=70)[0]), b64(_picture_of_text())
        query = {"inputs": [{"image": flower}, {"image": text}], "reject_unknown": True}
        predictions = client.post(f"{url}/predict", json=query).json()["predictions"]
        assert [(p["label"], p["unknown"]) for p in predictions] == [
            ("flower", False),
            (None, True),
        ]
        added = client.post(f"{url}/examples", json={"examples": image_examples(1, seed=3)})
        assert added.status_code == 200 and added.json()["backbone"] == head["backbone"]
        # Only the version that chose reports the choice.
        assert added.json()["metrics"]["backbone_selection"] is None
        model = ort.InferenceSession(
            client.get(f"{url}/model.onnx").content, providers=["CPUExecutionProvider"]
        )
        assert model.get_modelmeta().custom_metadata_map["graft.backbone"] == head["backbone"]

        # A text head on `auto` chooses among the text backbones, even from one example
        # per label (too few to hold any out: LogME's order decides).
        text_ids = {b["id"] for b in client.get("/v1/backbones").json()["backbones"]
                    if b["modality"] == "text"}  # fmt: skip
        text = client.post(
            "/v1/heads",
            json={"name": "t", "backbone": "auto", "examples": [
                {"label": "a", "text": "goal"}, {"label": "b", "text": "soup"}]},
        ).json()  # fmt: skip
        text = poll_until_trained(client, text["id"], settled=True)
        assert text["backbone"] in text_ids
        assert set(text["metrics"]["backbone_selection"]["logme"]) == text_ids
