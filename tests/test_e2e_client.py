"""The Python client and the `graft` command against a real server whose heads train in
the background (202, then polled), as big heads do."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from graft import Client, Examples, GraftError
from models.preprocess import decode_image
from tests.inputs import (
    COOKING,
    SPORTS,
    crops,
    exported_image_preprocessing,
    label_folders,
    text_folders,
)
from tests.server import ROOT, free_port
from tests.speech import COMMANDS, VOICES, clip_folders, sox, speak

pytestmark = pytest.mark.e2e

GRAFT = str(Path(sys.executable).parent / "graft")


@pytest.fixture(scope="module")
def tenant_key(polling_server) -> str:
    with Client(polling_server.base_url, polling_server.admin_key) as admin:
        return admin.create_tenant("client").api_key


def test_image_head_from_folders(polling_server, tenant_key, tmp_path) -> None:
    folders = label_folders(tmp_path / "photos", 6, seed=1)
    uploads, progress = [], []
    with Client(polling_server.base_url, tenant_key) as graft:
        head = graft.create_head(
            "sights",
            from_dir=folders,
            backbone="efficientnet_lite0",
            fine_tune="off",
            on_upload=lambda sent, total: uploads.append((sent, total)),
            on_progress=progress.append,
        )
        assert head.status == "ready" and head.version == 1
        assert head.labels == ["flower", "temple"] and head.metrics.n_examples == 12
        # The zip went up in pieces, each reported; the head was polled while it trained.
        assert uploads[-1][0] == uploads[-1][1] > 12 * 1000 and len(uploads) > 1
        assert progress and {p.stage for p in progress if p} <= {"embedding", "fitting"}

        # A path, bytes and a PIL image: one call, predictions in order.
        temple, flower = crops("china.jpg", 1, seed=9)[0], crops("flower.jpg", 1, seed=9)[0]
        (tmp_path / "temple.jpg").write_bytes(temple)
        pil_flower = Image.open(io.BytesIO(flower))
        answer = graft.predict(head.id, images=[tmp_path / "temple.jpg", flower, pil_flower])
        assert [p.label for p in answer.predictions] == ["temple", "flower", "flower"]
        assert answer.version == 1

        # Backbone + head as one ONNX model, written where asked.
        model = graft.export(head.id, tmp_path / "model.onnx")
        assert (tmp_path / "model.onnx").read_bytes() == model
        assert _exported_label(model, temple) == "temple"

        # Examples added from another folder: a new version on all of them.
        more = label_folders(tmp_path / "more", 2, seed=5)
        head = graft.add_examples(head.id, from_dir=more)
        assert head.version == 2 and head.metrics.n_examples == 16
        assert [h.id for h in graft.heads()] == [head.id]

        graft.delete_head(head.id)
        with pytest.raises(GraftError) as missing:
            graft.head(head.id)
        assert (missing.value.status, missing.value.code) == (404, "head_not_found")


def test_text_head_from_lines_and_texts(polling_server, tenant_key, tmp_path) -> None:
    folders = text_folders(tmp_path / "texts", 6)
    found = Examples.from_dir(folders)
    assert found.modality == "text" and len(found) == 12
    with Client(polling_server.base_url, tenant_key) as graft:
        head = graft.create_head("topics", found, backbone="minilm_l6", fine_tune="off")
        answer = graft.predict(head.id, texts=[SPORTS[7], COOKING[7]], top_k=2)
        assert [p.label for p in answer.predictions] == ["sports", "cooking"]
        assert [len(p.top_k) for p in answer.predictions] == [2, 2]
        # Unlabelled texts of the domain it will serve: version 2 reports on them.
        head = graft.add_unlabeled(head.id, texts=[SPORTS[6], COOKING[6], "Serve it warm"])
        assert head.version == 2 and head.metrics.domain.n_unlabeled == 3
        graft.delete_head(head.id)


def test_voice_head_from_clip_folders_by_client_and_command(
    polling_server, tenant_key, tmp_path
) -> None:
    """Folders of WAV clips; clips as a path, bytes and numpy samples; the command's
    `--from` and a clip to predict."""
    import soundfile

    folders = clip_folders(tmp_path / "clips", 4)
    found = Examples.from_dir(folders)
    assert found.modality == "audio" and len(found) == 16
    go = speak("go", VOICES[2], 3)
    (tmp_path / "go.wav").write_bytes(go)
    samples, rate = soundfile.read(io.BytesIO(go), dtype="float32")
    with Client(polling_server.base_url, tenant_key) as graft:
        # `auto`: the zip's .wav names say it is audio.
        head = graft.create_head("commands", found, backbone="auto")
        assert head.backbone == "resemblyzer_ge2e" and head.labels == sorted(COMMANDS)
        answer = graft.predict(
            head.id, clips=[tmp_path / "go.wav", sox(go, out_type="flac"), (samples, rate)]
        )
        labels = [p.label for p in answer.predictions]
        assert len(set(labels)) == 1, labels  # one clip three ways: one answer
        # Unlabelled clips of where it will serve (another room: noise and echo added).
        noisy = [sox(speak(w, VOICES[0], 2), "reverb", "40") for w in COMMANDS]
        head = graft.add_unlabeled(head.id, clips=noisy)
        assert head.version == 2 and head.metrics.domain.n_unlabeled == 4
        graft.delete_head(head.id)

    made = _graft(polling_server, tenant_key, "heads", "create", "by-voice", "--from", str(folders))
    assert made.returncode == 0, made.stderr
    assert "16 audio examples" in made.stderr
    with Client(polling_server.base_url, tenant_key) as graft:
        [head_id] = [h.id for h in graft.heads() if h.name == "by-voice"]
    said = _graft(
        polling_server, tenant_key, "predict", head_id, str(tmp_path / "go.wav"), "--json"
    )
    assert said.returncode == 0, said.stderr
    assert json.loads(said.stdout)["predictions"][0]["label"] == labels[0]


def test_errors_are_typed(polling_server, tenant_key, tmp_path) -> None:
    (tmp_path / "empty" / "label").mkdir(parents=True)
    with Client(polling_server.base_url, tenant_key) as graft:
        with pytest.raises(ValueError, match="no examples"):
            Examples.from_dir(tmp_path / "empty")
        with pytest.raises(GraftError) as unknown:
            graft.create_head(
                "x", Examples("text", [("a", "one"), ("b", "two")]), backbone="no_such"
            )
        assert (unknown.value.status, unknown.value.code) == (422, "unknown_backbone")
    with Client(polling_server.base_url, "graft_not_a_key") as stranger:
        with pytest.raises(GraftError) as refused:
            stranger.heads()
        assert refused.value.status == 401


def _exported_label(model: bytes, image: bytes) -> str:
    """The label an exported image model gives `image`, fed as its metadata says."""
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    batch = decode_image(image, exported_image_preprocessing(meta), 10**8)[None]
    probabilities = session.run(["probabilities"], {"image": batch})[0][0]
    return json.loads(meta["graft.labels"])[int(np.argmax(probabilities))]


def _graft(server, key: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "GRAFT_URL": server.base_url, "GRAFT_API_KEY": key, "COLUMNS": "160"}
    return subprocess.run(
        [GRAFT, *args], env=env, capture_output=True, text=True, timeout=300, check=False
    )


def test_command_from_tenant_to_export(polling_server, tmp_path) -> None:
    made = _graft(polling_server, polling_server.admin_key, "tenants", "create", "cli")
    assert made.returncode == 0, made.stderr
    key = made.stdout.split("api key: ")[1].split()[0]

    folders = label_folders(tmp_path / "photos", 6, seed=2)
    created = _graft(
        polling_server, key, "heads", "create", "sights", "--from", str(folders),
        "--backbone", "efficientnet_lite0", "--fine-tune", "off",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert "12 image examples, labels: flower, temple" in created.stderr
    assert "uploaded" in created.stderr and "trained" in created.stderr  # the two bars
    assert "held-out accuracy:" in created.stdout and "±" in created.stdout
    head_id = created.stdout.split("head ")[1].split()[0]

    listed = _graft(polling_server, key, "heads", "list")
    assert head_id in listed.stdout and "ready" in listed.stdout
    shown = _graft(polling_server, key, "heads", "show", head_id)
    assert "held-out confusion matrix" in shown.stdout and "precision" in shown.stdout

    image = tmp_path / "temple.jpg"
    image.write_bytes(crops("china.jpg", 1, seed=11)[0])
    predicted = _graft(polling_server, key, "predict", head_id, str(image), "--json")
    assert predicted.returncode == 0, predicted.stderr
    assert json.loads(predicted.stdout)["predictions"][0]["label"] == "temple"
    table = _graft(polling_server, key, "predict", head_id, str(image), "--top-k", "2")
    assert "temple" in table.stdout and "flower" in table.stdout

    model = tmp_path / "sights.onnx"
    exported = _graft(polling_server, key, "export", head_id, "-o", str(model))
    assert exported.returncode == 0, exported.stderr
    assert _exported_label(model.read_bytes(), image.read_bytes()) == "temple"

    deleted = _graft(polling_server, key, "heads", "delete", head_id)
    assert deleted.returncode == 0
    gone = _graft(polling_server, key, "heads", "show", head_id)
    assert gone.returncode == 1 and "head_not_found" in gone.stderr
    no_folder = _graft(polling_server, key, "heads", "create", "x", "--from", str(tmp_path / "no"))
    assert no_folder.returncode == 1 and "is not a folder" in no_folder.stderr
    nobody = _graft(
        polling_server, key, "--url", f"http://127.0.0.1:{free_port()}", "heads", "list"
    )
    assert nobody.returncode == 1 and "cannot reach the server" in nobody.stderr


CLIENT_ONLY = """
import sys
from graft import Client, GraftError
with Client(sys.argv[1], sys.argv[2]) as graft:
    backbones = [b.id for b in graft.backbones()]
    try:
        graft.head("no-such-head")
    except GraftError as exc:
        refused = exc.code
