"""Fine-tuning the top of EfficientNet-Lite0 on a shared frozen trunk: how far does it
take flowers past the frozen head? (Issue 13 groundwork.)

    python bench/finetune_top.py                  # about 5 minutes on 2 cores
    python bench/finetune_top.py --views 8 --epochs 30

In-process, PyTorch on the CPU. The trunk (lite0 up to its last stage, `blocks[:6]`) runs
once per augmented view of each training photo (random resized crops, flips) and its
activations are cached; the top (`blocks[6]`, the head convolution and its norm, from the
pretrained values) and a new linear classifier train on the cached activations with
AdamW, label smoothing and early stopping on a held-out fifth of the training photos.
Validation: the flowers validation split, centre crop as served. Reports the frozen
head's accuracy (adapters.heads.train_head on the served embeddings) beside it, the
training time and the top's size per head.
"""

from __future__ import annotations

import argparse
import copy
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from adapters.heads import predict_proba, train_head
from bench.accuracy import image_split
from models.preprocess import decode_image
from models.timm_backbone import load_timm_model
from service.settings import get_backbone

FLOWERS = ROOT.parent / "shared" / "data" / "images" / "flowers"


def augmented(data: bytes, pre, rng: np.random.Generator) -> np.ndarray:
    """A random resized crop (30-100% of the area, aspect 3/4-4/3) and flip, as uint8."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = image.size
    for _ in range(10):
        area = w * h * rng.uniform(0.3, 1.0)
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = int(round((area * aspect) ** 0.5)), int(round((area / aspect) ** 0.5))
        if cw <= w and ch <= h:
            left, top = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
            image = image.crop((left, top, left + cw, top + ch))
            break
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    size = pre.image_size
    return np.asarray(image.resize((size, size), Image.BICUBIC))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--views", type=int, default=4, help="augmented views per photo")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-4, help="the top's learning rate")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    spec = get_backbone("efficientnet_lite0")
    model = load_timm_model("tf_efficientnet_lite0", spec.weights_file(), layout="by_position")
    pre = spec.preprocessing
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(pre.std).view(1, 3, 1, 1) * 255

    def trunk(images: np.ndarray) -> torch.Tensor:
        with torch.inference_mode():
            x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() - mean) / std
            x = model.bn1(model.conv_stem(x))
            return model.blocks[:6](x)

    train, val = image_split(FLOWERS / "train"), image_split(FLOWERS / "val")
    labels = sorted({lab for lab, _ in train})
    index = {lab: i for i, lab in enumerate(labels)}
    order = rng.permutation(len(train))
    held = set(order[: len(train) // 5].tolist())
    started = time.perf_counter()
    fit_x, fit_y, stop_x, stop_y = [], [], [], []
    for i, (label, path) in enumerate(train):
        data = path.read_bytes()
        if i in held:  # early stopping on the served centre crop
            stop_x.append(decode_image(data, pre, 10**8))
            stop_y.append(index[label])
            continue
        fit_x += [augmented(data, pre, rng) for _ in range(args.views)]
        fit_y += [index[label]] * args.views
    fit_a = torch.cat([trunk(np.stack(fit_x[k : k + 32])) for k in range(0, len(fit_x), 32)])
    stop_a = trunk(np.stack(stop_x))
    val_images = np.stack([decode_image(p.read_bytes(), pre, 10**8) for _, p in val])
    val_a = trunk(val_images)
    val_y = torch.tensor([index[lab] for lab, _ in val])
    cached = time.perf_counter() - started

    top = torch.nn.Sequential(
        copy.deepcopy(model.blocks[6]),
        copy.deepcopy(model.conv_head),
        copy.deepcopy(model.bn2),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(1280, len(labels)),
    )
    optimiser = torch.optim.AdamW(
        [
            {"params": top[:3].parameters(), "lr": args.lr},
            {"params": top[6].parameters(), "lr": 1e-3},
        ],
        weight_decay=0.01,
    )
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    y = torch.tensor(fit_y)
    best, best_state, best_epoch = -1.0, None, 0
    for epoch in range(args.epochs):
        top.train()
        for batch in torch.randperm(len(y)).split(32):
            optimiser.zero_grad()
            loss_fn(top(fit_a[batch]), y[batch]).backward()
            optimiser.step()
        top.eval()
        with torch.inference_mode():
            score = float((top(stop_a).argmax(1) == torch.tensor(stop_y)).float().mean())
        if score > best:
            best, best_state, best_epoch = score, copy.deepcopy(top.state_dict()), epoch
    top.load_state_dict(best_state)
    top.eval()
    with torch.inference_mode():
        tuned = float((top(val_a).argmax(1) == val_y).float().mean())
    elapsed = time.perf_counter() - started

    # The frozen head as served: pooled features of the whole network, train_head.
    with torch.inference_mode():

        def features(a: torch.Tensor) -> np.ndarray:
            pooled = model.forward_head(model.bn2(model.conv_head(model.blocks[6](a))))
            return torch.nn.functional.normalize(pooled, dim=1).numpy()

        train_images = np.stack([decode_image(p.read_bytes(), pre, 10**8) for _, p in train])
        head = train_head(features(trunk(train_images)), [lab for lab, _ in train], seed=0)
        p = predict_proba(features(val_a), head.weights, head.bias)
    frozen = float(np.mean(np.array(head.labels)[p.argmax(1)] == np.array([lab for lab, _ in val])))
    parameters = sum(x.numel() for x in top.parameters())
    print(
        f"# bench/finetune_top.py: flowers, lite0, {args.views} views per photo, {args.epochs} epochs"
    )
    print(f"frozen head (train_head)       {frozen:.3f}")
    print(
        f"fine-tuned top + classifier    {tuned:.3f}  (best epoch {best_epoch + 1}, held-out {best:.3f})"
    )
    print(
        f"time                           {elapsed:.0f} s ({cached:.0f} s of it the trunk on {len(fit_x) + len(stop_x) + len(val)} images)"
    )
    print(
        f"top's size per head            {parameters:,} parameters, {parameters * 4 / 2**20:.1f} MiB in fp32"
    )


if __name__ == "__main__":
    main()
