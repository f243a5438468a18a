"""Test inputs made on the fly or shipped by installed packages; nothing from ../shared."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np

from bench.common import crops  # noqa: F401 (the tests' photos too)
from models.registry import ImagePreprocessing


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def image_examples(per_label: int, *, seed: int) -> list[dict]:
    return [
        {"label": label, "image": b64(data)}
        for label, name in (("temple", "china.jpg"), ("flower", "flower.jpg"))
        for data in crops(name, per_label, seed=seed)
    ]


SPORTS = [
    "The striker scored twice in the second half to win the match.",
    "Our team lost the final after extra time and penalties.",
    "The coach praised the defence after a clean sheet on Saturday.",
    "She won the gold medal in the 100 metres sprint.",
    "The goalkeeper saved a penalty in the last minute.",
    "The tennis champion lost in the quarter-finals this year.",
    "Fans cheered as the home side took the league title.",
    "He ran the marathon in under three hours.",
]
COOKING = [
    "Simmer the onions in butter until they turn golden.",
    "Whisk the eggs with sugar, then fold in the flour.",
    "Roast the chicken for an hour at two hundred degrees.",
    "Add a pinch of salt and let the sauce reduce slowly.",
    "Knead the dough and leave it to rise overnight.",
    "Chop the garlic finely and fry it in olive oil.",
    "Bake the cake until a skewer comes out clean.",
    "Season the soup with pepper and fresh herbs before serving.",
]


def text_examples(n: int, *, offset: int = 0) -> list[dict]:
    return [
        {"label": label, "text": text}
        for label, texts in (("sports", SPORTS), ("cooking", COOKING))
        for text in texts[offset : offset + n]
    ]


def label_folders(root: Path, per_label: int, *, seed: int) -> Path:
    """A folder per label as people keep them: `temple/` and `flower/` with JPEG crops."""
    for label, name in (("temple", "china.jpg"), ("flower", "flower.jpg")):
        (root / label).mkdir(parents=True)
        for index, data in enumerate(crops(name, per_label, seed=seed)):
            (root / label / f"{label}-{index}.jpg").write_bytes(data)
    return root


def text_folders(root: Path, per_label: int) -> Path:
    """`sports/` and `cooking/`, each with one .txt file of one example per line."""
    for label, texts in (("sports", SPORTS), ("cooking", COOKING)):
        (root / label).mkdir(parents=True)
        (root / label / "examples.txt").write_text("\n".join(texts[:per_label]) + "\n")
    return root


def assert_error(response, status: int, code: str | None = None) -> dict:
    """The documented error shape, with the expected status (and code, when given)."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert isinstance(body["error"]["code"], str) and body["error"]["code"], body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


def exported_image_preprocessing(meta: dict[str, str]) -> ImagePreprocessing:
    """The preprocessing an exported image model declares in its metadata, as a client
    reads it from `graft.preprocessing`."""
    pre = json.loads(meta["graft.preprocessing"])
    return ImagePreprocessing(
        image_size=pre["center_crop"],
        resize_size=pre["resize_shorter_side"],
        mean=tuple(pre["mean"]),
        std=tuple(pre["std"]),
        interpolation=pre["interpolation"],
    )


def exported_text_feeds(
    client, backbone_id: str, meta: dict[str, str], texts: list[str]
) -> dict[str, np.ndarray]:
    """An exported text model's feeds for `texts`, as a client makes them: the backbone's
    tokenizer from the API, truncated as the model's metadata says, padded per batch."""
    from tokenizers import Tokenizer

    answer = client.get(f"/v1/backbones/{backbone_id}/tokenizer.json")
    assert answer.status_code == 200, answer.text
    tokenizer = Tokenizer.from_str(answer.text)
    tokenizer.enable_truncation(json.loads(meta["graft.preprocessing"])["max_tokens"])
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id("[PAD]"))
    encoded = tokenizer.encode_batch(texts)
    return {
        "input_ids": np.array([e.ids for e in encoded], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encoded], dtype=np.int64),
    }
