"""Features from every depth (models/depths.py): each served row's depths are the pooled
outputs of the backbone's stages or layers, the same whether the backbone is served whole
or cut into trunk and top, and a fine-tuned head's top changes only the depths it holds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModel

from models.export import depth_widths, ensure_split
from models.preprocess import pad_tokens, token_ids
from models.runtime import Backbone

TEXTS = ["goal!", "Simmer the onions in butter until they turn golden and soft.", "ok then"]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_image_depths_are_each_stage_average_pooled(image_backbone) -> None:
    spec = image_backbone.spec
    side = spec.image_preprocessing.image_size
    images = np.random.default_rng(0).integers(0, 256, (3, side, side, 3), np.uint8)
    rows = image_backbone.embed_images(images, depths=True)
    assert image_backbone.depth_widths == [16, 24, 40, 112, 320]  # lite0's five stages
    assert rows.shape == (3, 1280 + 512) and image_backbone.feature_dim == 1792
    module = spec.build_module()
    with torch.inference_mode():
        x = module.scaled(torch.from_numpy(images))
        stages = module.backbone.forward_intermediates(x, intermediates_only=True)
    expected = np.hstack([_unit(stage.mean(dim=(2, 3)).numpy()) for stage in stages])
    np.testing.assert_allclose(rows[:, 1280:], expected, atol=1e-4)
    np.testing.assert_array_equal(rows[:, :1280], image_backbone.embed_images(images))


def test_text_depths_are_each_layers_masked_mean_but_the_last(text_backbone) -> None:
    spec = text_backbone.spec
    ids = token_ids(TEXTS, text_backbone.tokenizer)
    rows = text_backbone.embed_tokens(ids, depths=True)
    assert text_backbone.depth_widths == [384] * 5  # MiniLM-L6: layers 1 to 5
    feeds = pad_tokens(ids, spec.text_preprocessing.pad_id())
    assert (feeds["attention_mask"] == 0).any(), "rows of different lengths are padded"
    model = AutoModel.from_pretrained(str(spec.weights_file()), local_files_only=True).eval()
    mask = feeds["attention_mask"][..., None]
    with torch.inference_mode():
        hidden = model(
            **{k: torch.from_numpy(v) for k, v in feeds.items()}, output_hidden_states=True
        ).hidden_states
    expected = np.hstack([_unit((h.numpy() * mask).sum(1) / mask.sum(1)) for h in hidden[1:-1]])
    np.testing.assert_allclose(rows[:, 384:], expected, atol=1e-4)


@pytest.mark.parametrize("which", ["image", "text"])
def test_the_split_gives_the_same_depths_and_a_tuned_top_changes_only_its_own(
    which, image_backbone, text_backbone, backbone_dir
) -> None:
    whole = image_backbone if which == "image" else text_backbone
    spec = whole.spec
    split = Backbone(spec, whole.onnx_path, split=ensure_split(spec, backbone_dir))
    if which == "image":
        side = spec.image_preprocessing.image_size
        rows = np.random.default_rng(1).integers(0, 256, (4, side, side, 3), np.uint8)
    else:
        rows = token_ids([*TEXTS, "a fourth"], whole.tokenizer)
    frozen = whole.embed_rows(rows, depths=True)
    assert split.depth_widths == whole.depth_widths
    np.testing.assert_allclose(split.embed_rows(rows, depths=True), frozen, atol=1e-5)
    rng = np.random.default_rng(2)
    factors = [
        (rng.standard_normal(i.shape) * 0.05).astype(np.float16) for i in split._factor_inputs
    ]
    tuned = split.embed_rows(rows, [(np.array([1, 2]), factors)], depths=True)
    # The trunk's depths are shared; the top's (after them) and the embedding are the head's.
    dim = spec.embedding_dim
    trunk_end = dim + sum(depth_widths(split.trunk))
    assert dim < trunk_end < split.feature_dim  # both the trunk and the top give depths
    np.testing.assert_allclose(tuned[:, dim:trunk_end], frozen[:, dim:trunk_end], atol=1e-5)
    np.testing.assert_allclose(tuned[[0, 3]], frozen[[0, 3]], atol=1e-5)
    assert np.abs(tuned[1:3, trunk_end:] - frozen[1:3, trunk_end:]).max() > 1e-3
    assert np.abs(tuned[1:3, :dim] - frozen[1:3, :dim]).max() > 1e-3


def test_without_depths_a_row_is_its_embedding_alone(image_backbone) -> None:
    side = image_backbone.spec.image_preprocessing.image_size
    images = np.zeros((2, side, side, 3), np.uint8)
    assert image_backbone.embed_images(images).shape == (2, 1280)
