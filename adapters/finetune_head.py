"""A head's whole fine-tuning, from its examples as sent to the head on its tuned top: what
the fine-tuning process runs (service/fine_tuning.py), on what the training job gathered.

The backbone's PyTorch copy is built here and dropped with the process (MPNet: 420 MB).
Image trunks run as served, through ONNX Runtime (adapters/finetune.py says why).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adapters import finetune, finetune_compare
from adapters.heads import TrainedHead
from models.preprocess import text_rows
from models.registry import BackboneSpec


@dataclass(frozen=True)
class TuningRequest:
    labelled: list[bytes]  # the labelled examples as sent (UTF-8 texts, or image files)
    unlabelled: list[bytes]  # the target domain's unlabelled examples, as sent
    labels: list[str]  # of the labelled examples, in their order
    frozen: np.ndarray  # the labelled examples' frozen embeddings: the other candidate
    descriptions: dict[str, str]  # text heads: each label's description (default: itself)
    always: bool  # fine_tune "on": keep the tuned head whatever the folds say
    unknown_keep: float  # the share of its rows the head's unknown threshold keeps
    trunk_onnx: Path | None  # image backbones: the trunk as served
    max_image_pixels: int
    device: str  # the server's: on "cuda", tuning runs on the GPU (finetune.torch_device)


@dataclass(frozen=True)
class FineTuning:
    """What fine-tuning gave a head: with `head` None, the frozen head stays (the report
    says why); else the head on its tuned top, the top's factors (fp16), and the
    labelled, unlabelled and label-description embeddings through that top."""

    head: TrainedHead | None
    factors: list[np.ndarray] | None
    x: np.ndarray | None
    target: np.ndarray | None
    names: dict[str, np.ndarray] | None
    report: dict


def fine_tune_head(
    spec: BackboneSpec, request: TuningRequest, progress: Callable[[int, int], None]
) -> FineTuning:
    """The head fine-tuned on its own top when the held-out folds of `finetune_compare.compare`
    keep it (or `always`); `progress(done, total)` after each tuning."""
    assert spec.build_split is not None, "the worker asks only for backbones that split"
    trunk, top = spec.build_split()
    device = finetune.torch_device(request.device)
    top = top.to(device)
    names = sorted(set(request.labels))
    label_hidden = None
    examples: finetune.ImageExamples | finetune.TextExamples
    unlabelled: finetune.ImageExamples | finetune.TextExamples
    if spec.modality == "image":
        pre, pixels = spec.image_preprocessing, request.max_image_pixels
        assert request.trunk_onnx is not None, "an image head's request names its trunk"
        trunk = finetune.onnx_trunk(request.trunk_onnx, request.device)
        examples = finetune.ImageExamples.of(trunk, top, request.labelled, pre, pixels)
        unlabelled = finetune.ImageExamples(
            top,
            finetune.centre_activations(trunk, request.unlabelled, pre, pixels)
            if request.unlabelled
            else np.empty((0,)),
        )
    else:
        n, m = len(request.labelled), len(request.unlabelled)
        texts = [data.decode("utf-8") for data in request.labelled + request.unlabelled]
        texts += [request.descriptions.get(label, label) for label in names]
        pad_id = spec.text_preprocessing.pad_id()
        hidden = finetune.hidden_states(trunk.to(device), text_rows(spec, texts), pad_id)
        examples = finetune.TextExamples(top, hidden[:n])
        unlabelled = finetune.TextExamples(top, hidden[n : n + m])
        label_hidden = hidden[n + m :]
    comparison = finetune_compare.compare(
        examples, request.labels, request.frozen, always=request.always, progress=progress
    )
    report = {**comparison.report, "device": device}
    if comparison.factors is None:  # the frozen head won
        return FineTuning(None, None, None, None, None, report)
    # Stored and served in fp16: the head is fitted on what the served top gives.
    factors = [f.astype(np.float16) for f in comparison.factors]
    served = [f.astype(np.float32) for f in factors]
    tuned = examples.embed(served)
    label_embeddings = None
    if label_hidden is not None:
        label_vectors = finetune.embed(top, label_hidden, served)
        label_embeddings = dict(zip(names, label_vectors, strict=True))
    trained = finetune_compare.fine_tuned_head(
        tuned, request.labels, comparison, label_embeddings, request.unknown_keep
    )
    report["top_bytes"] = sum(f.nbytes for f in factors)
    target = unlabelled.embed(served) if unlabelled.size else tuned[:0]
    return FineTuning(trained, factors, tuned, target, label_embeddings, report)
