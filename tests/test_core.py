"""The application object without HTTP: the embedding cache and training on the whole set."""

from __future__ import annotations

import pytest

from service.core import Graft, RawInput
from service.settings import Settings
from tests.inputs import COOKING, SPORTS


@pytest.fixture
def graft(tmp_path, backbone_dir):
    app = Graft(Settings(data_dir=tmp_path, backbone_dir=backbone_dir))
    yield app
    app.close()


def _examples(label: str, texts: list[str]) -> list[tuple[str, RawInput]]:
    return [(label, RawInput("text", t)) for t in texts]


def test_retraining_embeds_only_inputs_it_has_not_seen(graft, monkeypatch) -> None:
    backbone = graft.backbones["minilm_l6"]
    embedded: list[str] = []
    real_embed = backbone.embed_texts

    def counting_embed(texts):
        # Each training also embeds the label names, as prior knowledge: not inputs.
        if texts != ["cooking", "sports"]:
            embedded.extend(texts)
        return real_embed(texts)

    monkeypatch.setattr(backbone, "embed_texts", counting_embed)
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
