"""Settings resolve their device-dependent defaults once, from the device actually used."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import onnxruntime

from service.settings import Settings


def test_cpu_defaults_one_single_threaded_pass_of_four_rows_per_core(tmp_path) -> None:
    settings = Settings(data_dir=tmp_path, device="cpu")
    cores = len(os.sched_getaffinity(0))
    assert (settings.backbone_lanes, settings.intra_op_threads) == (cores, 1)
    assert settings.backbone_batch_size == 4


def test_auto_is_the_cpu_without_a_cuda_provider(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    settings = Settings(data_dir=tmp_path, device="auto")
    assert settings.device == "cpu" and settings.backbone_batch_size == 4


def test_auto_takes_the_gpu_defaults_where_cuda_is_present(tmp_path, monkeypatch) -> None:
    # onnxruntime-gpu is not installed here: its answer is what is stood in for.
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: providers)
    settings = Settings(data_dir=tmp_path, device="auto")
    assert settings.device == "cuda"
    assert (settings.backbone_lanes, settings.backbone_batch_size) == (1, 256)
    assert settings.intra_op_threads == len(os.sched_getaffinity(0))


def test_explicit_lanes_share_the_cores_between_them(tmp_path) -> None:
    settings = Settings(data_dir=tmp_path, device="cpu", backbone_lanes=1)
    assert settings.intra_op_threads == len(os.sched_getaffinity(0))


def _admin_key_in_a_new_process(env: dict[str, str]) -> str:
    """The admin key a process starting with `env` resolves (the folder is read at import)."""
    code = "from service.settings import Settings; print(Settings().admin_key)"
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={k: v for k, v in os.environ.items() if not k.startswith("GRAFT_")} | env,
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def test_secrets_come_from_mounted_files_and_the_environment_wins(tmp_path) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "GRAFT_ADMIN_KEY").write_text("key-from-a-mounted-secret\n")  # as kubectl writes
    mounted = {"GRAFT_SECRETS_DIR": str(secrets)}
    assert _admin_key_in_a_new_process(mounted) == "key-from-a-mounted-secret"
    both = mounted | {"GRAFT_ADMIN_KEY": "key-from-the-environment"}
    assert _admin_key_in_a_new_process(both) == "key-from-the-environment"
    assert _admin_key_in_a_new_process({}) == "None"
