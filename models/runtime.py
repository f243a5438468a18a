"""One shared ONNX Runtime session per backbone: inputs in, embeddings out."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnxruntime as ort

from models.audio import pad_waveforms
from models.export import depth_widths
from models.preprocess import load_tokenizer, pad_tokens, token_ids
from models.registry import BackboneSpec, TextPreprocessing

# The CUDA provider tuned for serving: the image graphs have fixed shapes per batch size
# (and batches are padded to a power of two there), so cuDNN's exhaustive search for the
# fastest convolution runs once per shape; memory grows by powers of two and is kept.
CUDA_OPTIONS = {
    "cudnn_conv_algo_search": "EXHAUSTIVE",
    "cudnn_conv_use_max_workspace": "1",
    "arena_extend_strategy": "kNextPowerOfTwo",
    "do_copy_in_default_stream": "1",
}


def available_providers(device: str, **cuda_options: str) -> list:
    """ONNX Runtime providers for the `device` setting: cuda when asked and present, with
    `CUDA_OPTIONS` (those given in place of theirs)."""
    if device in ("cuda", "auto") and "CUDAExecutionProvider" in ort.get_available_providers():
        # onnxruntime-gpu finds the CUDA and cuDNN libraries that pip installed (e.g. with
        # torch) only once they are preloaded; a no-op where they are on the loader's path.
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()
        options = {**CUDA_OPTIONS, **cuda_options}
        return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]
    if device == "cuda":
        raise RuntimeError(
            "GRAFT_DEVICE=cuda but this onnxruntime has no CUDAExecutionProvider: "
            "install onnxruntime-gpu in place of onnxruntime (see README, GPU)"
        )
    return ["CPUExecutionProvider"]


# A fine-tuned head's top, which its rows go through: a key naming the head's version
# (rows of one key in a batch share one pass) and its LoRA factors (models/split.py).
Top = tuple[str, list[np.ndarray]]
# Rows of a batch that go through one fine-tuned head's top: their positions in the
# batch, and the head's LoRA factors (models/split.py), as stored (fp16).
TopGroup = tuple[np.ndarray, list[np.ndarray]]
# A batch's inputs for the rows of a slice of it.
Feeds = Callable[[slice], dict[str, np.ndarray]]


class Backbone:
    """A backbone's session, or with `split` (the backbone's trunk and top files,
    `models.export.ensure_split`) two: the trunk, run once for every row of a batch, and
    the top, run per group of rows, with no factors (frozen heads) or a fine-tuned head's.
    Both ways give the same embeddings for frozen heads (tests/test_split.py)."""

    def __init__(
        self,
        spec: BackboneSpec,
        onnx_path: Path,
        *,
        device: str = "cpu",
        intra_op_threads: int = 0,
        max_batch_size: int = 32,
        allow_spinning: bool = False,
        split: tuple[Path, Path] | None = None,
    ) -> None:
        self.spec = spec
        self.onnx_path = onnx_path
        self.max_batch_size = max_batch_size
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        if not allow_spinning:
            # ONNX Runtime's idle threads spin by default; in the service they would burn
            # the cores that decode and HTTP need: +23% predict throughput on 2 cores.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = available_providers(device)
        # ONNX Runtime's sessions (untyped): the whole graph, or the trunk and the top.
        self.session: Any = None
        self.trunk: Any = None
        self.top: Any = None
        if split is None:
            self.session = ort.InferenceSession(str(onnx_path), options, providers=providers)
        else:
            self.trunk = ort.InferenceSession(str(split[0]), options, providers=providers)
            self.top = ort.InferenceSession(str(split[1]), options, providers=providers)
            self._factor_inputs = [i for i in self.top.get_inputs() if i.name.startswith("lora_")]
            self._no_factors = {i.name: np.zeros(i.shape, np.float32) for i in self._factor_inputs}
        # On a GPU, every new batch size costs a cuDNN search: a few sizes serve them all.
        self.on_gpu = "CUDAExecutionProvider" in (self.session or self.trunk).get_providers()
        # The widths of the depths (models/depths.py) each row may carry after its
        # embedding: the whole graph's, or the trunk's followed by the top's.
        if self.session is not None:
            self.depth_widths = depth_widths(self.session)
        else:
            self._trunk_widths = depth_widths(self.trunk)
            self.depth_widths = self._trunk_widths + depth_widths(self.top)
        self.tokenizer = None
        if isinstance(spec.preprocessing, TextPreprocessing):
            pre = spec.preprocessing
            self.tokenizer = load_tokenizer(pre.tokenizer_file(), pre.max_tokens)
            self.pad_id = pre.pad_id()

    def embed_images(
        self, images: np.ndarray, tops: list[TopGroup] | None = None, depths: bool = False
    ) -> np.ndarray:
        """uint8 NHWC batch (already resized and cropped) to L2-normalised embeddings; the
        rows of `tops` through their fine-tuned heads' tops; with `depths`, each row
        followed by its depths (`feature_dim` columns in all)."""

        def feeds(s: slice) -> dict[str, np.ndarray]:
            chunk = images[s]
            if self.on_gpu:
                chunk = pad_to_power_of_two(chunk)
            return {"image": chunk}

        if self.top is None:
            self._refuse_tops(tops)
            return self._run_in_chunks(len(images), feeds, depths)

        def top_feeds(feeds: dict, hidden: np.ndarray, rows: np.ndarray) -> dict:
            return {"hidden": pad_to_power_of_two(hidden) if self.on_gpu else hidden}

        return self._run_split(len(images), feeds, top_feeds, tops, depths)

    def embed_waveforms(
        self, rows: list[np.ndarray], tops: list[TopGroup] | None = None, depths: bool = False
    ) -> np.ndarray:
        """Mono float32 clips at the backbone's rate (`models.audio.decode_audio`) to
        L2-normalised embeddings; with `depths`, each row followed by its depths."""
        self._refuse_tops(tops)  # an audio backbone is served whole
        return self._run_in_chunks(len(rows), lambda s: pad_waveforms(rows[s]), depths)

    def embed_texts(self, texts: list[str], depths: bool = False) -> np.ndarray:
        return self.embed_tokens(token_ids(texts, self.tokenizer), depths=depths)

    @property
    def feature_dim(self) -> int:
        """Columns of a row with its depths: the embedding's, then each depth's."""
        return self.spec.embedding_dim + sum(self.depth_widths)

    @property
    def fine_tunable(self) -> bool:
        return self.top is not None

    def check_factors(self, top: Top) -> None:
        """Refuses factors this top cannot take (before they join a batch, where they would
        fail every request of it)."""
        expected = [tuple(i.shape) for i in self._factor_inputs] if self.top else []
        if [tuple(f.shape) for f in top[1]] != expected:
            raise ValueError(f"head {top[0]}: its factors do not fit backbone {self.spec.id}'s top")

    def embed_tokens(
        self, ids: list[np.ndarray], tops: list[TopGroup] | None = None, depths: bool = False
    ) -> np.ndarray:
        """Token-id rows (`models.preprocess.token_ids`) to L2-normalised embeddings; the
        rows of `tops` through their fine-tuned heads' tops; with `depths`, each row
        followed by its depths."""

        def feeds(rows: slice) -> dict[str, np.ndarray]:
            return pad_tokens(ids[rows], self.pad_id)

        if self.top is None:
            self._refuse_tops(tops)
            return self._run_in_chunks(len(ids), feeds, depths)

        def top_feeds(feeds: dict, hidden: np.ndarray, rows: np.ndarray) -> dict:
            mask = feeds["attention_mask"][rows]
            tokens = int(mask.sum(axis=1).max())  # no padding beyond the group's longest
            return {"hidden": hidden[:, :tokens], "attention_mask": mask[:, :tokens]}

        return self._run_split(len(ids), feeds, top_feeds, tops, depths)

    def _run_split(
        self,
        n: int,
        feeds: Feeds,
        top_feeds: Callable,
        tops: list[TopGroup] | None = None,
        depths: bool = False,
    ) -> np.ndarray:
        """The trunk once per chunk of rows, then the top once per group of them: the rows
        of no fine-tuned head with no factors, each head's rows with its factors. A row
        with its depths is the top's embedding, the trunk's depths, the top's."""
        # Each row's group: -1 for the pretrained top, else its index in `tops`.
        group = np.full(n, -1)
        for g, (rows, _) in enumerate(tops or []):
            group[rows] = g
        dim = self.spec.embedding_dim
        trunk_outputs = ["hidden", *self._depths_output(self.trunk, depths)]
        top_outputs = ["embedding", *self._depths_output(self.top, depths)]
        trunk_depths = slice(dim, dim + sum(self._trunk_widths))
        out = np.empty((n, self.feature_dim if depths else dim), dtype=np.float32)
        for start in range(0, n, self.max_batch_size):
            chunk = slice(start, min(n, start + self.max_batch_size))
            chunk_feeds = feeds(chunk)
            hidden, *pooled = self.trunk.run(trunk_outputs, chunk_feeds)
            if pooled:
                out[chunk, trunk_depths] = pooled[0][: chunk.stop - chunk.start]
            for g in np.unique(group[chunk]):
                rows = np.flatnonzero(group[chunk] == g)
                factors = self._no_factors
                if g >= 0:
                    assert tops is not None
                    factors = {
                        i.name: np.asarray(f, np.float32)
                        for i, f in zip(self._factor_inputs, tops[g][1], strict=True)
                    }
                feeds_top = {**top_feeds(chunk_feeds, hidden[rows], rows), **factors}
                embedding, *pooled = self.top.run(top_outputs, feeds_top)
                out[start + rows, :dim] = embedding[: len(rows)]
                if pooled:
                    out[start + rows, trunk_depths.stop :] = pooled[0][: len(rows)]
        return out

    @staticmethod
    def _depths_output(session: Any, depths: bool) -> list[str]:
        """["depths"] where they are asked for and this graph gives any."""
        gives = depths and any(o.name == "depths" for o in session.get_outputs())
        return ["depths"] if gives else []

    def _refuse_tops(self, tops: list[TopGroup] | None) -> None:
        if tops:
            raise ValueError(f"backbone {self.spec.id} is not served split: no fine-tuning")

    def embed_rows(
        self,
        rows: np.ndarray | list[np.ndarray],
        tops: list[TopGroup] | None = None,
        depths: bool = False,
    ) -> np.ndarray:
        """What the runner calls: decoded images, token-id rows or waveforms (with the
        groups of rows that go through fine-tuned heads' tops)."""
        if self.spec.modality == "image":
            return self.embed_images(cast(np.ndarray, rows), tops, depths)
        if self.spec.modality == "audio":
            return self.embed_waveforms(cast(list[np.ndarray], rows), tops, depths)
        return self.embed_tokens(cast(list[np.ndarray], rows), tops, depths)

    def warm_up(self) -> list[int]:
        """On a GPU, one pass of an image backbone at each batch size that its batches are
        padded to (`pad_to_power_of_two`, up to `max_batch_size`'s): cuDNN's exhaustive
        search for each shape's fastest convolutions runs now, at start, not under the
        first requests that bring a new size. The sizes warmed: none on the CPU, nor for
        text and audio, whose shapes vary with their lengths anyway."""
        if not self.on_gpu or self.spec.modality != "image":
            return []
        side = self.spec.image_preprocessing.image_size
        sizes = padded_batch_sizes(self.max_batch_size)
        for size in sizes:
            self.embed_images(np.zeros((size, side, side, 3), np.uint8))
        return sizes

    def ms_per_row(self, rows: int = 4, repeats: int = 3) -> float:
        """The fastest of a few passes over a typical batch, per row: a 224-ish image, a
        sentence of about 30 tokens, or a 1 s clip."""
        if self.spec.modality == "image":
            side = self.spec.image_preprocessing.image_size
            batch: np.ndarray | list[np.ndarray] = np.zeros((rows, side, side, 3), np.uint8)
        elif self.spec.modality == "audio":
            rate = self.spec.audio_preprocessing.sample_rate
            noise = np.random.default_rng(0).normal(0, 0.1, rate).astype(np.float32)
            batch = [noise] * rows
        else:
            sentence = "a typical request: a sentence or two of plain English " * 3
            batch = token_ids([sentence] * rows, self.tokenizer)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            self.embed_rows(batch)
            best = min(best, time.perf_counter() - start)
        return 1000 * best / rows

    def _run_in_chunks(self, n: int, feeds: Feeds, depths: bool = False) -> np.ndarray:
        outputs = ["embedding", *self._depths_output(self.session, depths)]
        out = np.empty((n, self.feature_dim if depths else self.spec.embedding_dim), np.float32)
        for start in range(0, n, self.max_batch_size):
            chunk = slice(start, min(n, start + self.max_batch_size))
            rows = chunk.stop - chunk.start
            embedding, *pooled = self.session.run(outputs, feeds(chunk))
            out[chunk, : self.spec.embedding_dim] = embedding[:rows]
            if pooled:
                out[chunk, self.spec.embedding_dim :] = pooled[0][:rows]
        return out


def padded_batch_sizes(max_batch_size: int) -> list[int]:
    """Every size `pad_to_power_of_two` makes of batches of up to `max_batch_size` rows."""
    largest = len(pad_to_power_of_two(np.empty((max_batch_size, 0))))
    return [1 << i for i in range(largest.bit_length())]


def pad_to_power_of_two(rows: np.ndarray) -> np.ndarray:
    """The rows, followed by zero rows up to the next power of two (the extra embeddings
    are dropped by the caller)."""
    size = 1 << max(0, len(rows) - 1).bit_length()
    if size == len(rows):
        return rows
    padded = np.zeros((size, *rows.shape[1:]), dtype=rows.dtype)
    padded[: len(rows)] = rows
    return padded
