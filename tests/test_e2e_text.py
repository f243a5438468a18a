"""The whole user path for a text head, over HTTP against the real server."""

from __future__ import annotations

import json
import re

import numpy as np
import onnxruntime as ort
import pytest

from tests.inputs import exported_text_feeds, text_examples

pytestmark = pytest.mark.e2e


def test_text_head_lifecycle(server) -> None:
    with server.new_tenant("texts") as client:
        created = client.post(
            "/v1/heads",
            # Frozen: this head's export is also taken in INT8, which a fine-tuned head's
            # is not (tests/test_e2e_finetune.py).
            json={
                "name": "topics",
                "backbone": "minilm_l6",
                "examples": text_examples(5),
                "fine_tune": "off",
            },
        )
        assert created.status_code == 201, created.text
        head = created.json()
        assert head["status"] == "ready" and head["labels"] == ["cooking", "sports"]
        assert head["metrics"]["label_counts"] == {"cooking": 5, "sports": 5}
        # Its examples came from the runner with the deepest two depths of the pass, and
        # the head weighed reading them (adapters/depth_choice.py).
        depths = head["metrics"]["depths"]
        assert [c["depths"] for c in depths["candidates"]] == [0, 1, 2]
        assert depths["chosen"] in (0, 1, 2)

        queries = ["The referee sent off two players in the derby.", "Stir the risotto gently."]
        answer = client.post(
            f"/v1/heads/{head['id']}/predict", json={"inputs": [{"text": q} for q in queries]}
        )
        assert answer.status_code == 200, answer.text
        predictions = answer.json()["predictions"]
        assert [p["label"] for p in predictions] == ["sports", "cooking"]

        added = client.post(
            f"/v1/heads/{head['id']}/examples", json={"examples": text_examples(3, offset=5)}
        )
        assert added.status_code == 200, added.text
        assert added.json()["version"] == 2 and added.json()["metrics"]["n_examples"] == 16
        predictions = client.post(
            f"/v1/heads/{head['id']}/predict",
            json={"inputs": [{"text": q} for q in queries], "top_k": 2},
        ).json()["predictions"]

        # The model file plus the backbone's tokenizer reproduce predict's scores.
        download = client.get(f"/v1/heads/{head['id']}/model.onnx")
        assert download.status_code == 200
        session = ort.InferenceSession(download.content, providers=["CPUExecutionProvider"])
        meta = session.get_modelmeta().custom_metadata_map
        labels = json.loads(meta["graft.labels"])
        assert json.loads(meta["graft.inputs"]) == ["input_ids", "attention_mask"]
        feeds = exported_text_feeds(client, "minilm_l6", meta, queries)
        probabilities = session.run(["probabilities"], feeds)[0]
        for row, prediction in zip(probabilities, predictions, strict=True):
            for item in prediction["top_k"]:
                assert row[labels.index(item["label"])] == pytest.approx(item["score"], abs=1e-4)
        assert meta["graft.variant"] == "fp32"

        # The INT8 variant: a quarter of the size, the same answers on clear inputs.
        int8 = client.get(f"/v1/heads/{head['id']}/model.onnx", params={"variant": "int8"})
        assert int8.status_code == 200 and len(int8.content) < len(download.content) / 3
        session = ort.InferenceSession(int8.content, providers=["CPUExecutionProvider"])
        assert session.get_modelmeta().custom_metadata_map["graft.variant"] == "int8"
        quantised = session.run(["probabilities"], feeds)[0]
        assert [labels[i] for i in quantised.argmax(axis=1)] == ["sports", "cooking"]
        np.testing.assert_allclose(quantised, probabilities, atol=0.1)


# Far from sports and from cooking; the head must flag them, and keep the clear cases.
UNRELATED = [
    "The invoice is attached; please pay it by Friday.",
    "Install the package with pip and restart the kernel.",
    "The central bank raised interest rates by half a point.",
]
RELATED = ["The referee sent off two players in the derby.", "Grill the fish with lemon."]


