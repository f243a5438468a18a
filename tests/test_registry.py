from __future__ import annotations

import pytest

from models.registry import AudioPreprocessing, ImagePreprocessing, TextPreprocessing
from service.settings import get_backbone, list_backbones

SPECS = list_backbones()


def test_embedded_defaults_are_registered() -> None:
    assert {s.id for s in SPECS} >= {"efficientnet_lite0", "minilm_l6", "mpnet_base_v2"}
    assert len({s.id for s in SPECS}) == len(SPECS)
    assert get_backbone("no_such_backbone") is None


@pytest.mark.parametrize("spec", SPECS, ids=[s.id for s in SPECS])
def test_spec_is_complete_and_weights_ship_with_a_package(spec) -> None:
    assert spec.modality in ("image", "text", "audio")
    assert spec.embedding_dim > 0
    assert spec.weights_file().exists(), "weights must come from an installed package"
    assert spec.source != "local file", "built-in weights come from packages"
    assert len(spec.weights_hash()) == 64 and len(spec.export_key()) == 64
    public = spec.public()
    assert public["id"] == spec.id and public["embedding_dim"] == spec.embedding_dim
    assert public["family"] and public["license"] != "unknown"
    assert set(public["onnx_inputs"]) == set(spec.onnx_inputs)
    if spec.modality == "image":
        assert isinstance(spec.preprocessing, ImagePreprocessing)
        assert spec.preprocessing.resize_size >= spec.preprocessing.image_size
    elif spec.modality == "audio":
        assert isinstance(spec.preprocessing, AudioPreprocessing)
        assert public["preprocessing"]["sample_rate"] == spec.preprocessing.sample_rate
    else:
        assert isinstance(spec.preprocessing, TextPreprocessing)
        assert spec.preprocessing.tokenizer_file().is_file()


