"""Fine-tuning a head's own top on the shared trunk (issue 13); the held-out comparison
that decides whether it beats the frozen head is `adapters/finetune_compare.py`.

The top (models/split.py) keeps the pretrained weights; a head trains only its LoRA
factors. Text heads use SetFit's objective (Tunstall et al. 2022): pairs of its
examples, the cosine similarity of their embeddings regressed onto 1 for the same label
and 0 for different ones. Image heads train on augmented views of their images (random
resized crops and flips) with cross-entropy through a cosine classifier started at the
class means. Either way the head is then fitted on the tuned embeddings as on frozen ones
(adapters.heads.train_head). Training starts from the trunk's cached activations: the
trunk runs once per example (per view of an image), whatever the number of epochs and folds.

PyTorch is imported here, on training's path only (serving imports no torch).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

PAIRS_PER_EXAMPLE = 20
# At most this many pairs per tuning, fewer per example on larger sets: tuning's time is
# bounded (MiniLM about 11 ms a pair on 2 cores, MPNet about four times that), and few-shot
# sets (up to 32 examples, where fine-tuning helps most) keep their 20 per example.
MAX_PAIRS = 640
PAIR_BATCH = 16
LEARNING_RATE = 1e-3
# LoRA's alpha / rank, folded into B when training ends (Hu et al. 2021: alpha = 2 rank).
LORA_SCALE = 2.0
# Image tops: augmented views per image (each through the trunk once), epochs over them.
# bench/finetune_image.py measured these on flowers and the X-rays (BENCHMARKS.md; the
# script was removed after 03efd04).
VIEWS_PER_IMAGE = 4
IMAGE_EPOCHS = 6
IMAGE_BATCH = 32
# The cosine classifier's scale (logits = scale x cosine) and its learning rate.
COSINE_SCALE = 16.0
CLASSIFIER_LEARNING_RATE = 1e-2


def tune(
    top,
    hidden: list,
    labels: list[str],
    *,
    seed: int = 0,
    rank: int | None = None,
    pairs_per_example: int = PAIRS_PER_EXAMPLE,
) -> list[np.ndarray]:
    """LoRA factors (A, B per linear map of the top, scale folded into B) trained on the
    examples' trunk hidden states with SetFit pairs; one epoch (rank: the served top's)."""
    import torch

    from models.split import RANK

    device = _device_of(top)
    factors = _initial_factors(top, rank or RANK, seed)
    optimiser = torch.optim.AdamW(factors, lr=LEARNING_RATE, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    per_example = max(2, min(pairs_per_example, MAX_PAIRS // len(labels)))
    pairs = _pairs(labels, per_example, rng)
    for start in range(0, len(pairs), PAIR_BATCH):
        chunk = pairs[start : start + PAIR_BATCH]
        # Both sides of every pair in one pass through the top.
        rows = [hidden[i] for i, _, _ in chunk] + [hidden[j] for _, j, _ in chunk]
        left, right = _embed_rows(top, rows, _scaled(factors)).split(len(chunk))
        target = torch.tensor([same for _, _, same in chunk], device=device)
        loss = torch.nn.functional.mse_loss((left * right).sum(dim=1), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return [f.detach().cpu().numpy().copy() for f in _scaled(factors)]


def tune_views(
    top, views: np.ndarray, labels: list[str], *, seed: int = 0, rank: int | None = None
) -> list[np.ndarray]:
    """LoRA factors for an image top, trained on the trunk's activations of augmented views
    (`views`: one row per image, `VIEWS_PER_IMAGE` views each) with cross-entropy through
    a cosine classifier, which starts at the class means of the pretrained top's
    embeddings and is dropped after (the head is fitted on the tuned embeddings)."""
    import torch

    from models.split import RANK

    classes = sorted(set(labels))
    per_image = views.shape[1]
    device = _device_of(top)
    x = torch.from_numpy(views.reshape(-1, *views.shape[2:])).to(device)
    y = torch.tensor([classes.index(label) for label in labels], device=device)
    y = y.repeat_interleave(per_image)
    with torch.inference_mode():
        pretrained = torch.cat([top(x[s : s + 256]) for s in range(0, len(x), 256)])
    means = torch.stack([pretrained[y == c].mean(dim=0) for c in range(len(classes))])
    classifier = torch.nn.functional.normalize(means, dim=1).clone().requires_grad_(True)
    factors = _initial_factors(top, rank or RANK, seed)
    optimiser = torch.optim.AdamW(
        [
            {"params": factors, "lr": LEARNING_RATE},
            {"params": [classifier], "lr": CLASSIFIER_LEARNING_RATE},
        ],
        weight_decay=0.0,
    )
    generator = torch.Generator().manual_seed(seed)
    for _ in range(IMAGE_EPOCHS):
        order = torch.randperm(len(y), generator=generator).to(device)
        for batch in order.split(IMAGE_BATCH):
            embedded = top(x[batch], *_scaled(factors))
            logits = COSINE_SCALE * embedded @ torch.nn.functional.normalize(classifier, dim=1).T
            loss = torch.nn.functional.cross_entropy(logits, y[batch], label_smoothing=0.1)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return [f.detach().cpu().numpy().copy() for f in _scaled(factors)]


class TextExamples:
    """A text head's examples as tuning sees them: the trunk's hidden states of each."""

    def __init__(self, top, hidden: list, pairs_per_example: int = PAIRS_PER_EXAMPLE) -> None:
        self.top, self.hidden, self.pairs_per_example = top, hidden, pairs_per_example

    @property
    def size(self) -> int:
        return len(self.hidden)

    def tune(self, rows, labels: list[str], seed: int) -> list[np.ndarray]:
        hidden = [self.hidden[i] for i in rows]
        return tune(self.top, hidden, labels, seed=seed, pairs_per_example=self.pairs_per_example)

    def embed(self, factors: list[np.ndarray] | None) -> np.ndarray:
        return embed(self.top, self.hidden, factors)


class ImageExamples:
    """An image head's examples as tuning sees them: the trunk's activations of each image
    as served (the centre crop) and of its augmented views (none for images only embedded,
    such as unlabelled ones)."""

    def __init__(self, top, centre: np.ndarray, views: np.ndarray | None = None) -> None:
        self.top, self.centre, self.views = top, centre, views

    @property
    def size(self) -> int:
        return len(self.centre)

    @classmethod
    def of(
        cls, trunk, top, images: list[bytes], pre, max_pixels: int, seed: int = 0
    ) -> ImageExamples:
        """Images (already accepted) through the trunk (`onnx_trunk`): the centre crop as
        served and `VIEWS_PER_IMAGE` augmented views of each, a few images at a time (the
        decoded views of 300 images would be 180 MB)."""
        from models.preprocess import augmented_views

        rng = np.random.default_rng(seed)
        views = []
        for start in range(0, len(images), 8):
            chunk = images[start : start + 8]
            augmented = np.concatenate(
                [augmented_views(data, pre, VIEWS_PER_IMAGE, rng) for data in chunk]
            )
            activations = image_activations(trunk, augmented)
            views.append(activations.reshape(len(chunk), VIEWS_PER_IMAGE, *activations.shape[1:]))
        centre = centre_activations(trunk, images, pre, max_pixels)
        return cls(top, centre, np.concatenate(views))

    def tune(self, rows, labels: list[str], seed: int) -> list[np.ndarray]:
        assert self.views is not None, "labelled examples have their augmented views"
        return tune_views(self.top, self.views[np.asarray(rows)], labels, seed=seed)

    def embed(self, factors: list[np.ndarray] | None) -> np.ndarray:
        return embed_images(self.top, self.centre, factors)


def embed_images(top, hidden: np.ndarray, factors: list[np.ndarray] | None, batch: int = 64):
    """Embeddings of images' trunk activations through an image top with a head's factors."""
    import torch

    device = _device_of(top)
    tensors = [] if factors is None else [torch.from_numpy(f).to(device) for f in factors]
    with torch.inference_mode():
        return np.concatenate(
            [
                top(torch.from_numpy(hidden[s : s + batch]).to(device), *tensors).cpu().numpy()
                for s in range(0, len(hidden), batch)
            ]
        )


def centre_activations(trunk, images: list[bytes], pre, max_pixels: int) -> np.ndarray:
    """The trunk's activations of images (already accepted) as served: the centre crop."""
    from models.preprocess import decode_image

    return np.concatenate(
        [
            image_activations(
                trunk,
                np.stack([decode_image(data, pre, max_pixels) for data in images[s : s + 32]]),
            )
            for s in range(0, len(images), 32)
        ]
    )


