#!/usr/bin/env python3
"""Accuracy ablation: one row per model or recipe change on top of the CPU baseline, each
trained with 3 seeds at the same budget, written as a table into bench/ACCURACY.md.

    cargo build --release --bins
    python3 bench/ablation.py --data aclImdb_v1.tar.gz                 # every row, 3 seeds
    python3 bench/ablation.py --data ... --rows baseline,bidirectional --seeds 1,2
    python3 bench/ablation.py --data ... --results bench/ACCURACY.md    # rewrite its table

Every run is `coordinator --workers 2` on the base config (bench/ablation-base.toml, the
cpu-demo recipe as it was before the ablation) with one
change and `train.seed` set, for `--epochs` epochs. The coordinator keeps the model of the
epoch with the best validation accuracy and tests it once; choose rows by the validation
column, the test column is reported, never used to choose. A run whose summary.json is
already in its folder (same config) is not trained again, so an interrupted ablation goes
on where it stopped. Only the standard library is needed (Python 3.11+).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN = "<!-- ablation table: written by bench/ablation.py -->"
END = "<!-- end of ablation table -->"

# (row name, what changes, overrides of the base config as {"section.field": value}).
ROWS: list[tuple[str, str, dict]] = [
    ("baseline", "the baseline (bench/ablation-base.toml)", {}),
    ("head_last", "head = last (no max/mean pooling)", {"model.head": "last"}),
    ("truncation_head", "truncation = head (first 400 tokens, not head+tail)", {"data.truncation": "head"}),
    ("max_len_800", "max_len = 800", {"data.max_len": 800}),
    ("vocab_50k", "max_vocab = 50000", {"data.max_vocab": 50000}),
    ("full_bptt", "bptt = 0 (full BPTT, not windows of 100)", {"train.bptt": 0}),
    ("bidirectional", "bidirectional LSTM (with bptt = 0: one window)", {"model.bidirectional": True, "train.bptt": 0}),
    ("embedding_dropout", "embedding (word) dropout 0.1", {"model.embedding_dropout": 0.1}),
    ("variational_dropout", "variational dropout 0.3 on the LSTM input", {"model.variational_dropout": 0.3}),
    ("weight_drop", "DropConnect 0.3 on weight_hh", {"model.weight_drop": 0.3}),
    ("adamw", "AdamW, weight decay 0.01 (decoupled)", {"train.optimizer": "adamw", "train.weight_decay": 0.01}),
    ("label_smoothing", "label smoothing 0.1", {"train.label_smoothing": 0.1}),
    ("cosine", "cosine schedule (not linear)", {"train.schedule": "cosine"}),
    ("hidden_128", "embed_dim = hidden = 128", {"model.embed_dim": 128, "model.hidden": 128}),
]


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, float):
        return repr(v)
    return str(v)


def to_toml(config: dict) -> str:
    """The subset of TOML that job configs use: sections of scalars."""
    out = []
    for section, fields in config.items():
        out.append(f"[{section}]")
        out.extend(f"{k} = {toml_value(v)}" for k, v in fields.items())
        out.append("")
    return "\n".join(out)


def row_config(base: dict, overrides: dict, seed: int, epochs: int) -> dict:
    config = json.loads(json.dumps(base))
    # A whole-config row (--extra) brings its own epochs; the change rows use the budget.
    for key, value in {"train.epochs": epochs, **overrides, "train.seed": seed}.items():
        section, field = key.split(".")
        config.setdefault(section, {})[field] = value
    # The budget is fixed: never stop a row early.
    config["train"]["early_stopping_patience"] = 0
    return config


def run_one(args: argparse.Namespace, name: str, config: dict, seed: int) -> dict:
    out = args.out / name / f"seed-{seed}"
    text = to_toml(config)
    config_path = out.with_suffix(".toml")
    done = out / "summary.json"
    if done.exists() and config_path.exists() and config_path.read_text() == text:
        return json.loads(done.read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(text)
    if out.exists():
        subprocess.run(["rm", "-rf", str(out)], check=True)
    cmd = [
        str(args.coordinator), "--workers", str(args.workers), "--config", str(config_path),
        "--out", str(out), "--worker-bin", str(args.worker), "--data", str(args.data),
    ]
    env = dict(os.environ, RUST_LOG="warn")
    for var in ("TRAINER_CONFIG", "TRAINER_JOB_SECRET", "COORDINATOR_ADDR"):
        env.pop(var, None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{name} seed {seed} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(done.read_text())


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def table(results: list[dict], seeds: list[int]) -> list[str]:
    base = next((r for r in results if r["name"] == "baseline"), None)
    lines = [
        "| change | test acc. mean | test min / max | vs baseline | best val. acc. mean | train s | tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        tests = [s["test_accuracy"] for s in r["runs"]]
        vals = [s["best_val_accuracy"] or 0.0 for s in r["runs"]]
        mean = statistics.fmean(tests)
        delta = "" if base is None or r is base else (
            f"{100 * (mean - statistics.fmean(s['test_accuracy'] for s in base['runs'])):+.2f} pt")
        lines.append(
            f"| {r['what']} | {100 * mean:.2f}% | {100 * min(tests):.2f} / {100 * max(tests):.2f} | {delta} "
            f"| {100 * statistics.fmean(vals):.2f}% "
            f"| {statistics.fmean(s['train_seconds'] for s in r['runs']):.1f} "
            f"| {statistics.fmean(s['tokens_per_second'] for s in r['runs']):,.0f} |"
        )
    return lines


def write_results(args: argparse.Namespace, results: list[dict], seeds: list[int]) -> str:
    section = [
        BEGIN,
        "",
        f"Written {datetime.date.today()} by `python3 bench/ablation.py --epochs {args.epochs} "
        f"--seeds {','.join(map(str, seeds))}` on {cpu_name()} ({os.cpu_count()} cores), "
        f"`coordinator --workers {args.workers}`, base config `{args.base.relative_to(ROOT)}`, "
        f"{args.epochs} epochs per run. Test accuracy is the model kept by validation accuracy; "
        "seconds are training only (no data loading or evaluation).",
        "",
        *table(results, seeds),
        "",
        END,
    ]
    text = "\n".join(section)
    if args.results:
        replace_section(args.results, text, BEGIN, END)
    return text


def replace_section(path, text, begin, end):
    """Puts `text` (which starts with `begin` and ends with `end`) in place of the section
    between those markers in the markdown file at `path`, or appends it when there is none."""
    old = path.read_text() if path.exists() else ""
    if begin in old and end in old:
        new = old[: old.index(begin)] + text + old[old.index(end) + len(end):]
    else:
        new = old + ("\n" if old else "") + text + "\n"
    path.write_text(new)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=os.environ.get("IMDB_DATA"),
                   help="the corpus tarball (default: $IMDB_DATA)")
    p.add_argument("--base", type=Path, default=ROOT / "bench" / "ablation-base.toml")
    p.add_argument("--epochs", type=int, default=6, help="the fixed budget of every run")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--rows", default="", help="comma-separated row names (default: all)")
    p.add_argument("--extra", action="append", default=[], metavar="NAME=CONFIG",
                   help="also a row for a whole config file, trained with its own epochs")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "ablation")
    p.add_argument("--results", type=Path, default=None, help="markdown file whose table to rewrite")
    p.add_argument("--coordinator", type=Path, default=ROOT / "target" / "release" / "coordinator")
    p.add_argument("--worker", type=Path, default=ROOT / "target" / "release" / "worker")
    p.add_argument("--list", action="store_true", help="print the rows and exit")
    args = p.parse_args()
    if args.list:
        for name, what, overrides in ROWS:
            print(f"{name:22} {what}  {overrides}")
        return
    if not args.data:
        sys.exit("give the corpus with --data or IMDB_DATA")
    for binary in (args.coordinator, args.worker):
        if not binary.exists():
            sys.exit(f"{binary} is missing: run `cargo build --release --bins` first")
    args.base = args.base.resolve()
    base = tomllib.loads(args.base.read_text())
    seeds = [int(s) for s in args.seeds.split(",") if s]
    wanted = {r for r in args.rows.split(",") if r}
    unknown = wanted - {name for name, _, _ in ROWS}
    if unknown:
        sys.exit(f"unknown rows {sorted(unknown)}; --list shows them")
    rows = [r for r in ROWS if not wanted or r[0] in wanted]
    for extra in args.extra:
        name, _, path = extra.partition("=")
        whole = tomllib.loads(Path(path).read_text())
        overrides = {f"{s}.{k}": v for s, fields in whole.items() for k, v in fields.items()}
        rows.append((name, f"`{path}` as a whole", overrides))
    results = []
    for name, what, overrides in rows:
        runs = []
        for seed in seeds:
            summary = run_one(args, name, row_config(base, overrides, seed, args.epochs), seed)
            runs.append(summary)
            print(f"{name:22} seed {seed}: test {100 * summary['test_accuracy']:.2f}%  "
                  f"best val {100 * (summary['best_val_accuracy'] or 0):.2f}%  "
                  f"{summary['train_seconds']:.1f} s", flush=True)
        results.append({"name": name, "what": what, "overrides": overrides, "runs": runs})
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(write_results(args, results, seeds))


if __name__ == "__main__":
    main()
