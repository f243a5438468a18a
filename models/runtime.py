"""One shared ONNX Runtime session per backbone: inputs in, embeddings out."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

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


def available_providers(device: str) -> list:
    """ONNX Runtime providers for the `device` setting: cuda when asked and present."""
    if device in ("cuda", "auto") and "CUDAExecutionProvider" in ort.get_available_providers():
        # onnxruntime-gpu finds the CUDA and cuDNN libraries that pip installed (e.g. with
        # torch) only once they are preloaded; a no-op where they are on the loader's path.
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()
        return [("CUDAExecutionProvider", CUDA_OPTIONS), "CPUExecutionProvider"]
    if device == "cuda":
        raise RuntimeError(
            "GRAFT_DEVICE=cuda but this onnxruntime has no CUDAExecutionProvider: "
            "install onnxruntime-gpu in place of onnxruntime (see README, GPU)"
        )
    return ["CPUExecutionProvider"]


class Backbone:
    def __init__(
        self,
        spec: BackboneSpec,
        onnx_path: Path,
        *,
        device: str = "cpu",
        intra_op_threads: int = 0,
        max_batch_size: int = 32,
        allow_spinning: bool = False,
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
        self.session = ort.InferenceSession(
            str(onnx_path), options, providers=available_providers(device)
        )
        # On a GPU, every new batch size costs a cuDNN search: a few sizes serve them all.
        self.on_gpu = "CUDAExecutionProvider" in self.session.get_providers()
        self.tokenizer = None
        if isinstance(spec.preprocessing, TextPreprocessing):
            pre = spec.preprocessing
            self.tokenizer = load_tokenizer(pre.tokenizer_file(), pre.max_tokens)
            self.pad_id = pre.pad_id()

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        """uint8 NHWC batch (already resized and cropped) to L2-normalised embeddings."""

        def feeds(s: slice) -> dict[str, np.ndarray]:
            chunk = images[s]
            if self.on_gpu:
                chunk = pad_to_power_of_two(chunk)
            return {"image": chunk}

        return self._run_in_chunks(len(images), feeds)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        return self.embed_tokens(token_ids(texts, self.tokenizer))

    def embed_tokens(self, ids: list[np.ndarray]) -> np.ndarray:
        """Token-id rows (`models.preprocess.token_ids`) to L2-normalised embeddings."""
        return self._run_in_chunks(len(ids), lambda s: pad_tokens(ids[s], self.pad_id))

    def embed_rows(self, rows: np.ndarray | list[np.ndarray]) -> np.ndarray:
        """What the runner calls: decoded images, or token-id rows for a text backbone."""
        if self.spec.modality == "image":
            return self.embed_images(rows)
        return self.embed_tokens(rows)

    def ms_per_row(self, rows: int = 4, repeats: int = 3) -> float:
        """The fastest of a few passes over a typical batch, per row: a 224-ish image, or
        a sentence of about 30 tokens."""
        if self.spec.modality == "image":
            side = self.spec.preprocessing.image_size
            batch: np.ndarray | list[np.ndarray] = np.zeros((rows, side, side, 3), np.uint8)
        else:
            sentence = "a typical request: a sentence or two of plain English " * 3
            batch = token_ids([sentence] * rows, self.tokenizer)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            self.embed_rows(batch)
            best = min(best, time.perf_counter() - start)
        return 1000 * best / rows

    def _run_in_chunks(self, n: int, feeds) -> np.ndarray:
        out = np.empty((n, self.spec.embedding_dim), dtype=np.float32)
        for start in range(0, n, self.max_batch_size):
            chunk = slice(start, min(n, start + self.max_batch_size))
            out[chunk] = self.session.run(["embedding"], feeds(chunk))[0][
                : chunk.stop - chunk.start
            ]
        return out


def pad_to_power_of_two(rows: np.ndarray) -> np.ndarray:
    """The rows, followed by zero rows up to the next power of two (the extra embeddings
    are dropped by the caller)."""
    size = 1 << max(0, len(rows) - 1).bit_length()
    if size == len(rows):
        return rows
    padded = np.zeros((size, *rows.shape[1:]), dtype=rows.dtype)
    padded[: len(rows)] = rows
    return padded
