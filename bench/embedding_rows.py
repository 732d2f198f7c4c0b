"""How many embedding rows one synchronous step uses, and so how many bytes the compact
gradient exchange sends (the input `S` of bench/SCALING.md).

With W ranks at per-rank batch B, a step first all-reduces a vocabulary-sized f32 mask of the
used rows, then the embedding rows that some review of the W*B in the global batch uses
(plus <pad>) and every other parameter whole; "compact MB" counts both.
This counts those rows on the real corpus, for the shipped configs' vocabulary, truncation
and batch order, over random global batches (the reference's tokenizer and vocab, whose
counts equal ours; bucketed batches are cut as ours are, from length-sorted pools).

    .venv-bench/bin/python bench/embedding_rows.py --data $IMDB_DATA
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "reference"))
from common import PAD_ID, Split, default_cache_dir, load_corpus, plan_batches, truncate  # noqa: E402

CONFIGS = ["seed", "cpu-demo", "gpu-fast"]


def parameters(vocab: int, model: dict) -> tuple[int, int]:
    """(embedding floats, all other floats) of our model for this config."""
    e, h, layers = model["embed_dim"], model["hidden"], model["layers"]
    lstm = sum(4 * h * ((e if layer == 0 else h) + h) + 8 * h for layer in range(layers))
    head_in = 3 * h if model.get("head", "last") == "concat_pool" else h
    return vocab * e, lstm + head_in * 2 + 2


def global_batches(reviews: list[list[int]], size: int, bucketed: bool, pool: int, rng: random.Random):
    """Full global batches of `size` reviews, cut as the reference (and ours) cut them."""
    order = list(range(len(reviews)))
    rng.shuffle(order)
    batches = plan_batches(Split(reviews, [0] * len(reviews)), order, size, bucketed, pool, rng)
    return [b for b in batches if len(b) == size]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="the corpus tarball or folder")
    p.add_argument("--worlds", default="2,4,8")
    p.add_argument("--batches", type=int, default=200, help="global batches sampled per row")
    args = p.parse_args()
    root = Path(__file__).resolve().parent.parent
    print("| config | vocab | W | global batch | rows used (median) | share | dense MB | compact MB | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in CONFIGS:
        config = tomllib.loads((root / "configs" / f"{name}.toml").read_text())
        data, model, train = config["data"], config["model"], config["train"]
        corpus = load_corpus(args.data, data["min_freq"], data.get("max_vocab", 0), str(default_cache_dir()),
                             log=lambda m: print(m, file=sys.stderr))
        vocab = len(corpus.vocab)
        reviews = [truncate(ids, data.get("max_len", 0), data.get("truncation", "head")) for ids in corpus.train_ids]
        embedding, rest = parameters(vocab, model)
        for world in [int(w) for w in args.worlds.split(",")]:
            size = world * train["batch_size"]
            rng = random.Random(world)
            batches = global_batches(reviews, size, train["batch_order"] == "bucketed",
                                     train.get("bucket_pool", 50), rng)
            counts = [len({PAD_ID}.union(*(reviews[i] for i in b))) for b in rng.sample(batches, min(args.batches, len(batches)))]
            rows = statistics.median(counts)
            compact = vocab + rows * model["embed_dim"] + rest  # mask, used rows, the rest
            dense = embedding + rest
            print(f"| {name} | {vocab:,} | {world} | {size} | {rows:,.0f} | {rows / vocab:.1%} "
                  f"| {dense * 4 / 1e6:.1f} | {compact * 4 / 1e6:.2f} | {dense / compact:.1f}x |")


if __name__ == "__main__":
    main()
