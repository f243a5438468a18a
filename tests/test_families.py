"""Every backbone family transfer learning is known by, end to end through a backbones
file: VGG, ResNet, Inception, EfficientNet and MobileNet via timm; BERT, RoBERTa, XLNet,
GPT-2 and T5's encoder via transformers; and an operator's own ONNX files.

Each is its real architecture in a small configuration, with weights this test makes
(random, saved as a state dict or safetensors) in a temporary folder: declared, exported,
compared with PyTorch, served, a head trained and asked over HTTP, the head's model
downloaded and run. This proves the plumbing, not accuracy (no such weights ship as
packages; README, Backbones)."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from models.export import ensure_onnx, export_onnx
from models.preprocess import token_ids, tokenize
from models.registry import BackboneFileError, load_catalog
from models.runtime import Backbone
from tests.inputs import COOKING, SPORTS
from tests.server import BENTOML, start_test_server, stop_server

pytestmark = pytest.mark.families

# id: (timm architecture, model_args, input side, resize side, interpolation, file suffix)
TIMM = {
    # VGG's 4096-wide first classifier layer is narrowed (mlp_ratio): 1.6M parameters, not 103M.
    "vgg": ("vgg11", {"mlp_ratio": 1 / 64}, 224, 256, "bilinear", ".pth"),
    "resnet": ("resnet18", {}, 128, 146, "bilinear", ".safetensors"),
    "inception": ("inception_v3", {}, 299, 342, "bicubic", ".pth"),
    "efficientnet": ("efficientnet_b0", {}, 224, 256, "bicubic", ".safetensors"),
    "mobilenet": ("mobilenetv3_small_100", {}, 224, 256, "bilinear", ".pth"),
}
# id: (config class, its small configuration, pooling, tokenizer model)
SMALL = {"num_hidden_layers": 2, "num_attention_heads": 2, "hidden_size": 32}
TRANSFORMERS = {
    "bert": ("BertConfig", {**SMALL, "intermediate_size": 64}, "cls", "wordpiece"),
    "roberta": ("RobertaConfig", {**SMALL, "intermediate_size": 64}, "mean", "bpe"),
    "xlnet": (
        "XLNetConfig",
        {"n_layer": 2, "n_head": 2, "d_model": 32, "d_inner": 64},
        "last",
        "unigram",
    ),
    "gpt2": (
        "GPT2Config",
        {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 128},
        "last",
        "bpe",
    ),
    "t5": (
        "T5Config",
        {"num_layers": 2, "num_heads": 2, "d_model": 32, "d_kv": 16, "d_ff": 64},
        "mean",
        "unigram",
    ),
}
FAMILIES = {
    "vgg": "VGG",
    "resnet": "ResNet",
    "inception": "Inception",
    "efficientnet": "EfficientNet",
    "mobilenet": "MobileNet",
    "bert": "BERT",
    "roberta": "RoBERTa",
    "xlnet": "XLNet",
    "gpt2": "GPT-2",
    "t5": "T5",
    "onnx_image": "ResNet",
    "onnx_text": "BERT",
}
IMAGENET = "mean = [0.485, 0.456, 0.406], std = [0.229, 0.224, 0.225]"
CORPUS = SPORTS + COOKING + ["the quick brown fox jumps over the lazy dog"] * 3


def _tokenizer(kind: str):
    """A real tokenizer of the family's kind, trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    special = ["<pad>", "<unk>", "<s>", "</s>"]
    if kind == "wordpiece":
        special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
        tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tokenizer.normalizer = normalizers.BertNormalizer()
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=special)
    elif kind == "bpe":
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=special,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
    else:
        tokenizer = Tokenizer(models.Unigram())
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=200, special_tokens=special, unk_token="<unk>")
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


