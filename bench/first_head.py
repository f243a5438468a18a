"""Time to a first servable head, and to the final one, for a text head of 872 sentences
created with the defaults (`backbone: auto`, `fine_tune: auto`), over HTTP.

    python bench/first_head.py --text ../shared/data/text/uci_sentiment_labelled_sentences

872 labelled sentences (SST-2's dev set has 872; here the UCI reviews of Amazon, IMDB
and Yelp, shuffled with a fixed seed, balanced) posted as JSON to a server on the
embedded defaults. "First" is the request's answer (or, after a 202, the head turning
`ready`): from then on it predicts. "Final" is when its `progress` is gone, the
comparison with a fine-tuned top done; before issue 29's change that was also the
first. Prints both, the versions, what was chosen, and a predict made in between.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import read_texts
from deploy.local_server import BENTOML, poll_until_trained, start_server, stop_server
from service.settings import Settings

N_TEXTS = 872


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--text", type=Path, required=True, help="the UCI sentiment folder")
    args = parser.parse_args()
    rows = [row for path in sorted(args.text.glob("*_labelled.txt")) for row in read_texts(path)]
    random.Random(0).shuffle(rows)
    per_label = N_TEXTS // 2
    examples = [
        {"label": {"0": "negative", "1": "positive"}[label], "text": text}
        for wanted in ("0", "1")
        for label, text in [r for r in rows if r[0] == wanted][:per_label]
    ]
    settings = Settings()
    server = start_server(BENTOML, Path(tempfile.mkdtemp()), settings.backbone_dir)
    try:
        with server.new_tenant("first-head") as client:
            started = time.perf_counter()
            created = client.post("/v1/heads", json={"name": "sentiment", "backbone": "auto",
                                                     "examples": examples})  # fmt: skip
            head = created.json()
            if created.status_code == 202:
                head = poll_until_trained(client, head["id"])
            first_s = time.perf_counter() - started
            first = head
            predicted = client.post(
                f"/v1/heads/{head['id']}/predict",
                json={"inputs": [{"text": "Great value, works perfectly."}]},
            )
            # Each version as it is published, until no next one is on its way.
            versions = [(first_s, head)]
            while True:
                head = client.get(f"/v1/heads/{head['id']}").json()
                if head["version"] != versions[-1][1]["version"] and head["status"] == "ready":
                    versions.append((time.perf_counter() - started, head))
                if head["status"] != "training" and not head["progress"]:
                    break
                time.sleep(0.5)
            final_s, final = time.perf_counter() - started, head
    finally:
        stop_server(server)

    def summary(h: dict) -> str:
        tuning = h["metrics"].get("fine_tuning") or {}
        return (
            f"version {h['version']} on {h['backbone']}, cv_accuracy {h['metrics']['cv_accuracy']},"
            f" depths {(h['metrics'].get('depths') or {}).get('chosen')},"
            f" fine-tuning: {tuning.get('chosen')}"
        )

    print(f"# bench/first_head.py: {len(examples)} sentences, backbone auto, fine_tune auto")
    print(f"first servable head  {first_s:7.1f} s  (HTTP {created.status_code}) {summary(first)}")
    print(
        f"  a predict meanwhile: HTTP {predicted.status_code} {predicted.json().get('predictions', predicted.text)}"
    )
    for at, version in versions[1:]:
        print(f"next version         {at:7.1f} s  {summary(version)}")
    print(f"final head           {final_s:7.1f} s  {summary(final)}")


if __name__ == "__main__":
    main()
