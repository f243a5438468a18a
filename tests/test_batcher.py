"""Cross-tenant batching: many requests share backbone passes, none sees another's rows."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from adapters.head_cache import ServingHead
from adapters.heads import predict_proba
from models.preprocess import decode_image
from service.batcher import Batcher
from tests.inputs import COOKING, SPORTS, crops


def _random_head(i: int, dim: int, n_labels: int) -> ServingHead:
    rng = np.random.default_rng(i)
    return ServingHead(
        id=f"head-{i}", tenant_id=f"tenant-{i % 3}", backbone="b", version=1,
        labels=[f"l{j}" for j in range(n_labels)],
        weights=rng.normal(size=(dim, n_labels)).astype(np.float32) * 5,
        bias=rng.normal(size=n_labels).astype(np.float32),
        prototypes=rng.normal(size=(dim, n_labels)).astype(np.float32), unknown_threshold=0.0,
    )  # fmt: skip


@pytest.mark.parametrize("backbone_name", ["text_backbone", "image_backbone"])
def test_concurrent_requests_get_exactly_their_own_rows(request, backbone_name) -> None:
    backbone = request.getfixturevalue(backbone_name)
    if backbone.spec.modality == "image":
        pool = crops("china.jpg", 6, seed=0) + crops("flower.jpg", 6, seed=0)
        all_rows = np.stack([decode_image(x, backbone.spec.preprocessing, 10**8) for x in pool])
    else:
        all_rows = SPORTS + COOKING
    reference = (
        backbone.embed_images(all_rows)
        if backbone.spec.modality == "image"
        else backbone.embed_texts(all_rows)
    )
    batcher = Batcher(backbone, max_batch_size=8, max_latency_ms=20)
    rng = np.random.default_rng(1)
    # 40 requests of 1-5 rows each, over 7 heads with 2-4 labels; 8 rows per pass at most,
    # so requests are also split across passes.
    jobs = []
    for i in range(40):
        picks = rng.choice(len(all_rows), size=int(rng.integers(1, 6)), replace=False)
        head = _random_head(i % 7, backbone.spec.embedding_dim, 2 + i % 3)
        rows = all_rows[picks] if isinstance(all_rows, np.ndarray) else [all_rows[p] for p in picks]
        jobs.append((head, rows, picks))
    try:
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda job: batcher.submit(job[0], job[1]).result(60), jobs))
    finally:
        batcher.close()
    for (head, _, picks), (probabilities, similarity) in zip(jobs, results, strict=True):
        expected = predict_proba(reference[picks], head.weights, head.bias)
        np.testing.assert_allclose(probabilities, expected, atol=1e-4)
        expected = (reference[picks] @ head.prototypes).max(axis=1)
        np.testing.assert_allclose(similarity, expected, atol=1e-4)
    total_rows = sum(len(p) for _, _, p in jobs)
    assert batcher.rows == total_rows
    assert batcher.batches < len(jobs), "no two requests ever shared a backbone pass"
    assert batcher.batches >= total_rows / 8


def test_a_failing_batch_fails_its_requests_and_the_batcher_goes_on(text_backbone) -> None:
    batcher = Batcher(text_backbone, max_batch_size=4, max_latency_ms=0)
    try:
        bad = _random_head(0, 7, 2)  # wrong embedding size: the head's product fails
        with pytest.raises(ValueError):
            batcher.submit(bad, ["a text"]).result(30)
        good = _random_head(1, text_backbone.spec.embedding_dim, 2)
        probabilities, similarity = batcher.submit(good, ["a text"]).result(30)
        assert probabilities.shape == (1, 2) and similarity.shape == (1,)
    finally:
        batcher.close()