def _image(colour: tuple[int, int, int], seed: int) -> str:
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.normal(0, 30, (80, 96, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A backbones file declaring every family, with weights made here."""
    import timm
    import transformers
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("families")
    torch.manual_seed(0)
    lines = []
    for name, (arch, args, side, resize, interpolation, suffix) in TIMM.items():
        model = timm.create_model(arch, pretrained=False, **args).eval()
        weights = root / f"{name}{suffix}"
        if suffix == ".safetensors":
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
        else:
            torch.save(model.state_dict(), weights)
        model.reset_classifier(0)
        with torch.inference_mode():
            dim = model(torch.zeros(1, 3, side, side)).flatten(1).shape[1]
        lines += [
            f"[{name}]",
            'kind = "timm"',
            f'family = "{FAMILIES[name]}"',
            f"embedding_dim = {dim}",
            f'architecture = "{arch}"',
            f"model_args = {json.dumps(args)}".replace(":", " ="),
            f'weights = {{ path = "{weights.name}" }}',
            f"preprocessing = {{ image_size = {side}, resize_size = {resize}, {IMAGENET},"
            f' interpolation = "{interpolation}" }}',
            "",
        ]
    for name, (config_class, config, pooling, tokenizer_kind) in TRANSFORMERS.items():
        folder = root / name
        tokenizer = _tokenizer(tokenizer_kind)
        config = getattr(transformers, config_class)(
            vocab_size=tokenizer.get_vocab_size(),
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
            **config,
        )
        model = transformers.AutoModel.from_config(config)
        model.save_pretrained(folder)
        tokenizer.save(str(folder / "tokenizer.json"))
        dim = getattr(config, "hidden_size", None) or config.d_model
        lines += [
            f"[{name}]",
            'kind = "transformers"',
            f'family = "{FAMILIES[name]}"',
            f"embedding_dim = {dim}",
            f'model = {{ path = "{name}" }}',
            f'pooling = "{pooling}"',
            "max_tokens = 64",
            "",
        ]
    # An operator's own ONNX files: a ResNet taking scaled NCHW floats, and BERT's hidden
    # states per token (pooled by Graft).
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    torch.onnx.export(
        resnet,
        (torch.zeros(1, 3, 96, 96),),
        str(root / "resnet.onnx"),
        input_names=["x"],
        output_names=["features"],
        dynamic_axes={"x": {0: "n"}},
        opset_version=17,
        dynamo=False,
    )

    class HiddenStates(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = transformers.AutoModel.from_pretrained(str(root / "bert")).eval()

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    ids = torch.ones(1, 5, dtype=torch.int64)
    torch.onnx.export(
        HiddenStates().eval(),
        (ids, ids, torch.zeros_like(ids)),
        str(root / "bert.onnx"),
        input_names=["input_ids", "attention_mask", "token_type_ids"],
        output_names=["last_hidden_state"],
        dynamic_axes={
            n: {0: "n", 1: "t"} for n in ("input_ids", "attention_mask", "token_type_ids")
        },
        opset_version=17,
        dynamo=False,
    )
    lines += [
        "[onnx_image]",
        'kind = "onnx"',
        'family = "ResNet"',
        'modality = "image"',
        "embedding_dim = 512",
        'model = { path = "resnet.onnx" }',
        f"preprocessing = {{ image_size = 96, resize_size = 110, {IMAGENET} }}",
        "",
        "[onnx_text]",
        'kind = "onnx"',
        'family = "BERT"',
        'modality = "text"',
        "embedding_dim = 32",
        'model = { path = "bert.onnx" }',
        'pooling = "mean"',
        'text = { tokenizer = { path = "bert/tokenizer.json" }, max_tokens = 64 }',
        "",
    ]
    path = root / "backbones.toml"
    path.write_text("\n".join(lines))
    return path


@pytest.fixture(scope="module")
def catalog(families: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return load_catalog(families, tmp_path_factory.mktemp("sources"), check_files=list(FAMILIES))


@pytest.fixture(scope="module")
def exported(catalog: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("family-backbones")
    for backbone_id in FAMILIES:
        ensure_onnx(catalog[backbone_id], cache)
    return cache


@pytest.mark.parametrize("backbone_id", list(FAMILIES))
def test_each_family_exports_faithfully(catalog: dict, exported: Path, backbone_id: str) -> None:
    spec = catalog[backbone_id]
    assert spec.family == FAMILIES[backbone_id]
    backbone = Backbone(spec, ensure_onnx(spec, exported))
    rng = np.random.default_rng(0)
    if spec.modality == "image":
        side = spec.preprocessing.image_size
        images = rng.integers(0, 256, (3, side, side, 3), dtype=np.uint8)
        got = backbone.embed_images(images)
        expected = _reference_image(spec, images)
    else:
        texts = [SPORTS[0], "a short one", COOKING[1] * 3]  # the last is truncated
        got = backbone.embed_texts(texts)
        feeds = tokenize(texts, backbone.tokenizer, backbone.pad_id)
        assert (feeds["attention_mask"] == 0).any(), "rows of different lengths are padded"
        expected = _reference_text(spec, feeds)
    assert got.shape == (3, spec.embedding_dim)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(got, expected, atol=2e-4)
    # Every family gives its depths in the same pass (models/depths.py); an operator's
    # ONNX file gives no stages: its embedding is its only depth.
    rows = images if spec.modality == "image" else token_ids(texts, backbone.tokenizer)
    with_depths = backbone.embed_rows(rows, depths=True)
    np.testing.assert_allclose(with_depths[:, : spec.embedding_dim], got, atol=1e-6)
    assert (backbone.depth_widths == []) == (spec.onnx_file is not None)
    edges = np.cumsum([spec.embedding_dim, *backbone.depth_widths])
    for start, stop in zip(edges[:-1], edges[1:], strict=True):
        np.testing.assert_allclose(np.linalg.norm(with_depths[:, start:stop], axis=1), 1, atol=1e-4)


def _reference_image(spec, images: np.ndarray) -> np.ndarray:
    """PyTorch's embedding, or for an ONNX entry its own file run on scaled floats."""
    if spec.build_module is not None:
        with torch.inference_mode():
            return spec.build_module()(torch.from_numpy(images)).numpy()
    pre = spec.preprocessing
    x = (images.transpose(0, 3, 1, 2) / 255 - np.array(pre.mean)[:, None, None]) / np.array(
        pre.std
    )[:, None, None]
    session = ort.InferenceSession(str(spec.onnx_file()), providers=["CPUExecutionProvider"])
    out = session.run(None, {"x": x.astype(np.float32)})[0].reshape(len(images), -1)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def _reference_text(spec, feeds: dict) -> np.ndarray:
    if spec.build_module is not None:
        with torch.inference_mode():
            module = spec.build_module()
            return module(*(torch.from_numpy(feeds[k]) for k in spec.onnx_inputs)).numpy()
    session = ort.InferenceSession(str(spec.onnx_file()), providers=["CPUExecutionProvider"])
    hidden = session.run(None, {**feeds, "token_type_ids": np.zeros_like(feeds["input_ids"])})[0]
    mask = feeds["attention_mask"][..., None]
    out = (hidden * mask).sum(1) / mask.sum(1)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_a_wrong_embedding_size_fails_naming_the_entry(catalog: dict, tmp_path: Path) -> None:
    spec = dataclasses.replace(catalog["resnet"], embedding_dim=7)
    with pytest.raises(BackboneFileError, match="backbone 'resnet': declared embedding_dim 7"):
        export_onnx(spec, tmp_path / "resnet.onnx")


@pytest.mark.e2e
def test_every_family_is_served_over_http(families: Path, exported: Path, tmp_path: Path) -> None:
    server = start_test_server(
        BENTOML,
        tmp_path / "data",
        exported,
        {
            "GRAFT_BACKBONES_FILE": str(families),
            "GRAFT_BACKBONES": ",".join(FAMILIES),
            "GRAFT_API_WORKERS": "1",
            # Served whole: no family's trunk and top to export (fine-tuning has its tests).
            "GRAFT_FINE_TUNING": "false",
        },
    )
    try:
        with server.client() as client:
            listed = {b["id"]: b for b in client.get("/v1/backbones").json()["backbones"]}
        assert list(listed) == list(FAMILIES)
        for backbone_id, public in listed.items():
            assert public["family"] == FAMILIES[backbone_id]
            assert public["source"] == "local file" and public["memory_bytes"] >= 0
            assert public["speed_class"] in ("fast", "medium", "slow")
            # An operator's ONNX file gives no stages; every other family does.
            assert (public["depth_widths"] == []) == backbone_id.startswith("onnx_")
        with server.new_tenant("families") as tenant:
            for backbone_id, public in listed.items():
                if public["modality"] == "image":
                    examples = [
                        {"label": label, "image": _image(colour, seed)}
                        for label, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220)))
                        for seed in range(4)
                    ]
                    asked = [{"image": _image((210, 40, 30), 99)}]
                else:
                    examples = [{"label": "sports", "text": t} for t in SPORTS[:4]]
                    examples += [{"label": "cooking", "text": t} for t in COOKING[:4]]
                    asked = [{"text": SPORTS[5]}]
                created = tenant.post(
                    "/v1/heads",
                    json={"name": backbone_id, "backbone": backbone_id, "examples": examples},
                )
                assert created.status_code == 201, (backbone_id, created.text)
                head = created.json()
                assert head["backbone"] == backbone_id
                predicted = tenant.post(f"/v1/heads/{head['id']}/predict", json={"inputs": asked})
                assert predicted.status_code == 200, (backbone_id, predicted.text)
                top = predicted.json()["predictions"][0]
                assert top["label"] in {e["label"] for e in examples} | {"unknown"}
                model = tenant.get(f"/v1/heads/{head['id']}/model.onnx")
                assert model.status_code == 200, (backbone_id, model.text[:200])
                session = ort.InferenceSession(model.content, providers=["CPUExecutionProvider"])
                assert [i.name for i in session.get_inputs()] == list(public["onnx_inputs"])
    finally:
        stop_server(server)
