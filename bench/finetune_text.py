"""Few-shot text: does fine-tuning the top of a sentence encoder on a shared frozen trunk,
SetFit-style, beat the frozen head? (Issue 13 groundwork.)

    python bench/finetune_text.py                          # MPNet, UCI, 8 per label
    python bench/finetune_text.py --top-layers 2 --rank 16
    python bench/finetune_text.py --backbone minilm_l6 --sets ag_news

In-process, PyTorch on the CPU. The trunk (the encoder up to its last `--top-layers`
layers) runs once per sentence and its hidden states are cached; the top (those layers)
gets low-rank updates (LoRA, Hu et al. 2021, on every linear map of the layer; the
pretrained weights stay shared) trained with SetFit's objective (Tunstall et al. 2022:
the cosine similarity of pooled pairs regressed onto 1 for the same label and 0 for
different ones, `--pairs` pairs per example), then a head is fitted on the tuned
embeddings by adapters.heads.train_head, as the service fits it. The frozen column is
train_head on the unchanged embeddings of the same model. Each draw takes `--shots`
examples per label; the rest of the set scores it.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from adapters.heads import predict_proba, train_head  # noqa: E402
from bench.accuracy import read_texts  # noqa: E402
from models.preprocess import load_tokenizer, token_ids  # noqa: E402
from service.settings import Settings  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "text"
SETS = {
    "yelp": DATA / "uci_sentiment_labelled_sentences" / "yelp_labelled.txt",
    "amazon": DATA / "uci_sentiment_labelled_sentences" / "amazon_cells_labelled.txt",
    "imdb": DATA / "uci_sentiment_labelled_sentences" / "imdb_labelled.txt",
}


class LoRALinear(torch.nn.Module):
    """y = W x + b + (B A x)·(alpha / r): W, b frozen and shared, A and B per head."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.a = torch.nn.Parameter(torch.empty(rank, base.in_features))
        self.b = torch.nn.Parameter(torch.zeros(base.out_features, rank))
        torch.nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.a.T @ self.b.T) * self.scale


class Split:
    """A transformers encoder cut before its last `top` layers (MPNet and BERT families)."""

    def __init__(self, folder: Path, top: int) -> None:
        from transformers import AutoModel

        self.model = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.layers = self.model.encoder.layer
        self.cut = len(self.layers) - top
        self.mpnet = hasattr(self.model.encoder, "relative_attention_bias")

    @torch.no_grad()
    def trunk(self, ids: list[np.ndarray], pad_id: int, batch: int = 32) -> list[torch.Tensor]:
        """Hidden states entering the top, one (tokens, dim) tensor per text."""
        out = []
        for start in range(0, len(ids), batch):
            rows = ids[start : start + batch]
            x, mask = _pad([torch.from_numpy(r) for r in rows], pad_id)
            hidden = self.model(
                input_ids=x, attention_mask=mask, output_hidden_states=True
            ).hidden_states[self.cut]
            out.extend(hidden[i, : len(r)].clone() for i, r in enumerate(rows))
        return out

    def top(self, hidden: list[torch.Tensor]) -> torch.Tensor:
        """Pooled, normalised embeddings of the trunk's hidden states through the top."""
        h, mask = _pad(hidden, 0.0)
        mask = mask[..., 0] if mask.dim() == 3 else mask
        from transformers.masking_utils import create_bidirectional_mask

        extended = create_bidirectional_mask(
            config=self.model.config, inputs_embeds=h, attention_mask=mask
        )
        kwargs = {}
        if self.mpnet:
            kwargs["position_bias"] = self.model.encoder.compute_position_bias(h)
        for layer in self.layers[self.cut :]:
            h = layer(h, extended, **kwargs)[0]
        m = mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=1)

    def add_lora(self, rank: int, alpha: float) -> list[torch.nn.Parameter]:
        """Fresh low-rank updates on every linear map of the top; their parameters."""
        params = []
        for layer in self.layers[self.cut :]:
            for module in list(layer.modules()):
                for child_name, child in list(module.named_children()):
                    if isinstance(child, torch.nn.Linear):
                        lora = LoRALinear(child, rank, alpha)
                        setattr(module, child_name, lora)
                        params += [lora.a, lora.b]
        return params

    def remove_lora(self) -> None:
        for layer in self.layers[self.cut :]:
            for module in list(layer.modules()):
                for child_name, child in list(module.named_children()):
                    if isinstance(child, LoRALinear):
                        setattr(module, child_name, child.base)


