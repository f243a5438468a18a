"""Serving imports no torch: the service module, the runner, training and a prediction."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.server import ROOT

SCRIPT = """
import asyncio
import sys
from service.core import Application
from service.inputs import RawInput
from service.runner import Runner
from service.runner_client import RunnerClient
from service.settings import Settings
import service.service  # the BentoML service module, as `bentoml serve` imports it
settings = Settings()
runner = Runner(settings)
graft = Application(settings, RunnerClient(settings.runner_socket))
tenant, _ = graft.store.create_tenant(name="t")
examples = [("a", RawInput("text", "a cat")), ("b", RawInput("text", "a car"))]
head = graft.create_head(tenant, name="h", backbone_id="minilm_l6", examples=examples)
asyncio.run(graft.predict(tenant, head.id, [RawInput("text", "a kitten")], top_k=1))
graft.close()
runner.close()
print(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
"""


def test_the_predict_path_imports_no_torch(tmp_path, backbone_dir) -> None:
    env = {**os.environ, "GRAFT_DATA_DIR": str(tmp_path), "GRAFT_BACKBONE_DIR": str(backbone_dir)}
    env["GRAFT_ADMIN_KEY"] = "x" * 20
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
