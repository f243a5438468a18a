"""Fine-tuned heads over HTTP against the real server (issue 13): created with
`fine_tune`, served on the shared trunk with their own top, batched with frozen heads'
rows, kept across versions, and exported as one graph that predicts as the server does;
text heads, and image heads on request."""

from __future__ import annotations

import contextlib
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
import psutil
import pytest

from models.preprocess import decode_image
from tests.inputs import (
    assert_error,
    b64,
    crops,
    exported_image_preprocessing,
    exported_text_feeds,
    image_examples,
    text_examples,
)
from tests.server import (
    BENTOML,
    alive,
    poll_until_trained,
    process_tree,
    start_test_server,
    stop_server,
)

pytestmark = pytest.mark.e2e

QUERIES = [
    "The referee sent off two players in the derby.",
    "Stir the risotto gently and add the stock slowly.",
    "A late goal settled it.",
    "Bake it until golden.",
]


def _create(
    client, name: str, fine_tune: str | None, per_label: int = 6, progress: list | None = None
) -> dict:
    body = {"name": name, "backbone": "minilm_l6", "examples": text_examples(per_label)}
    if fine_tune is not None:
        body["fine_tune"] = fine_tune
    response = client.post("/v1/heads", json=body)
    assert response.status_code in (201, 202), response.text
    head = poll_until_trained(client, response.json()["id"], progress=progress)
    assert head["status"] == "ready", head
    return head


def _scores(client, head_id: str, queries: list[str]) -> np.ndarray:
    """Per query: the scores of cooking and sports, and the best similarity to a class
    mean (which the scores, saturated on such clear texts, may not show)."""
    answer = client.post(
        f"/v1/heads/{head_id}/predict", json={"inputs": [{"text": q} for q in queries], "top_k": 2}
    )
    assert answer.status_code == 200, answer.text
    rows = []
    for p in answer.json()["predictions"]:
        scores = {item["label"]: item["score"] for item in p["top_k"]}
        rows.append([scores["cooking"], scores["sports"], p["similarity"]])
    return np.array(rows)


def _tuned_again(client, head_id: str, examples: list[dict], n_examples: int) -> dict:
    """Version 2 of a fine-tuned head, after `examples` are added: fine-tuned again."""
    added = client.post(f"/v1/heads/{head_id}/examples", json={"examples": examples})
    assert added.status_code in (200, 202), added.text
    head = poll_until_trained(client, head_id)
    assert head["version"] == 2 and head["metrics"]["n_examples"] == n_examples
    assert head["metrics"]["fine_tuning"]["chosen"] == "fine_tuned"
    return head


def _holding_pytorch(server) -> list[str]:
    """The server's processes with PyTorch's library mapped."""
    holding = []
    for process in alive(process_tree(server.process.pid)):
        with contextlib.suppress(psutil.Error):
            if any("libtorch" in m.path for m in process.memory_maps()):
                holding.append(" ".join(process.cmdline()))
    return holding


