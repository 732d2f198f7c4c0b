"""The reference data pipeline, timed: read the tarball + tokenize (basic_english) + build the
vocab from train + encode both splits, of the full corpus, in plain Python as a PyTorch user
would write it (no cache): `seconds`. Also `warm_seconds`: loading the encoded corpus back from
a pickle, as a script that caches it would on its second run. Prints one JSON object.

    python bench/reference/data_pipeline.py --data $IMDB_DATA [--runs 1]

Our side: target/release/pipeline_bench --data $IMDB_DATA --json (cold_seconds is the same work).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import encode_corpus, read_corpus  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.environ.get("IMDB_DATA"), help="the IMDB tarball (default: $IMDB_DATA)")
    p.add_argument("--runs", type=int, default=1, help="repetitions (median reported)")
    p.add_argument("--min-freq", type=int, default=1)
    args = p.parse_args()
    if not args.data:
        p.error("--data (or $IMDB_DATA) is required")
    if args.runs < 1:
        p.error("--runs must be at least 1")
    totals, runs = [], []
    for _ in range(args.runs):
        t = time.perf_counter()
        raw = read_corpus(args.data)
        read_seconds = time.perf_counter() - t
        encoded, stages = encode_corpus(raw, args.min_freq)
        total = time.perf_counter() - t
        if len(encoded.train_ids) != 25_000 or len(encoded.test_ids) != 25_000:
            raise SystemExit(f"expected 25,000 + 25,000 reviews, got {len(encoded.train_ids)} + {len(encoded.test_ids)}")
        totals.append(total)
        runs.append({"read": read_seconds, **stages, "total": total,
                     "vocab_words": len(encoded.vocab) - 2,
                     "train_tokens": sum(map(len, encoded.train_ids))})
    # Warm: what a second run of a script that caches its encoded corpus (as tutorial.py does,
    # with pickle) pays; comparable with our encoded-cache hit.
    warm = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "encoded.pkl")
        with open(cache, "wb") as f:
            pickle.dump(encoded, f, protocol=pickle.HIGHEST_PROTOCOL)
        for _ in range(args.runs):
            t = time.perf_counter()
            with open(cache, "rb") as f:
                pickle.load(f)
            warm.append(time.perf_counter() - t)
    print(json.dumps({"seconds": statistics.median(totals), "warm_seconds": statistics.median(warm), "runs": runs}))


if __name__ == "__main__":
    main()