def image_activations(trunk, images: np.ndarray, batch: int = 32) -> np.ndarray:
    """The trunk's activations of uint8 NHWC images (what an image top starts from)."""
    return np.concatenate([trunk(images[s : s + batch]) for s in range(0, len(images), batch)])


def onnx_trunk(path: Path, device: str = "cpu"):
    """An image trunk's ONNX graph (as served: `models.export.ensure_split`) as a function
    of uint8 NHWC images, on the server's `device`: 3.5 times as fast as PyTorch's trunk
    on 2 cores (lite0: 5.6 against 20 ms an image), and the activations the served top
    sees."""
    import onnxruntime as ort

    from models.runtime import available_providers

    options = ort.SessionOptions()
    # Idle threads would spin on the cores that predicts need (models/runtime.py).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # cuDNN's quick choice of convolution: this session lives for one tuning, and its
    # batches come in a few sizes, each of which an exhaustive search would time anew.
    providers = available_providers(device, cudnn_conv_algo_search="HEURISTIC")
    session = ort.InferenceSession(str(path), options, providers=providers)
    return lambda images: session.run(["hidden"], {"image": images})[0]


def embed(top, hidden: list, factors: list[np.ndarray] | None, batch: int = 64) -> np.ndarray:
    """Embeddings of trunk hidden states through the top with a head's factors."""
    import torch

    device = _device_of(top)
    tensors = None if factors is None else [torch.from_numpy(f).to(device) for f in factors]
    with torch.inference_mode():
        return np.concatenate(
            [
                _embed_rows(top, hidden[s : s + batch], tensors).cpu().numpy()
                for s in range(0, len(hidden), batch)
            ]
        )


