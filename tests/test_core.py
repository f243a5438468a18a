"""The application object without HTTP: the embedding cache and training on the whole set."""

from __future__ import annotations

import pytest

from models.preprocess import token_ids
from service.core import Graft
from service.inputs import RawInput
from service.runner import Runner, RunnerClient
from service.settings import Settings
from tests.inputs import COOKING, SPORTS


@pytest.fixture
def runner_and_graft(tmp_path, backbone_dir):
    """A runner and an API worker's application in this process, over the real socket."""
    settings = Settings(data_dir=tmp_path, backbone_dir=backbone_dir)
    runner = Runner(settings)
    app = Graft(settings, RunnerClient(settings.runner_socket))
    yield runner, app
    app.close()
    runner.close()


def _examples(label: str, texts: list[str]) -> list[tuple[str, RawInput]]:
    return [(label, RawInput("text", t)) for t in texts]


def test_retraining_embeds_only_inputs_it_has_not_seen(runner_and_graft, monkeypatch) -> None:
    runner, graft = runner_and_graft
    backbone = runner.backbones["minilm_l6"]
    texts = SPORTS + COOKING
    text_of = {
        tuple(ids): t for t, ids in zip(texts, token_ids(texts, backbone.tokenizer), strict=True)
    }
    embedded: list[str] = []
    real_embed = backbone.embed_tokens

    def counting_embed(rows):
        # Each training also embeds the label names, as prior knowledge: not inputs.
        embedded.extend(text_of[tuple(r)] for r in rows if tuple(r) in text_of)
        return real_embed(rows)

    monkeypatch.setattr(backbone, "embed_tokens", counting_embed)
    tenant, _ = graft.store.create_tenant(name="t")
    first = _examples("sports", SPORTS[:3]) + _examples("cooking", COOKING[:3])
    head = graft.create_head(tenant, name="h", backbone_id="minilm_l6", examples=first)
    assert head.status == "ready" and sorted(embedded) == sorted(SPORTS[:3] + COOKING[:3])

    embedded.clear()
    again = _examples("sports", SPORTS[:4]) + _examples("cooking", COOKING[:1])
    head = graft.add_examples(tenant, head.id, again)
    assert embedded == [SPORTS[3]]  # only the new text went through the backbone
    assert head.version == 2 and head.metrics["n_examples"] == 7

    # Another head of the same tenant reuses the cache too; another tenant does not.
    embedded.clear()
    graft.create_head(tenant, name="h2", backbone_id="minilm_l6", examples=first)
    assert embedded == []
    other, _ = graft.store.create_tenant(name="other")
    graft.create_head(other, name="h", backbone_id="minilm_l6", examples=first)
    assert len(embedded) == 6
