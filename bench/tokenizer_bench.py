#!/usr/bin/env python3
"""Subword against word tokenization (issue 21), written into bench/ACCURACY.md.

    cargo build --release --bins && cargo build --release -p trainer-bench --bin tokenize_bench
    scripts/tokenizers_env.sh          # Python tokenizers for the throughput ratio
    python3 bench/tokenizer_bench.py --data $IMDB_DATA                       # everything
    python3 bench/tokenizer_bench.py --data ... --configs cpu-demo --seeds 1,2,3 --results bench/ACCURACY.md
    python3 bench/tokenizer_bench.py --data ... --configs cpu-best --cells bpe:8000,bpe:16000,unigram:16000 \
        --sections accuracy --results bench/ACCURACY.md
    python3 bench/tokenizer_bench.py --data ... --sections throughput

Accuracy: every cell is `coordinator --workers 2` on configs/<config>.toml with the
tokenizer fields changed (basic_english as the config has it; then each --cells entry,
such as bpe:8000 or unigram:16000), each config in its own marked table,
one run per seed (bench/ablation.py's runner: a finished run with the same config is not
trained again). Reported: test accuracy of the kept model (mean, min / max), the train
split's tokens per review before truncation and the test split's <unk> share (from
`coordinator data --json`), training seconds, tokens/s, and the training seconds until the
first epoch whose validation accuracy reached --target.

Throughput: bench/src/bin/tokenize_bench.rs (ours) and Python's `tokenizers` encode the
same reviews (both splits, 50,000) with the same tokenizer.json, one after the other in
one run of this script; the ratio of their times is what to read, since the machine may be
shared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ablation  # noqa: E402  (the runner, TOML writer and CPU name)

ROOT = Path(__file__).resolve().parent.parent
# One marked section per accuracy config and one for throughput, so that a run of one
# config (a cpu-best run takes about an hour on 2 cores) rewrites only its own table.
def markers(section: str) -> tuple[str, str]:
    return (f"<!-- tokenizer table {section}: written by bench/tokenizer_bench.py -->",
            f"<!-- end of tokenizer table {section} -->")

PY_THROUGHPUT = r"""
import json, sys, tarfile, time
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
texts = []
with tarfile.open(sys.argv[2], "r:*") as tar:
    for m in tar:
        parts = m.name.split("/")
        if m.isfile() and len(parts) == 4 and parts[1] in ("train", "test") and parts[2] in ("pos", "neg"):
            texts.append(tar.extractfile(m).read().decode("utf-8", errors="replace"))
