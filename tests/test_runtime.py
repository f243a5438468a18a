from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from models.runtime import (
    CUDA_OPTIONS,
    available_providers,
    pad_to_power_of_two,
    padded_batch_sizes,
)

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def test_cpu_is_the_default_provider() -> None:
    assert available_providers("cpu") == ["CPUExecutionProvider"]


def test_auto_takes_cuda_only_when_present() -> None:
    cuda = [("CUDAExecutionProvider", CUDA_OPTIONS), "CPUExecutionProvider"]
    assert available_providers("auto") == (cuda if HAS_CUDA else ["CPUExecutionProvider"])


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime has the CUDA provider")
def test_asking_for_cuda_without_it_fails_clearly() -> None:
    with pytest.raises(RuntimeError, match="onnxruntime-gpu|CUDAExecutionProvider"):
        available_providers("cuda")


def test_gpu_batches_are_padded_to_a_power_of_two() -> None:
    rows = np.arange(5 * 2, dtype=np.uint8).reshape(5, 2)
    padded = pad_to_power_of_two(rows)
    assert padded.shape == (8, 2) and (padded[:5] == rows).all() and not padded[5:].any()
    assert pad_to_power_of_two(rows[:4]).shape == (4, 2)
    assert pad_to_power_of_two(rows[:1]).shape == (1, 2)


def test_a_gpu_runner_warms_every_padded_batch_size_up() -> None:
    # Backbone.warm_up runs one pass at each: a size never warmed would meet cuDNN's
    # search under load.
    assert padded_batch_sizes(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert padded_batch_sizes(100) == [1, 2, 4, 8, 16, 32, 64, 128]
    assert padded_batch_sizes(1) == [1]
    for max_batch_size in (1, 3, 100, 256):
        rows = np.zeros((max_batch_size, 1))
        made = {len(pad_to_power_of_two(rows[:n])) for n in range(1, max_batch_size + 1)}
        assert made == set(padded_batch_sizes(max_batch_size))
