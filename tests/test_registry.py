from __future__ import annotations

import pytest

from models.registry import ImagePreprocessing, TextPreprocessing, get_backbone, list_backbones

SPECS = list_backbones()


def test_embedded_defaults_are_registered() -> None:
    assert {s.id for s in SPECS} >= {"efficientnet_lite0", "minilm_l6"}
    assert len({s.id for s in SPECS}) == len(SPECS)
    assert get_backbone("no_such_backbone") is None


@pytest.mark.parametrize("spec", SPECS, ids=[s.id for s in SPECS])
def test_spec_is_complete_and_weights_ship_with_a_package(spec) -> None:
    assert spec.modality in ("image", "text")
    assert spec.embedding_dim > 0
    assert spec.weights_file().is_file(), "weights must come from an installed package"
    assert len(spec.weights_hash()) == 64
    public = spec.public()
    assert public["id"] == spec.id and public["embedding_dim"] == spec.embedding_dim
    assert set(public["onnx_inputs"]) == set(spec.onnx_inputs)
    if spec.modality == "image":
        assert isinstance(spec.preprocessing, ImagePreprocessing)
        assert spec.preprocessing.resize_size >= spec.preprocessing.image_size
    else:
        assert isinstance(spec.preprocessing, TextPreprocessing)
        assert spec.preprocessing.tokenizer_file().is_file()