def test_a_text_head_says_when_it_does_not_know(server) -> None:
    with server.new_tenant("unknown") as client:
        body = {
            "name": "topics",
            "backbone": "minilm_l6",
            "examples": text_examples(8),
            "label_descriptions": {"sports": "sport, games and athletes"},
            "fine_tune": "off",
        }
        head = client.post("/v1/heads", json=body).json()
        assert head["label_descriptions"] == {"sports": "sport, games and athletes"}
        metrics = head["metrics"]
        # The model choice is reported: every candidate, with and without the label names.
        compared = {(c["head_type"], c["label_names"]) for c in metrics["cv_candidates"]}
        assert compared == {(kind, names) for kind in ("logistic_regression", "prototype")
                            for names in (False, True)}  # fmt: skip
        key = ("head_type", "regularization_c", "label_names")
        [chosen] = [c for c in metrics["cv_candidates"] if all(c[k] == metrics[k] for k in key)]
        best = min(c["cv_log_loss"] for c in metrics["cv_candidates"])
        assert chosen["cv_log_loss"] <= best + 1e-3  # the lowest, or tied with it
        assert 0 < metrics["unknown_threshold"] < 1 and metrics["cv_unknown_kept"] >= 0.9
        assert head["unknown_keep"] == metrics["unknown_keep"] == 0.95  # the default
        # A head may keep a smaller share of its own kind, to reject more of the rest.
        stricter = client.post(
            "/v1/heads", json={**body, "name": "topics, stricter", "unknown_keep": 0.6}
        ).json()
        assert stricter["unknown_keep"] == stricter["metrics"]["unknown_keep"] == 0.6
        assert stricter["metrics"]["unknown_threshold"] > metrics["unknown_threshold"]
        refused = client.post("/v1/heads", json={**body, "name": "never", "unknown_keep": 1.5})
        assert refused.status_code == 422 and "unknown_keep" in refused.text

        queries = [{"text": t} for t in RELATED + UNRELATED]
        url = f"/v1/heads/{head['id']}/predict"
        plain = client.post(url, json={"inputs": queries}).json()["predictions"]
        strict = client.post(url, json={"inputs": queries, "reject_unknown": True}).json()
        strict = strict["predictions"]
        assert [p["unknown"] for p in plain] == [False] * 2 + [True] * 3
        assert [p["label"] for p in strict] == ["sports", "cooking", None, None, None]
        # Rejecting changes only the label: the scores are given either way.
        for a, b in zip(plain, strict, strict=True):
            assert {**a, "label": None} == {**b, "label": None}
            assert (a["similarity"] < metrics["unknown_threshold"]) == a["unknown"]

        # The exported model flags the same inputs.
        session = ort.InferenceSession(
            client.get(f"/v1/heads/{head['id']}/model.onnx").content,
            providers=["CPUExecutionProvider"],
        )
        meta = session.get_modelmeta().custom_metadata_map
        feeds = exported_text_feeds(client, "minilm_l6", meta, [q["text"] for q in queries])
        similarity, unknown = session.run(["similarity", "unknown"], feeds)
        assert unknown.tolist() == [p["unknown"] for p in plain]
        np.testing.assert_allclose(similarity, [p["similarity"] for p in plain], atol=1e-3)


def test_stats_show_the_batchers_and_the_head_cache(server) -> None:
    with server.new_tenant("stats") as tenant:
        head = tenant.post(
            "/v1/heads",
            json={"name": "s", "backbone": "minilm_l6", "examples": text_examples(2)},
        ).json()
        for _ in range(2):
            tenant.post(f"/v1/heads/{head['id']}/predict", json={"inputs": [{"text": "goal!"}]})
        assert tenant.get("/v1/stats").status_code == 403
    with server.admin() as admin:
        stats = admin.get("/v1/stats").json()
    assert stats["batchers"]["minilm_l6"]["rows"] >= 2
    assert stats["head_cache"]["heads"] >= 1 and stats["head_cache"]["hits"] >= 1
    assert 0 < stats["head_cache"]["bytes"] <= stats["head_cache"]["max_bytes"]


def test_backbones_and_openapi_are_served(server) -> None:
    with server.client() as client:
        backbones = client.get("/v1/backbones").json()["backbones"]
        by_id = {b["id"]: b for b in backbones}
        assert by_id["efficientnet_lite0"]["modality"] == "image"
        assert by_id["efficientnet_lite0"]["embedding_dim"] == 1280
        assert by_id["minilm_l6"]["modality"] == "text"
        assert by_id["minilm_l6"]["embedding_dim"] == 384
        assert by_id["minilm_l6"]["variants"] == ["fp32", "int8", "fp16"]
        assert by_id["minilm_l6"]["served_variant"] == "fp32"
        # Each pass computes every depth beside the embedding (models/depths.py).
        assert by_id["efficientnet_lite0"]["depth_widths"] == [16, 24, 40, 112, 320]
        assert by_id["minilm_l6"]["depth_widths"] == [384] * 5
        spec = client.get("/v1/openapi.json").json()
        assert {"/heads", "/heads/{head_id}/predict", "/tenants"} <= set(spec["paths"])
        assert spec["servers"] == [{"url": "/v1"}]
        refs = set(re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', json.dumps(spec)))
        assert refs and refs <= set(spec["components"]["schemas"]), "dangling $ref"
        assert client.get("/v1/docs").status_code == 200
        assert client.get("/livez").status_code == 200
        assert client.get("/readyz").status_code == 200
