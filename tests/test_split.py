"""A backbone cut into a shared trunk and a top that takes a head's LoRA factors
(models/split.py): together they are the backbone, in PyTorch and as ONNX graphs; text
encoders and image networks."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from models.export import ensure_split
from models.preprocess import load_tokenizer, pad_tokens, token_ids
from models.runtime import Backbone
from models.split import TOP_LAYERS, export_split
from service.settings import get_backbone

TEXTS = ["goal!", "Simmer the onions in butter until they turn golden and soft."]


@pytest.fixture(scope="module")
def minilm():
    spec = get_backbone("minilm_l6")
    pre = spec.preprocessing
    tokenizer = load_tokenizer(pre.tokenizer_file(), pre.max_tokens)
    feeds = pad_tokens(token_ids(TEXTS, tokenizer), pre.pad_id())  # padded: rows differ
    trunk, top = spec.build_split()
    return spec, feeds, trunk, top


def _factors(top, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) * 0.02 for shape in top.factor_shapes()]


def test_trunk_and_top_are_the_served_backbone(minilm, text_backbone) -> None:
    _, feeds, trunk, top = minilm
    ids, mask = (torch.from_numpy(feeds[k]) for k in ("input_ids", "attention_mask"))
    with torch.inference_mode():
        embedding = top(trunk(ids, mask), mask).numpy()
    np.testing.assert_allclose(embedding, text_backbone.embed_texts(TEXTS), atol=2e-4)
    assert len(top.linears) == 6 * TOP_LAYERS  # q, k, v, attention out, two feed-forward


def test_a_heads_factors_change_the_top_and_nothing_else(minilm) -> None:
    _, feeds, trunk, top = minilm
    ids, mask = (torch.from_numpy(feeds[k]) for k in ("input_ids", "attention_mask"))
    with torch.inference_mode():
        hidden = trunk(ids, mask)
        plain = top(hidden, mask)
        tuned = top(hidden, mask, *_factors(top, 0))
        again = top(hidden, mask)
    assert (tuned - plain).abs().max() > 1e-3
    torch.testing.assert_close(again, plain)  # the factors do not stay behind
    np.testing.assert_allclose(torch.linalg.norm(tuned, dim=1), 1.0, atol=1e-5)


def test_the_onnx_trunk_and_top_match_pytorch(minilm, tmp_path) -> None:
    _, feeds, trunk, top = minilm
    export_split(trunk, top, tmp_path / "trunk.onnx", tmp_path / "top.onnx")
    options = {"providers": ["CPUExecutionProvider"]}
    trunk_session = ort.InferenceSession(str(tmp_path / "trunk.onnx"), **options)
    top_session = ort.InferenceSession(str(tmp_path / "top.onnx"), **options)
    hidden = trunk_session.run(["hidden"], feeds)[0]
    factors = _factors(top, 1)
    names = [i.name for i in top_session.get_inputs()][2:]
    assert names[:2] == ["lora_a_0", "lora_b_0"] and len(names) == len(factors)
    onnx_embedding = top_session.run(
        ["embedding"],
        {
            "hidden": hidden,
            "attention_mask": feeds["attention_mask"],
            **{n: f.numpy() for n, f in zip(names, factors, strict=True)},
        },
    )[0]
    ids, mask = (torch.from_numpy(feeds[k]) for k in ("input_ids", "attention_mask"))
    with torch.inference_mode():
        np.testing.assert_allclose(hidden, trunk(ids, mask).numpy(), atol=1e-4)
        expected = top(torch.from_numpy(hidden), mask, *factors).numpy()
    np.testing.assert_allclose(onnx_embedding, expected, atol=1e-4)


def test_the_served_split_gives_frozen_and_fine_tuned_rows_their_embeddings(
    minilm, backbone_dir, text_backbone
) -> None:
    spec, _, trunk, top = minilm
    split = Backbone(spec, text_backbone.onnx_path, split=ensure_split(spec, backbone_dir))
    assert split.fine_tunable and not text_backbone.fine_tunable
    texts = [*TEXTS, "a third, longer sentence that pads the others in its batch", "ok"]
    ids = token_ids(texts, text_backbone.tokenizer)
    # Frozen rows: the whole backbone's embeddings.
    np.testing.assert_allclose(split.embed_tokens(ids), text_backbone.embed_tokens(ids), atol=1e-5)
    # Rows 1 and 3 through one head's top, row 2 through another's, row 0 frozen.
    factors = [[f.numpy().astype(np.float16) for f in _factors(top, seed)] for seed in (2, 3)]
    groups = [(np.array([1, 3]), factors[0]), (np.array([2]), factors[1])]
    mixed = split.embed_tokens(ids, groups)
    np.testing.assert_allclose(mixed[0], text_backbone.embed_tokens(ids[:1])[0], atol=1e-5)
    feeds = pad_tokens(ids, spec.preprocessing.pad_id())
    torch_ids, mask = (torch.from_numpy(feeds[k]) for k in ("input_ids", "attention_mask"))
    with torch.inference_mode():
        hidden = trunk(torch_ids, mask)
        for rows, head_factors in groups:
            tensors = [torch.from_numpy(f.astype(np.float32)) for f in head_factors]
            expected = top(hidden[rows], mask[rows], *tensors).numpy()
            np.testing.assert_allclose(mixed[rows], expected, atol=1e-4)
    with pytest.raises(ValueError, match="not served split"):
        text_backbone.embed_tokens(ids, groups)
    # Factors of another shape are refused before they join (and fail) a batch.
    split.check_factors(("h/1", factors[0]))
    with pytest.raises(ValueError, match="do not fit"):
        split.check_factors(("h/1", factors[0][:-1]))


def test_an_image_network_is_served_split_with_each_heads_top(image_backbone, backbone_dir) -> None:
    spec = image_backbone.spec
    trunk, top = spec.build_split()
    # lite0's top: the last stage's expansion and projection, and the head convolution.
    assert [(c.in_features, c.out_features) for c in top.linears] == [
        (192, 1152),
        (1152, 320),
        (320, 1280),
    ]
    split = Backbone(spec, image_backbone.onnx_path, split=ensure_split(spec, backbone_dir))
    side = spec.preprocessing.image_size
    images = np.random.default_rng(0).integers(0, 256, (5, side, side, 3), np.uint8)
    whole = image_backbone.embed_images(images)
    np.testing.assert_allclose(split.embed_images(images), whole, atol=1e-5)
    factors = [[f.numpy().astype(np.float16) for f in _factors(top, seed)] for seed in (4, 5)]
    groups = [(np.array([0, 3]), factors[0]), (np.array([4]), factors[1])]
    mixed = split.embed_images(images, groups)
    np.testing.assert_allclose(mixed[[1, 2]], whole[[1, 2]], atol=1e-5)
    with torch.inference_mode():
        hidden = trunk(torch.from_numpy(images))
        for rows, head_factors in groups:
            tensors = [torch.from_numpy(f.astype(np.float32)) for f in head_factors]
            expected = top(hidden[rows], *tensors).numpy()
            assert np.abs(expected - whole[rows]).max() > 1e-3  # the factors matter
            np.testing.assert_allclose(mixed[rows], expected, atol=1e-4)
    with pytest.raises(ValueError, match="not served split"):
        image_backbone.embed_images(images, groups)
