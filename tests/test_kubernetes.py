"""The Kubernetes manifests (`deploy/kubernetes`): rendered as kustomize renders them, valid
against Kubernetes' own schemas (offline: kubernetes-validate), and saying what the
service needs: probes, drain time, secrets from a Secret, and a GPU variant where the
runner is a Deployment of its own on GPU nodes."""

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


def _by_name(docs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in docs}


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container["env"]}


@pytest.fixture(scope="module", params=["base", "gpu"])
def variant(request) -> tuple[str, list[dict]]:
    return request.param, render(KUBERNETES / request.param)


def test_every_resource_is_valid_for_kubernetes(variant) -> None:
    name, docs = variant
    services = ["graft"] + (["graft-runner"] if name == "gpu" else [])
    kinds = ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget")
    assert set(_by_name(docs)) == {(kind, s) for kind in kinds for s in services}
    for doc in docs:
        for version in VERSIONS:
            # strict: a misspelt or misplaced field is an error, not ignored.
            kubernetes_validate.validate(doc, version, strict=True)


def test_the_manifests_say_what_graft_needs(variant) -> None:
    name, docs = variant
    resources = _by_name(docs)
    for service in ["graft"] + (["graft-runner"] if name == "gpu" else []):
        deployment = resources["Deployment", service]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        for selector in (
            deployment["spec"]["selector"]["matchLabels"],
            resources["Service", service]["spec"]["selector"],
            resources["PodDisruptionBudget", service]["spec"]["selector"]["matchLabels"],
        ):
            assert selector.items() <= labels.items()
        assert (
            resources["HorizontalPodAutoscaler", service]["spec"]["scaleTargetRef"]["name"]
            == service
        )
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
        # Secrets come from a Secret mounted as files, never as values in the manifests.
        env = _env(container)
        assert env["GRAFT_SECRETS_DIR"]["value"] == "/var/run/secrets/graft"
        assert not {"GRAFT_ADMIN_KEY", "GRAFT_DATABASE_URL", "GRAFT_RUNNER_KEY"} & set(env)

    pod = resources["Deployment", "graft"]["spec"]["template"]
    api = pod["spec"]["containers"][0]
    env = _env(api)
    # The drain outlasts a synchronous training answer and the endpoints' update.
    drain = pod["spec"]["terminationGracePeriodSeconds"]
    endpoints_update = api["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert drain > Settings().sync_training_timeout_s + endpoints_update
    assert env["GRAFT_REPLICA_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert pod["spec"]["initContainers"][0]["command"][-2:] == ["-m", "service.migrate"]
    secret = next(v for v in pod["spec"]["volumes"] if "secret" in v)["secret"]
    mounted = {item["path"] for item in secret["items"]}
    # The API pods never hold a GPU; in the GPU variant the runner pods do.
    assert "nvidia.com/gpu" not in api["resources"].get("limits", {})
    if name == "base":
        assert mounted == {"GRAFT_ADMIN_KEY", "GRAFT_DATABASE_URL"}
        assert "GRAFT_RUNNER_LINK" not in env and "GRAFT_DEVICE" not in env
        return
    assert mounted == {"GRAFT_ADMIN_KEY", "GRAFT_DATABASE_URL", "GRAFT_RUNNER_KEY"}
    runner_pod = resources["Deployment", "graft-runner"]["spec"]["template"]["spec"]
    runner = runner_pod["containers"][0]
    runner_env = _env(runner)
    assert runner["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert runner_env["GRAFT_DEVICE"]["value"] == "cuda" and runner["image"] == "graft:gpu"
    assert "service.service:BackboneRunner" in runner["command"]
    # The API pods reach the runners' Service on the port their link listens on.
    ports = {p["name"]: p["port"] for p in resources["Service", "graft-runner"]["spec"]["ports"]}
    assert env["GRAFT_RUNNER_LINK"]["value"] == f"tcp://graft-runner:{ports['link']}"
    assert runner_env["GRAFT_RUNNER_LINK"]["value"] == f"tcp://0.0.0.0:{ports['link']}"
    assert env["GRAFT_RUNNER_URL"]["value"] == f"http://graft-runner:{ports['http']}"
    runner_secret = next(v for v in runner_pod["volumes"] if "secret" in v)["secret"]
    assert "GRAFT_RUNNER_KEY" in {item["path"] for item in runner_secret["items"]}


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