IMAGE_PRE = (
    "preprocessing = { image_size = 64, resize_size = 72, mean = [0.5, 0.5, 0.5],"
    " std = [0.5, 0.5, 0.5] }"
)
TIMM_ENTRY = f'kind = "timm"\nfamily = "ResNet"\nembedding_dim = 512\n{IMAGE_PRE}\n'
BAD_FILES = {
    "unknown kind": (
        '[mine]\nkind = "keras"\nfamily = "F"\nembedding_dim = 3\n',
        "kind must be one of",
    ),
    "missing field": (
        f'[mine]\n{TIMM_ENTRY}weights = {{ path = "w.pth" }}\n',
        "entry 'mine': architecture: Field required",
    ),
    "crop outside the resize": (
        f'[mine]\n{TIMM_ENTRY.replace("72", "32")}architecture = "resnet18"\n'
        'weights = { path = "w.pth" }\n',
        "resize_size must be at least image_size",
    ),
    "unknown pooling": (
        '[mine]\nkind = "transformers"\nfamily = "BERT"\nembedding_dim = 8\n'
        'model = { path = "m" }\npooling = "max"\nmax_tokens = 8\n',
        "entry 'mine': pooling",
    ),
    "a field no kind has": (
        f'[mine]\n{TIMM_ENTRY}architecture = "resnet18"\nweights = {{ path = "w.pth" }}\n'
        "colour = 1\n",
        "entry 'mine': colour: Extra inputs are not permitted",
    ),
    "partial windows that leave gaps": (
        '[mine]\nkind = "ge2e"\nfamily = "GE2E"\nembedding_dim = 256\n'
        'weights = { path = "w.pt" }\npreprocessing = { partials_per_second = 0.1 }\n',
        "entry 'mine': preprocessing: partials_per_second must start a partial",
    ),
    "not TOML": ("[mine\n", "not valid TOML"),
    "a reserved id": (
        f'[auto]\n{TIMM_ENTRY}architecture = "resnet18"\nweights = {{ path = "w.pth" }}\n',
        "backbones file {dir}/backbones.toml:\n  entry 'auto': the id is reserved",
    ),
    "an id that cannot be a file name": (
        f'["My Net"]\n{TIMM_ENTRY}architecture = "resnet18"\nweights = {{ path = "w.pth" }}\n',
        "entry 'My Net': an id is lower-case letters",
    ),
    "an id taken by a built-in": (
        f'[minilm_l6]\n{TIMM_ENTRY}architecture = "resnet18"\nweights = {{ path = "w.pth" }}\n',
        "entry 'minilm_l6' is already declared",
    ),
    "missing weights": (
        f'[mine]\n{TIMM_ENTRY}architecture = "resnet18"\nweights = {{ path = "w.pth" }}\n',
        "backbone 'mine': {dir}/w.pth does not exist",
    ),
    "package not installed": (
        f'[mine]\n{TIMM_ENTRY}architecture = "resnet18"\n'
        'weights = { distribution = "no-such-weights-package", path = "w.pth" }\n',
        "backbone 'mine': package 'no-such-weights-package' is not installed",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_bad_backbones_file_fails_at_start_naming_the_entry(tmp_path, case) -> None:
    from pydantic import ValidationError

    from service.settings import Settings

    text, expected = BAD_FILES[case]
    path = tmp_path / "backbones.toml"
    path.write_text(text)
    with pytest.raises(ValidationError) as raised:
        Settings(data_dir=tmp_path, backbones_file=path, backbones="mine")
    message = str(raised.value)
    assert str(path) in message or "does not exist" in message or "not installed" in message
    assert expected.format(dir=tmp_path) in message, message


def test_a_good_file_adds_to_the_built_ins(tmp_path) -> None:
    from service.settings import Settings

    (tmp_path / "w.pth").write_bytes(b"")
    path = tmp_path / "backbones.toml"
    path.write_text(
        f'[mine]\n{TIMM_ENTRY}architecture = "resnet18"\nweights = {{ path = "w.pth" }}\n'
    )
    settings = Settings(data_dir=tmp_path, backbones_file=path, backbones="mine,minilm_l6")
    assert [s.id for s in settings.loaded_backbones()] == ["mine", "minilm_l6"]
    assert {"efficientnet_lite0", "mine"} <= set(settings.catalog)
    mine = settings.catalog["mine"]
    assert (mine.family, mine.source, mine.license) == ("ResNet", "local file", "unknown")
    assert mine.weights_file() == tmp_path / "w.pth"


def test_weights_in_pieces_are_joined_checked_and_unpacked_once(tmp_path) -> None:
    import hashlib
    import io
    import zipfile

    from models.registry import BackboneFileError
    from service.settings import Settings

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zipped:
        zipped.writestr("net/w.pth", b"weights")
    archive = buffer.getvalue()
    (tmp_path / "pieces").mkdir()
    (tmp_path / "pieces" / "a.001").write_bytes(archive[:50])
    (tmp_path / "pieces" / "a.002").write_bytes(archive[50:])

    def declare(sha256: str) -> Settings:
        path = tmp_path / "backbones.toml"
        path.write_text(
            f'[mine]\n{TIMM_ENTRY}architecture = "resnet18"\n'
            f'weights = {{ sha256 = "{sha256}", folder = "net/w.pth", parts = ['
            '{ path = "pieces/a.001" }, { path = "pieces/a.002" }] }\n'
        )
        return Settings(
            data_dir=tmp_path / f"data-{sha256[:4]}", backbones_file=path, backbones="mine"
        )

    wrong = declare("0" * 64).catalog["mine"]
    with pytest.raises(BackboneFileError, match="backbone 'mine': the joined pieces have sha256"):
        wrong.weights_file()
    # Pieces are found beside the backbones file, wherever the server runs from.
    right = declare(hashlib.sha256(archive).hexdigest()).catalog["mine"]
    unpacked = right.weights_file()
    assert unpacked.read_bytes() == b"weights"
    assert unpacked.parent.parent.parent.name == "sources" and right.weights_file() == unpacked
