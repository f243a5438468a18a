"""A text encoder cut into a shared trunk and a top that takes a head's LoRA factors
(models/split.py): together they are the backbone, in PyTorch and as ONNX graphs."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from models.preprocess import load_tokenizer, pad_tokens, token_ids
from models.registry import get_backbone
from models.split import TOP_LAYERS, export_text_split

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
    export_text_split(trunk, top, tmp_path / "trunk.onnx", tmp_path / "top.onnx")
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
