"""What serving fine-tuned text heads on a shared trunk would cost: a batch through the
trunk once, then the top once per head group, against the whole backbone for every row.
(Issue 13 groundwork: the target is 10% of rows on fine-tuned heads at ≥ 0.7 of the
all-frozen throughput.)

    python bench/finetune_serving.py                     # MPNet, batches of 32
    python bench/finetune_serving.py --backbone minilm_l6 --tuned-share 0.3

ONNX Runtime on the CPU (1 thread, as one runner lane), the graphs of models/split.py.
Each batch holds `--batch` UCI sentences; `--tuned-share` of its rows belong to
`--tuned-heads` fine-tuned heads (random LoRA factors of rank 8), the rest to frozen heads.
Compared side by side in one run:
- `whole`: the served backbone graph on every row (today);
- `split`: the trunk on every row, then the top: frozen rows once with zero factors, each
  fine-tuned head's rows with its factors.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.accuracy import read_texts
from models.export import ensure_onnx
from models.preprocess import load_tokenizer, pad_tokens, token_ids
from models.split import export_split
from service.settings import Settings

UCI = ROOT.parent / "shared" / "data" / "text" / "uci_sentiment_labelled_sentences"


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="mpnet_base_v2")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--tuned-share", type=float, default=0.1)
    parser.add_argument("--tuned-heads", type=int, default=3)
    args = parser.parse_args()
    settings = Settings()
    spec = settings.catalog[args.backbone]
    pre = spec.preprocessing
    whole = session(ensure_onnx(spec, settings.backbone_dir))
    trunk_module, top_module = spec.build_split()
    folder = Path(tempfile.mkdtemp())
    export_split(trunk_module, top_module, folder / "trunk.onnx", folder / "top.onnx")
    trunk, top = session(folder / "trunk.onnx"), session(folder / "top.onnx")
    names = [i.name for i in top.get_inputs()][2:]
    shapes = top_module.factor_shapes()
    rng = np.random.default_rng(0)
    zeros = {n: np.zeros(s, np.float32) for n, s in zip(names, shapes, strict=True)}
    heads = [
        {
            n: (rng.standard_normal(s) * 0.02).astype(np.float32)
            for n, s in zip(names, shapes, strict=True)
        }
        for _ in range(args.tuned_heads)
    ]
    texts = [t for _, t in read_texts(UCI / "yelp_labelled.txt")]
    tokenizer = load_tokenizer(pre.tokenizer_file(), pre.max_tokens)
    batches = []
    for _ in range(args.batches):
        rows = token_ids(list(rng.choice(texts, args.batch)), tokenizer)
        n_tuned = round(args.tuned_share * args.batch)
        owner = [-1] * (args.batch - n_tuned) + [k % args.tuned_heads for k in range(n_tuned)]
        batches.append((pad_tokens(rows, pre.pad_id()), np.array(owner)))

    def run_whole(feeds, _owner) -> None:
        whole.run(["embedding"], feeds)

    def run_split(feeds, owner) -> None:
        hidden = trunk.run(["hidden"], feeds)[0]
        mask = feeds["attention_mask"]
        for head in [-1, *range(args.tuned_heads)]:
            rows = owner == head
            if rows.any():
                factors = zeros if head < 0 else heads[head]
                top.run(
                    ["embedding"], {"hidden": hidden[rows], "attention_mask": mask[rows], **factors}
                )

    timings = {"whole": [], "split": []}
    for _ in range(3):  # alternating rounds: both see the same machine
        for name, run in (("whole", run_whole), ("split", run_split)):
            start = time.perf_counter()
            for feeds, owner in batches:
                run(feeds, owner)
            timings[name].append(time.perf_counter() - start)
    rows = args.batch * args.batches
    whole_rate, split_rate = (rows / min(timings[k]) for k in ("whole", "split"))
    print(f"# bench/finetune_serving.py {' '.join(sys.argv[1:])}")
    print(f"whole backbone, every row:      {whole_rate:.1f} rows/s")
    print(
        f"trunk + top per head group:     {split_rate:.1f} rows/s"
        f" ({args.tuned_share:.0%} of rows on {args.tuned_heads} fine-tuned heads)"
    )
    print(f"ratio split / whole:            {split_rate / whole_rate:.2f}")


if __name__ == "__main__":
    main()
