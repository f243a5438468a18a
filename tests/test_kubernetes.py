"""The Kubernetes manifests (`deploy/kubernetes`): rendered as kustomize renders them, valid
against Kubernetes' own schemas (offline: kubernetes-validate), and saying what the
service needs: probes, drain time, secrets from a Secret, a GPU variant."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import jsonpatch
import kubernetes_validate
import pytest
import yaml

from service.settings import Settings
from tests.server import ROOT

KUBERNETES = ROOT / "deploy" / "kubernetes"
# The newest schemas kubernetes-validate bundles, and the oldest release with the
# preStop sleep action these manifests use (1.30, on by default).
VERSIONS = (kubernetes_validate.latest_version(), "1.30.0")


def render(folder: Path) -> list[dict]:
    """What `kubectl kustomize folder` gives for the features these manifests use:
    resources, JSON patches by kind and name, and labels added to each resource."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    docs: list[dict] = []
    for resource in kustomization.get("resources", []):
        path = folder / resource
        if path.is_dir():
            docs += render(path)
        else:
            docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for patch in kustomization.get("patches", []):
        operations = yaml.safe_load((folder / patch["path"]).read_text())
        target = patch["target"]
        docs = [
            jsonpatch.apply_patch(doc, operations)
            if (doc["kind"], doc["metadata"]["name"]) == (target["kind"], target["name"])
            else doc
            for doc in docs
        ]
    for labels in kustomization.get("labels", []):
        for doc in docs:
            doc["metadata"].setdefault("labels", {}).update(labels["pairs"])
    return docs


def _by_kind(docs: list[dict]) -> dict[str, dict]:
    return {doc["kind"]: doc for doc in docs}


@pytest.fixture(scope="module", params=["base", "gpu"])
def variant(request) -> tuple[str, list[dict]]:
    return request.param, render(KUBERNETES / request.param)


def test_every_resource_is_valid_for_kubernetes(variant) -> None:
    _, docs = variant
    assert {doc["kind"] for doc in docs} == {
        "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"
    }  # fmt: skip
    for doc in docs:
        for version in VERSIONS:
            # strict: a misspelt or misplaced field is an error, not ignored.
            kubernetes_validate.validate(doc, version, strict=True)


def test_the_manifests_say_what_graft_needs(variant) -> None:
    name, docs = variant
    kinds = _by_kind(docs)
    deployment = kinds["Deployment"]
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    container = pod["spec"]["containers"][0]
    for selector in (
        deployment["spec"]["selector"]["matchLabels"],
        kinds["Service"]["spec"]["selector"],
        kinds["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= labels.items()
    assert kinds["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == "graft"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    # The drain outlasts a synchronous training answer and the endpoints' update.
    drain = pod["spec"]["terminationGracePeriodSeconds"]
    assert (
        drain
        > Settings().sync_training_timeout_s + container["lifecycle"]["preStop"]["sleep"]["seconds"]
    )
    # Secrets come from a Secret mounted as files, never as values in the manifests.
    env = {e["name"]: e for e in container["env"]}
    assert env["GRAFT_SECRETS_DIR"]["value"] == "/var/run/secrets/graft"
    assert "GRAFT_ADMIN_KEY" not in env and "GRAFT_DATABASE_URL" not in env
    secret = next(v for v in pod["spec"]["volumes"] if "secret" in v)["secret"]
    assert {item["path"] for item in secret["items"]} == {"GRAFT_ADMIN_KEY", "GRAFT_DATABASE_URL"}
    assert env["GRAFT_REPLICA_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    migrate = pod["spec"]["initContainers"][0]
    assert migrate["command"][-2:] == ["-m", "adapters.migrations"]
    gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu")
    if name == "gpu":
        assert gpus == 1 and env["GRAFT_DEVICE"]["value"] == "cuda"
        assert container["image"] == migrate["image"] == "graft:gpu"
    else:
        assert gpus is None and "GRAFT_DEVICE" not in env


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_the_render_is_what_kustomize_makes(variant) -> None:
    name, docs = variant
    made = subprocess.run(
        ["kubectl", "kustomize", str(KUBERNETES / name)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    key = lambda doc: (doc["kind"], doc["metadata"]["name"])  # noqa: E731
    assert sorted(yaml.safe_load_all(made.stdout), key=key) == sorted(docs, key=key)