heavy = {"torch", "onnxruntime", "sklearn", "bentoml", "numpy", "service", "adapters", "models"}
print(sorted(backbones), refused, sorted(heavy & set(sys.modules)))
"""


def test_the_client_installs_and_runs_without_the_servers_dependencies(
    polling_server, tenant_key, tmp_path
) -> None:
    """`pip install .` into a new virtual environment is the client alone: none of the
    server's dependencies come with it, and it talks to a real server."""
    # What the distribution is built from, copied: a build leaves files in its source.
    source = tmp_path / "source"
    for name in ("pyproject.toml", "README.md"):
        source.mkdir(exist_ok=True)
        shutil.copy(ROOT / name, source / name)
    caches = shutil.ignore_patterns("__pycache__")
    for package in ("graft", "service", "adapters", "models"):
        shutil.copytree(ROOT / package, source / package, ignore=caches)
    venv = tmp_path / "client-only"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    installed = subprocess.run(
        [python, "-m", "pip", "install", "--quiet", str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    frozen = subprocess.run(
        [python, "-m", "pip", "freeze"], capture_output=True, text=True, check=True
    ).stdout
    packages = {line.split("==")[0].lower() for line in frozen.split()}
    assert "graft" in packages and "httpx" in packages, packages
    assert not packages & {"torch", "onnxruntime", "scikit-learn", "bentoml", "numpy"}, packages
    # Outside the checkout, so that only the installed client can be imported.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    used = subprocess.run(
        [python, "-c", CLIENT_ONLY, polling_server.base_url, tenant_key],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert used.returncode == 0, used.stderr[-3000:]
    expected = "['efficientnet_lite0', 'minilm_l6', 'resemblyzer_ge2e'] head_not_found []"
    assert used.stdout.split("\n")[0] == expected
    command = subprocess.run(
        [str(venv / "bin" / "graft"), "--help"], cwd=tmp_path, env=env, capture_output=True
    )
    assert command.returncode == 0 and b"heads" in command.stdout
