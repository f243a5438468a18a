"""A training set's images, decoded in a process of its own (`service/decoder.py`)."""

from __future__ import annotations

import mmap
import os

import numpy as np
import pytest

from models.preprocess import InvalidInput, decode_images
from service.decoder import TrainingDecoder
from service.settings import get_backbone
from tests.inputs import crops

PRE = get_backbone("efficientnet_lite0").preprocessing
MAX_PIXELS = 40_000_000


def test_the_process_decodes_exactly_what_the_worker_would() -> None:
    images = crops("china.jpg", 37, seed=8)
    items = list(enumerate(images))
    decoder = TrainingDecoder()
    try:
        rows = decoder.decode(items, PRE, MAX_PIXELS)
        # Written by the process into memory the worker maps, not sent back as messages.
        assert isinstance(rows.base.base.obj, mmap.mmap)
        process = decoder._process
        assert process is not None and process.pid != os.getpid()
        assert os.sched_getscheduler(process.pid) == os.SCHED_IDLE
    finally:
        decoder.close()
    np.testing.assert_array_equal(rows, decode_images(items, PRE, MAX_PIXELS))
    assert process.returncode == 0  # it ended with its link


def test_a_bad_image_is_named_by_its_position_and_the_process_goes_on() -> None:
    images = crops("flower.jpg", 3, seed=9)
    decoder = TrainingDecoder()
    try:
        with pytest.raises(InvalidInput, match="input 41: ") as refused:
            decoder.decode([(40, images[0]), (41, b"not an image"), (42, images[1])], PRE, 10**8)
        assert refused.value.code == "invalid_image"
        assert decoder.decode([(0, images[2])], PRE, MAX_PIXELS).shape == (1, 224, 224, 3)
    finally:
        decoder.close()


def test_a_process_that_died_is_started_again() -> None:
    image = crops("flower.jpg", 1, seed=10)[0]
    decoder = TrainingDecoder()
    try:
        decoder.decode([(0, image)], PRE, MAX_PIXELS)
        first = decoder._process
        first.kill()
        first.wait()
        assert decoder.decode([(0, image)], PRE, MAX_PIXELS).shape == (1, 224, 224, 3)
        assert decoder._process.pid != first.pid
    finally:
        decoder.close()