def _exported(client, head_id: str) -> tuple[ort.InferenceSession, dict[str, str]]:
    """The head's ONNX model, which must be its version 2, fine-tuned, and its metadata."""
    download = client.get(f"/v1/heads/{head_id}/model.onnx")
    assert download.status_code == 200, download.text
    session = ort.InferenceSession(download.content, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["graft.fine_tuned"] == "true" and meta["graft.version"] == "2"
    return session, meta


def test_a_fine_tuned_head_is_served_on_its_own_top_and_exported_whole(server) -> None:
    with server.new_tenant("fine-tune") as client:
        tuned = _create(client, "tuned", "on")
        frozen = _create(client, "frozen", "off")
        assert tuned["fine_tune"] == "on" and frozen["fine_tune"] == "off"
        report = tuned["metrics"]["fine_tuning"]
        assert report["requested"] == "on" and report["chosen"] == "fine_tuned"
        assert set(report["candidates"]) == {"frozen", "fine_tuned"} and report["cv_folds"] == 3
        # MiniLM's top: 4 layers of 6 linear maps, rank 8, fp16.
        assert 400_000 < report["top_bytes"] < 1_000_000
        assert report["device"] == "cpu"  # the server's device
        # The head's held-out accuracy is the comparison's, from tops tuned without the
        # examples scored.
        assert tuned["metrics"]["cv_accuracy"] == report["candidates"]["fine_tuned"]["cv_accuracy"]
        assert frozen["metrics"].get("fine_tuning") is None

        alone = {h["id"]: _scores(client, h["id"], QUERIES) for h in (tuned, frozen)}
        assert (alone[tuned["id"]][:, :2].argmax(1) == [1, 0, 1, 0]).all()
        # The tuned top moves the embeddings: it is what serves the head.
        assert np.abs(alone[tuned["id"]][:, 2] - alone[frozen["id"]][:, 2]).min() > 0.01

        # Many requests of both heads at once share batches: each row still goes through
        # its own head's top (or none).
        requests = [(h["id"], [q]) for _ in range(6) for h in (tuned, frozen) for q in QUERIES]
        with ThreadPoolExecutor(8) as pool:
            batched = list(pool.map(lambda r: _scores(client, *r), requests))
        for (head_id, [query]), scores in zip(requests, batched, strict=True):
            np.testing.assert_allclose(scores[0], alone[head_id][QUERIES.index(query)], atol=1e-4)

        # The next version tunes again, on every example: the texts were kept.
        tuned = _tuned_again(client, tuned["id"], text_examples(2, offset=6), n_examples=16)
        served = _scores(client, tuned["id"], QUERIES)
        # Each tuning ran in a process that ended with it: the server holds no PyTorch.
        assert not _holding_pytorch(server)

        # One graph, trunk + the head's top + the head, predicts as the server does.
        session, meta = _exported(client, tuned["id"])
        feeds = exported_text_feeds(client, "minilm_l6", meta, QUERIES)
        probabilities, similarity = session.run(["probabilities", "similarity"], feeds)
        labels = json.loads(meta["graft.labels"])
        exported = probabilities[:, [labels.index("cooking"), labels.index("sports")]]
        np.testing.assert_allclose(exported, served[:, :2], atol=1e-4)
        np.testing.assert_allclose(similarity, served[:, 2], atol=1e-4)
        int8 = client.get(f"/v1/heads/{tuned['id']}/model.onnx", params={"variant": "int8"})
        assert_error(int8, 409, "variant_unavailable")


def test_auto_serves_the_frozen_head_then_compares_and_too_few_examples_keep_it_frozen(
    server,
) -> None:
    with server.new_tenant("fine-tune-auto") as client:
        body = {"name": "auto", "backbone": "minilm_l6", "examples": text_examples(3)}
        response = client.post("/v1/heads", json=body)
        # A working head at once: the frozen version, served while fine-tuning is compared.
        assert response.status_code == 201, response.text
        first = response.json()
        assert first["status"] == "ready" and first["version"] == 1
        pending = first["metrics"]["fine_tuning"]
        assert pending["chosen"] == "frozen" and "fine-tuning is compared" in pending["reason"]
        answer = client.post(
            f"/v1/heads/{first['id']}/predict", json={"inputs": [{"text": "Goal!"}]}
        )
        assert answer.status_code == 200, answer.text
        shown: list = []
        head = poll_until_trained(client, first["id"], progress=shown, settled=True)
        assert head["version"] == 2 and head["progress"] is None
        assert any(p and p["stage"] == "fine_tuning" for p in shown)  # shown meanwhile
        report = head["metrics"]["fine_tuning"]
        assert head["fine_tune"] == "auto" and report["requested"] == "auto"
        assert set(report["candidates"]) == {"frozen", "fine_tuned"}
        # Fine-tuned unless the frozen head is significantly more accurate held out.
        assert report["chosen"] == ("fine_tuned" if report["p_frozen_better"] >= 0.05 else "frozen")
        few = _create(client, "few", "on", per_label=2)
        report = few["metrics"]["fine_tuning"]
        assert report["chosen"] == "frozen" and "2 example(s)" in report["reason"]
        assert few["metrics"]["cv_accuracy"] is None  # nothing held out either way


def test_an_image_head_fine_tunes_on_request_and_exports_whole(server) -> None:
    temples, flowers = crops("china.jpg", 3, seed=11), crops("flower.jpg", 3, seed=11)
    queries = [{"image": b64(x)} for x in temples + flowers]
    with server.new_tenant("fine-tune-images") as client:

        def create(name: str, fine_tune: str, examples: list[dict]) -> dict:
            body = {
                "name": name,
                "backbone": "efficientnet_lite0",
                "fine_tune": fine_tune,
                "examples": examples,
            }
            response = client.post("/v1/heads", json=body)
            assert response.status_code in (201, 202), response.text
            head = poll_until_trained(client, response.json()["id"])
            assert head["status"] == "ready", head.get("error")
            return head

        def predict(head_id: str) -> list[dict]:
            answer = client.post(
                f"/v1/heads/{head_id}/predict", json={"inputs": queries, "top_k": 2}
            )
            assert answer.status_code == 200, answer.text
            return answer.json()["predictions"]

        tuned = create("tuned", "on", image_examples(3, seed=0))
        report = tuned["metrics"]["fine_tuning"]
        assert report["chosen"] == "fine_tuned" and report["cv_folds"] == 3
        # lite0's top: three 1x1 convolutions (192->1152, 1152->320, 320->1280), rank 8, fp16.
        assert report["top_bytes"] == 2 * 8 * (192 + 1152 + 1152 + 320 + 320 + 1280)
        # `auto` keeps an image head frozen, and says why.
        auto = create("auto", "auto", image_examples(3, seed=0))
        assert auto["metrics"]["fine_tuning"]["chosen"] == "frozen"
        assert "fine_tune: on" in auto["metrics"]["fine_tuning"]["reason"]

        served = predict(tuned["id"])
        frozen = predict(auto["id"])
        assert [p["label"] for p in served] == ["temple"] * 3 + ["flower"] * 3
        # The tuned top moves the embeddings: it is what serves the head.
        moved = [
            abs(a["similarity"] - b["similarity"]) for a, b in zip(served, frozen, strict=True)
        ]
        assert max(moved) > 1e-3

        # The next version tunes again, on every image: they were kept.
        tuned = _tuned_again(client, tuned["id"], image_examples(1, seed=3), n_examples=8)
        served = predict(tuned["id"])

        # One graph, trunk + the head's top + the head, predicts as the server does.
        session, meta = _exported(client, tuned["id"])
        assert [i.name for i in session.get_inputs()] == ["image"]
        pre = exported_image_preprocessing(meta)
        batch = np.stack([decode_image(x, pre, 10**8) for x in temples + flowers])
        probabilities, similarity = session.run(["probabilities", "similarity"], {"image": batch})
        labels = json.loads(meta["graft.labels"])
        for row, sim, prediction in zip(probabilities, similarity, served, strict=True):
            assert sim == pytest.approx(prediction["similarity"], abs=1e-4)
            for item in prediction["top_k"]:
                assert row[labels.index(item["label"])] == pytest.approx(item["score"], abs=1e-4)


def test_fine_tuning_that_cannot_be_done_is_refused_and_stores_nothing(server) -> None:
    with server.new_tenant("fine-tune-bad") as client:
        wrong = client.post(
            "/v1/heads",
            json={
                "name": "x",
                "backbone": "minilm_l6",
                "fine_tune": "always",
                "examples": text_examples(3),
            },
        )
        assert_error(wrong, 422)
        assert client.get("/v1/heads").json()["heads"] == []


def test_a_fine_tuned_head_survives_a_restart_and_is_refused_where_its_backbone_is_whole(
    tmp_path, backbone_dir
) -> None:
    data_dir = tmp_path / "data"
    # Every creation answers 202 at once: the head shows how far its training is.
    env = {"GRAFT_BACKBONES": "minilm_l6", "GRAFT_SYNC_TRAINING_TIMEOUT_S": "0"}
    server = start_test_server(BENTOML, data_dir, backbone_dir, env)
    try:
        with server.new_tenant("restart") as client:
            key = client.headers["Authorization"].removeprefix("Bearer ")
            progress: list = []
            head = _create(client, "tuned", "on", progress=progress)
            assert head["progress"] is None
            shown = [p for p in progress if p is not None]
            # Four tunings of a few seconds each (three folds, then all the examples).
            assert {p["stage"] for p in shown} >= {"fine_tuning"}, progress
            assert all(0 <= p["done"] <= p["total"] for p in shown), shown
            tunings = [p["done"] for p in shown if p["stage"] == "fine_tuning"]
            assert tunings == sorted(tunings) and tunings[-1] > 0, shown
            before = _scores(client, head["id"], QUERIES)
    finally:
        stop_server(server)
    # The same store, served again: the head's top came back with it.
    server = start_test_server(BENTOML, data_dir, backbone_dir, env, admin_key=server.admin_key)
    try:
        with server.client(key) as client:
            np.testing.assert_allclose(_scores(client, head["id"], QUERIES), before, atol=1e-5)
    finally:
        stop_server(server)
    # Served whole, the backbone cannot run the head's top: a clear 409, not a wrong answer.
    whole = {**env, "GRAFT_FINE_TUNING": "false"}
    server = start_test_server(BENTOML, data_dir, backbone_dir, whole, admin_key=server.admin_key)
    try:
        with server.client(key) as client:
            answer = client.post(
                f"/v1/heads/{head['id']}/predict", json={"inputs": [{"text": QUERIES[0]}]}
            )
            assert_error(answer, 409, "fine_tuning_unavailable")
            assert client.get(f"/v1/heads/{head['id']}").json()["version"] == 1
            # Nor can a head be created there with `on`; nothing is stored.
            refused = client.post(
                "/v1/heads",
                json={
                    "name": "x",
                    "backbone": "minilm_l6",
                    "fine_tune": "on",
                    "examples": text_examples(3),
                },
            )
            assert_error(refused, 422, "fine_tuning_unavailable")
            assert [h["id"] for h in client.get("/v1/heads").json()["heads"]] == [head["id"]]
    finally:
        stop_server(server)