def _pad(rows: list[torch.Tensor], pad) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(r) for r in rows)
    shape = (len(rows), longest, *rows[0].shape[1:])
    out = torch.full(shape, pad, dtype=rows[0].dtype)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return out, mask


def pairs(labels: list[str], per_example: int, rng: np.random.Generator) -> list[tuple]:
    """SetFit's pairs: for each example, positives and negatives in equal numbers."""
    out = []
    by_label = {lab: [i for i, x in enumerate(labels) if x == lab] for lab in set(labels)}
    for i, lab in enumerate(labels):
        others = [j for j, x in enumerate(labels) if x != lab]
        same = [j for j in by_label[lab] if j != i]
        for k in range(per_example):
            if k % 2 == 0 and same:
                out.append((i, int(rng.choice(same)), 1.0))
            else:
                out.append((i, int(rng.choice(others)), 0.0))
    return out


def embed(split: Split, hidden: list[torch.Tensor], batch: int = 64) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate(
            [split.top(hidden[s : s + batch]).numpy() for s in range(0, len(hidden), batch)]
        )


def accuracy(x_train, y_train, x_test, y_test) -> float:
    head = train_head(x_train, y_train)
    predicted = np.array(head.labels)[predict_proba(x_test, head.weights, head.bias).argmax(1)]
    return float(np.mean(predicted == np.array(y_test)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="mpnet_base_v2")
    parser.add_argument("--sets", default="yelp,amazon,imdb")
    parser.add_argument("--shots", type=int, default=8)
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--top-layers", type=int, default=1)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    spec = Settings().catalog[args.backbone]
    pre = spec.preprocessing
    folder = pre.tokenizer_file().parent
    split = Split(folder, args.top_layers)
    tokenizer = load_tokenizer(pre.tokenizer_file(), pre.max_tokens)
    print(f"# bench/finetune_text.py {' '.join(sys.argv[1:])}")
    print("| set | draw | frozen | fine-tuned top | train s | LoRA params |")
    print("|---|---|---|---|---|---|")
    gains = []
    for name in args.sets.split(","):
        rows = read_texts(SETS[name])
        texts, labels = [t for _, t in rows], [lab for lab, _ in rows]
        hidden = split.trunk(token_ids(texts, tokenizer), pre.pad_id())
        frozen = embed(split, hidden)
        for draw in range(args.draws):
            rng = np.random.default_rng(draw)
            chosen = []
            for lab in sorted(set(labels)):
                idx = [i for i, x in enumerate(labels) if x == lab]
                chosen += list(rng.choice(idx, args.shots, replace=False))
            rest = sorted(set(range(len(texts))) - set(chosen))
            y_train = [labels[i] for i in chosen]
            y_test = [labels[i] for i in rest]
            base = accuracy(frozen[chosen], y_train, frozen[rest], y_test)

            start = time.perf_counter()
            params = split.add_lora(args.rank, alpha=2 * args.rank)
            optimiser = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
            train_hidden = [hidden[i] for i in chosen]
            for _ in range(args.epochs):
                batch_pairs = pairs(y_train, args.pairs, rng)
                rng.shuffle(batch_pairs)
                for s in range(0, len(batch_pairs), 16):
                    chunk = batch_pairs[s : s + 16]
                    a = split.top([train_hidden[i] for i, _, _ in chunk])
                    b = split.top([train_hidden[j] for _, j, _ in chunk])
                    target = torch.tensor([t for _, _, t in chunk])
                    loss = torch.nn.functional.mse_loss((a * b).sum(1), target)
                    optimiser.zero_grad()
                    loss.backward()
                    optimiser.step()
            seconds = time.perf_counter() - start
            tuned = embed(split, hidden)
            n_params = sum(p.numel() for p in params)
            split.remove_lora()
            tuned_acc = accuracy(tuned[chosen], y_train, tuned[rest], y_test)
            gains.append((base, tuned_acc))
            print(
                f"| {name} | {draw} | {base:.3f} | {tuned_acc:.3f} | {seconds:.1f} |"
                f" {n_params} ({n_params * 4 / 1024:.0f} KiB) |",
                flush=True,
            )
    print(
        f"\nmean: frozen {statistics.mean(g[0] for g in gains):.3f},"
        f" fine-tuned top {statistics.mean(g[1] for g in gains):.3f}"
    )


if __name__ == "__main__":
    main()
