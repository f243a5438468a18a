"""Few-shot text: does fine-tuning a head's own top on the shared frozen trunk (SetFit
pairs, LoRA factors; adapters/finetune.py) beat the frozen head? (Issue 13.)

    python bench/finetune_text.py                          # MPNet, UCI, 8 per label
    python bench/finetune_text.py --backbone minilm_l6 --sets ag_news --draws 2

In-process, PyTorch on the CPU, through the service's own code: models/split.py cuts the
encoder (the last 4 layers are the top), the trunk runs once per sentence, and
adapters/finetune.py tunes the top's LoRA factors. Per draw (`--shots` examples per
label; the rest of the set scores it):
- `frozen`: adapters.heads.train_head on the backbone's embeddings, as served today;
- `fine-tuned`: the top tuned on all the draw's examples, then train_head on its
  embeddings;
- `auto`: what `fine_tune: auto` would serve: `adapters.finetune.compare` decides on
  held-out folds of the draw's examples.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from adapters.finetune import TextExamples, compare, embed, hidden_states, tune
from adapters.heads import predict_proba, train_head
from bench.accuracy import read_texts
from models.preprocess import load_tokenizer, token_ids
from service.settings import Settings

DATA = ROOT.parent / "shared" / "data" / "text"
SETS = {
    "yelp": DATA / "uci_sentiment_labelled_sentences" / "yelp_labelled.txt",
    "amazon": DATA / "uci_sentiment_labelled_sentences" / "amazon_cells_labelled.txt",
    "imdb": DATA / "uci_sentiment_labelled_sentences" / "imdb_labelled.txt",
    "ag_news": DATA / "ag_news" / "test.csv",
}


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
    parser.add_argument("--first-draw", type=int, default=0, help="seed of the first draw")
    parser.add_argument("--max-rows", type=int, default=2000, help="rows per set scored")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    spec = Settings().catalog[args.backbone]
    pre = spec.preprocessing
    trunk, top = spec.build_split()
    tokenizer = load_tokenizer(pre.tokenizer_file(), pre.max_tokens)
    print(f"# bench/finetune_text.py {' '.join(sys.argv[1:])}")
    print(
        "| set | draw | frozen | fine-tuned | auto (choice) | held-out frozen / fine-tuned"
        " (accuracy, log-loss) | tune s | compare s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    results = []
    for name in args.sets.split(","):
        rows = read_texts(SETS[name])
        rows = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))[: args.max_rows]]
        texts, labels = [t for _, t in rows], [lab for lab, _ in rows]
        hidden = hidden_states(trunk, token_ids(texts, tokenizer), pre.pad_id())
        frozen = embed(top, hidden, None)
        for draw in range(args.first_draw, args.first_draw + args.draws):
            rng = np.random.default_rng(draw)
            chosen = [
                int(i)
                for lab in sorted(set(labels))
                for i in rng.choice(
                    [i for i, x in enumerate(labels) if x == lab], args.shots, replace=False
                )
            ]
            rest = sorted(set(range(len(texts))) - set(chosen))
            y_train, y_test = [labels[i] for i in chosen], [labels[i] for i in rest]
            base = accuracy(frozen[chosen], y_train, frozen[rest], y_test)
            started = time.perf_counter()
            factors = tune(top, [hidden[i] for i in chosen], y_train, seed=draw)
            tune_s = time.perf_counter() - started
            tuned = embed(top, hidden, factors)
            always = accuracy(tuned[chosen], y_train, tuned[rest], y_test)
            started = time.perf_counter()
            examples = TextExamples(top, [hidden[i] for i in chosen])
            choice = compare(examples, y_train, frozen[chosen], seed=draw)
            compare_s = time.perf_counter() - started
            auto = always if choice.fine_tuned else base
            results.append((base, always, auto))
            held_out = " / ".join(
                f"{c['cv_accuracy']:.2f}, {c['cv_log_loss']:.3f}"
                for c in choice.report.get("candidates", {}).values()
            )
            print(
                f"| {name} | {draw} | {base:.3f} | {always:.3f} | {auto:.3f}"
                f" ({choice.report['chosen']}) | {held_out} | {tune_s:.1f} | {compare_s:.1f} |",
                flush=True,
            )
    frozen_mean, tuned_mean, auto_mean = (statistics.mean(r[k] for r in results) for k in range(3))
    print(f"\nmean: frozen {frozen_mean:.3f}, fine-tuned {tuned_mean:.3f}, auto {auto_mean:.3f}")


if __name__ == "__main__":
    main()