def hidden_states(trunk, token_rows: list[np.ndarray], pad_id: int, batch: int = 32) -> list:
    """The trunk's hidden states of each row of token ids, without its padding: what
    tuning and embedding through the top start from."""
    import torch

    from models.preprocess import pad_tokens

    device = _device_of(trunk)
    states = []
    with torch.inference_mode():
        for start in range(0, len(token_rows), batch):
            rows = token_rows[start : start + batch]
            feeds = {k: torch.from_numpy(v).to(device) for k, v in pad_tokens(rows, pad_id).items()}
            hidden = trunk(feeds["input_ids"], feeds["attention_mask"]).cpu().numpy()
            states += [hidden[i, : len(r)].copy() for i, r in enumerate(rows)]
    return states


def _initial_factors(top, rank: int, seed: int) -> list:
    """A head's factors before training, trainable: A Kaiming-uniform (as torch.nn.Linear
    initialises its weights), B zeros, so that training starts from the pretrained top."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    factors = []
    for i, shape in enumerate(top.factor_shapes(rank)):
        if i % 2 == 0:
            bound = 1 / math.sqrt(shape[1])
            factors.append((torch.rand(shape, generator=generator) * 2 - 1) * bound)
        else:
            factors.append(torch.zeros(shape))
    device = _device_of(top)
    return [f.to(device).requires_grad_(True) for f in factors]


def _scaled(factors: list) -> list:
    """B scaled by alpha / rank (a view for training; the stored B carries it)."""
    return [f * LORA_SCALE if i % 2 else f for i, f in enumerate(factors)]


def _embed_rows(top, rows: list, factors):
    import torch

    longest = max(len(r) for r in rows)
    hidden = torch.zeros(len(rows), longest, rows[0].shape[-1])
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, r in enumerate(rows):
        hidden[i, : len(r)] = torch.as_tensor(r)
        mask[i, : len(r)] = 1
    device = _device_of(top)
    return top(hidden.to(device), mask.to(device), *(factors or []))


def torch_device(device: str) -> str:
    """Where tuning's PyTorch runs for the server's `device` setting: the GPU when it is
    cuda and this PyTorch sees one (a CPU build of PyTorch tunes on the CPU)."""
    import torch

    return "cuda" if device == "cuda" and torch.cuda.is_available() else "cpu"


def _device_of(module):
    """Where a top's (or a trunk's) weights lie: its inputs and factors go there too."""
    return next(module.parameters()).device


def _pairs(
    labels: list[str], per_example: int, rng: np.random.Generator
) -> list[tuple[int, int, float]]:
    """SetFit's pairs: per example, alternately one with its label and one without."""
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    pairs = []
    for i, label in enumerate(labels):
        same = [j for j in by_label[label] if j != i]
        other = [j for j, lab in enumerate(labels) if lab != label]
        for k in range(per_example):
            if k % 2 == 0 and same:
                pairs.append((i, int(rng.choice(same)), 1.0))
            else:
                pairs.append((i, int(rng.choice(other)), 0.0))
    rng.shuffle(pairs)
    return pairs