runs = int(sys.argv[3])
def median(v):
    return sorted(v)[len(v) // 2]
par, one, tokens = [], [], 0
for _ in range(runs):
    t = time.perf_counter(); enc = tok.encode_batch(texts); par.append(time.perf_counter() - t)
    tokens = sum(len(e.ids) for e in enc)
for _ in range(runs):
    t = time.perf_counter(); n = sum(len(tok.encode(x).ids) for x in texts); one.append(time.perf_counter() - t)
print(json.dumps({"reviews": len(texts), "tokens": tokens, "parallel_seconds": median(par),
                  "one_thread_seconds": median(one)}))
"""


def python_with_tokenizers() -> str | None:
    for python in (ROOT / ".venv-bench" / "bin" / "python", Path("python3")):
        ok = subprocess.run([str(python), "-c", "import tokenizers"], capture_output=True).returncode == 0
        if ok:
            return str(python)
    return None


def corpus_stats(args, config_path: Path) -> dict:
    cmd = [str(args.coordinator), "data", "--data", str(args.data), "--config", str(config_path), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, RUST_LOG="warn"))
    if out.returncode != 0:
        sys.exit(f"coordinator data failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout)


def time_to_target(run_dir: Path, target: float) -> float | None:
    elapsed = 0.0
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "epoch_seconds" not in record:  # the epoch lines (step and eval lines have a "type")
            continue
        elapsed += record["epoch_seconds"]
        if (record.get("val_accuracy") or 0.0) >= target:
            return elapsed
    return None


def cells(args) -> list[tuple[str, str, dict]]:
    out = [("basic_english", "basic_english (the config's words)", {})]
    for cell in args.cells:
        kind, size = cell
        out.append((f"{kind}_{size}", f"{kind}, vocab_size {size}", {"data.tokenizer": kind, "data.vocab_size": size}))
    return out


def accuracy(args, seeds: list[int], config_name: str) -> list[str]:
    lines = [
        "| config | tokenizer | test acc. mean | min / max | vs basic_english | tokens/review (train) "
        "| test <unk> | train s | tokens/s | s to val >= target |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = tomllib.loads((ROOT / "configs" / f"{config_name}.toml").read_text())
    epochs = base["train"]["epochs"]
    baseline_mean = None
    for name, what, overrides in cells(args):
        runs, reached = [], []
        for seed in seeds:
            config = ablation.row_config(base, overrides, seed, epochs)
            cell = f"{config_name}-{name}"
            summary = ablation.run_one(args, cell, config, seed)
            runs.append(summary)
            reached.append(time_to_target(args.out / cell / f"seed-{seed}", args.target))
            print(f"{cell:28} seed {seed}: test {100 * summary['test_accuracy']:.2f}%  "
                  f"{summary['train_seconds']:.1f} s  {summary['tokens_per_second']:,.0f} tok/s", flush=True)
        stats = corpus_stats(args, args.out / f"{config_name}-{name}" / f"seed-{seeds[0]}.toml")
        tests = [r["test_accuracy"] for r in runs]
        mean = statistics.fmean(tests)
        if baseline_mean is None:
            baseline_mean = mean
        delta = "" if name == "basic_english" else f"{100 * (mean - baseline_mean):+.2f} pt"
        got = [t for t in reached if t is not None]
        to_target = (f"{statistics.fmean(got):.1f} ({len(got)}/{len(reached)} runs)" if got
                     else f"not reached (0/{len(reached)})")
        lines.append(
            f"| {config_name} | {what} | {100 * mean:.2f}% | {100 * min(tests):.2f} / {100 * max(tests):.2f} "
            f"| {delta} | {stats['train']['length']['mean']:.1f} | {100 * stats['test']['unk_rate']:.2f}% "
            f"| {statistics.fmean(r['train_seconds'] for r in runs):.1f} "
            f"| {statistics.fmean(r['tokens_per_second'] for r in runs):,.0f} | {to_target} |"
        )
    return lines


def throughput(args) -> list[str]:
    python = python_with_tokenizers()
    if python is None:
        return ["Throughput not measured: Python `tokenizers` is missing (scripts/tokenizers_env.sh)."]
    # A bpe tokenizer.json of the first vocabulary size, from `coordinator data`.
    size = args.vocab_sizes[-1]
    tok = args.out / f"tokenizer-bpe-{size}.json"
    if not tok.exists():
        args.out.mkdir(parents=True, exist_ok=True)
        cmd = [str(args.coordinator), "data", "--data", str(args.data), "--tokenizer", "bpe",
               "--vocab-size", str(size), "--tokenizer-out", str(tok), "--json"]
        subprocess.run(cmd, check=True, capture_output=True, env=dict(os.environ, RUST_LOG="warn"))
    ours = json.loads(subprocess.run(
        [str(args.tokenize_bench), "--data", str(args.data), "--tokenizer", str(tok), "--runs", str(args.runs)],
        check=True, capture_output=True, text=True).stdout)
    theirs = json.loads(subprocess.run(
        [python, "-c", PY_THROUGHPUT, str(tok), str(args.data), str(args.runs)],
        check=True, capture_output=True, text=True).stdout)
    if theirs["tokens"] != ours["subword_tokens"] or theirs["reviews"] != ours["reviews"]:
        sys.exit(f"ours and Python's tokenizers disagree: {ours} vs {theirs}")
    version = subprocess.run([python, "-c", "import tokenizers; print(tokenizers.__version__)"],
                             capture_output=True, text=True).stdout.strip()
    mb = ours["bytes"] / 1e6
    rate = lambda s: f"{ours['reviews'] / s:,.0f} reviews/s, {mb / s:.1f} MB/s"  # noqa: E731
    return [
        f"Same {ours['reviews']:,} reviews ({mb:.1f} MB), same bpe tokenizer.json (vocab_size {size}), "
        f"{ours['subword_tokens']:,} tokens from both; Python `tokenizers` {version}; median of {args.runs}; "
        f"{ours['threads']} threads; measured one after the other in one run on a machine shared with "
        "other work, so read the ratios:",
        "",
        "| what | ours (s) | Python `tokenizers` (s) | Python / ours |",
        "|---|---|---|---|",
        f"| all threads (ours: reviews in parallel with rayon; Python: `encode_batch`) "
        f"| {ours['subword_parallel_seconds']:.2f} ({rate(ours['subword_parallel_seconds'])}) "
        f"| {theirs['parallel_seconds']:.2f} | {theirs['parallel_seconds'] / ours['subword_parallel_seconds']:.2f} |",
        f"| one thread (`encode` per review) | {ours['subword_one_thread_seconds']:.2f} "
        f"| {theirs['one_thread_seconds']:.2f} "
        f"| {theirs['one_thread_seconds'] / ours['subword_one_thread_seconds']:.2f} |",
        f"| ours, basic_english on the same reviews (tokenize + vocabulary + encode, all threads) "
        f"| {ours['basic_english_parallel_seconds']:.2f} | | |",
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=os.environ.get("IMDB_DATA"))
    p.add_argument("--configs", default="cpu-demo,cpu-best")
    p.add_argument("--cells", default="bpe:8000,bpe:16000",
                   help="subword rows besides basic_english, as TOKENIZER:VOCAB_SIZE (bpe or unigram)")
    p.add_argument("--vocab-sizes", default="16000", help="the bpe vocabulary size(s) of the throughput section")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--target", type=float, default=0.87, help="validation accuracy for the time-to-accuracy column")
    p.add_argument("--sections", default="accuracy,throughput")
    p.add_argument("--runs", type=int, default=3, help="repetitions of each throughput measurement")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "tokenizer-bench")
    p.add_argument("--results", type=Path, default=None, help="markdown file whose tokenizer table to rewrite")
    p.add_argument("--coordinator", type=Path, default=ROOT / "target" / "release" / "coordinator")
    p.add_argument("--worker", type=Path, default=ROOT / "target" / "release" / "worker")
    p.add_argument("--tokenize-bench", type=Path, default=ROOT / "target" / "release" / "tokenize_bench")
    args = p.parse_args()
    args.cells_text = args.cells
    if not args.data:
        sys.exit("give the corpus with --data or IMDB_DATA")
    args.configs = [c for c in args.configs.split(",") if c]
    args.vocab_sizes = [int(v) for v in args.vocab_sizes.split(",") if v]
    args.cells = []
    for cell in args.cells_text.split(",") if args.cells_text else []:
        kind, _, size = cell.partition(":")
        if kind not in ("bpe", "unigram") or not size.isdigit():
            sys.exit(f"--cells: {cell!r} is not TOKENIZER:VOCAB_SIZE with bpe or unigram")
        args.cells.append((kind, int(size)))
    seeds = [int(s) for s in args.seeds.split(",") if s]
    sections = set(args.sections.split(","))
    machine = f"{ablation.cpu_name()} ({os.cpu_count()} cores)"
    parts = []
    if "accuracy" in sections:
        for config_name in args.configs:
            parts.append((config_name, [
                f"Written by `python3 bench/tokenizer_bench.py --configs {config_name} --cells {args.cells_text} "
                f"--seeds {','.join(map(str, seeds))} --sections accuracy` on {machine}, "
                f"`coordinator --workers {args.workers}`; target validation accuracy {args.target}.", "",
            ] + accuracy(args, seeds, config_name)))
    if "throughput" in sections:
        parts.append(("throughput", [
            "## Subword tokenization throughput: ours against Python `tokenizers` (issue 21)", "",
            f"Written by `python3 bench/tokenizer_bench.py --vocab-sizes {args.vocab_sizes[-1]} "
            f"--sections throughput` on {machine}.", "",
        ] + throughput(args)))
    for section, lines in parts:
        begin, end = markers(section)
        text = "\n".join([begin, ""] + lines + ["", end])
        if args.results:
            ablation.replace_section(args.results, text, begin, end)
        print(text)


if __name__ == "__main__":
    main()
