from __future__ import annotations

import onnxruntime as ort
import pytest

from models.runtime import available_providers

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def test_cpu_is_the_default_provider() -> None:
    assert available_providers("cpu") == ["CPUExecutionProvider"]


def test_auto_takes_cuda_only_when_present() -> None:
    expected = (
        ["CUDAExecutionProvider", "CPUExecutionProvider"] if HAS_CUDA else ["CPUExecutionProvider"]
    )
    assert available_providers("auto") == expected


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime has the CUDA provider")
def test_asking_for_cuda_without_it_fails_clearly() -> None:
    with pytest.raises(RuntimeError, match="onnxruntime-gpu|CUDAExecutionProvider"):
        available_providers("cuda")
