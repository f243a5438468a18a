"""The application object without HTTP: the embedding cache and training on the whole set."""

from __future__ import annotations

import functools

import pytest

from service.core import Application
from service.inputs import RawInput
from service.runner import Runner
from service.runner_client import RunnerClient
from service.settings import Settings
from tests.inputs import COOKING, SPORTS


@pytest.fixture
def runner_and_graft(tmp_path, backbone_dir):
    """A runner and an API worker's application in this process, over the real socket."""
    # A head's request waits for its training however long a busy machine takes (as on
    # the test servers: tests/server.py).
    settings = Settings(data_dir=tmp_path, backbone_dir=backbone_dir, sync_training_timeout_s=600)
    runner = Runner(settings)
    app = Application(settings, RunnerClient(settings.runner_socket))
    yield runner, app
    app.close()
    runner.close()


def _examples(label: str, texts: list[str]) -> list[tuple[str, RawInput]]:
    return [(label, RawInput("text", t)) for t in texts]


def test_retraining_embeds_only_inputs_it_has_not_seen(runner_and_graft) -> None:
    runner, graft = runner_and_graft

    def embedded_by(action, *args, **kwargs):
        """What `action` returns, and the rows the runner embedded for it at training
        priority, less the two label names each training embeds as prior knowledge."""
        before = runner.stats()["minilm_l6"]["training_rows"]
        result = action(*args, **kwargs)
        return runner.stats()["minilm_l6"]["training_rows"] - before - 2, result

    tenant, _ = graft.store.create_tenant(name="t")
    first = _examples("sports", SPORTS[:3]) + _examples("cooking", COOKING[:3])
    create = functools.partial(
        graft.create_head, backbone_id="minilm_l6", examples=first, fine_tune="off"
    )
    embedded, head = embedded_by(create, tenant, name="h")
    assert embedded == 6 and head.status == "ready"

    again = _examples("sports", SPORTS[:4]) + _examples("cooking", COOKING[:1])
    embedded, head = embedded_by(graft.add_examples, tenant, head.id, again)
    assert embedded == 1  # only the new text went through the backbone
    assert head.version == 2 and head.metrics["n_examples"] == 7

    # Another head of the same tenant reuses the cache too; another tenant does not.
    assert embedded_by(create, tenant, name="h2")[0] == 0
    other, _ = graft.store.create_tenant(name="other")
    assert embedded_by(create, other, name="h")[0] == 6
