"""Shared parts of the PyTorch reference: corpus, tokenizer, vocab, splits, batches, model.

This is the tutorial's recipe written plainly, so that the benchmark compares our Rust system
with what a PyTorch user would write: torchtext's `basic_english` rules (reimplemented,
since torchtext does not support current PyTorch), a vocab from the train split with
`<pad>` and `<unk>`, Embedding -> LSTM on packed sequences -> Dropout -> Linear(2).

Labels come from the folder names (pos = 1, neg = 0); the tutorial's `label == 'pos'` bug
(all labels 0 with newer torchtext) is not reproduced.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import random
import re
import sys
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_sequence

PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1

# torchtext.data.utils._basic_english_normalize, verbatim: lowercase, these twelve
# substitutions in order, then split on whitespace.
_PATTERNS = [r"\'", r"\"", r"\.", r"<br \/>", r",", r"\(", r"\)", r"\!", r"\?", r"\;", r"\:", r"\s+"]
_REPLACEMENTS = [" '  ", "", " . ", " ", " , ", " ( ", " ) ", " ! ", " ? ", " ", " ", " "]
_PATTERNS_DICT = [(re.compile(p), r) for p, r in zip(_PATTERNS, _REPLACEMENTS)]


def basic_english(line: str) -> list[str]:
    line = line.lower()
    for pattern_re, replaced_str in _PATTERNS_DICT:
        line = pattern_re.sub(replaced_str, line)
    return line.split()


# ---------------------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------------------

_ENTRY = re.compile(r"^(?:\./)?aclImdb/(train|test)/(pos|neg)/(\d+)_(\d+)\.txt$")


@dataclass
class RawCorpus:
    """Reviews per split as (label, id, text), sorted by (label, id) as ours are."""

    train: list[tuple[int, int, str]] = field(default_factory=list)
    test: list[tuple[int, int, str]] = field(default_factory=list)


def read_corpus(path: str | os.PathLike) -> RawCorpus:
    """Reads `aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt` from the tarball (or an
    extracted aclImdb/ folder)."""
    path = Path(path)
    corpus = RawCorpus()

    def add(name: str, data: bytes) -> None:
        m = _ENTRY.match(name)
        if not m:
            return
        split, label, review_id = m.group(1), 1 if m.group(2) == "pos" else 0, int(m.group(3))
        getattr(corpus, split).append((label, review_id, data.decode("utf-8", errors="replace")))

    if path.is_dir():
        root = path if path.name == "aclImdb" else path / "aclImdb"
        for file in sorted(root.glob("*/*/*.txt")):
            add("aclImdb/" + file.relative_to(root).as_posix(), file.read_bytes())
    elif path.is_file():
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if member.isfile() and _ENTRY.match(member.name):
                    f = tar.extractfile(member)
                    if f is not None:
                        add(member.name, f.read())
    else:
        raise SystemExit(f"--data {path}: no such file or folder (give the IMDB tarball)")
    for split in ("train", "test"):
        reviews = getattr(corpus, split)
        reviews.sort(key=lambda r: (r[0], r[1]))
        labels = {r[0] for r in reviews}
        if labels != {0, 1}:
            raise SystemExit(f"--data {path}: the {split} split lacks pos or neg reviews")
    return corpus


@dataclass
class EncodedCorpus:
    vocab: list[str]  # id -> word; 0 = <pad>, 1 = <unk>
    train_ids: list[list[int]]
    train_labels: list[int]
    test_ids: list[list[int]]
    test_labels: list[int]


def build_vocab(tokenized: list[list[str]], min_freq: int = 1, max_vocab: int = 0) -> list[str]:
    """Words of the train split seen at least `min_freq` times, by frequency then word
    (torchtext's build_vocab_from_iterator order), after the specials."""
    counter: Counter[str] = Counter()
    for tokens in tokenized:
        counter.update(tokens)
    kept = sorted(((w, c) for w, c in counter.items() if c >= min_freq), key=lambda x: (-x[1], x[0]))
    if max_vocab > 0:
        kept = kept[:max_vocab]
    return [PAD, UNK] + [w for w, _ in kept]


def encode_corpus(raw: RawCorpus, min_freq: int = 1, max_vocab: int = 0) -> tuple[EncodedCorpus, dict]:
    """Tokenize, build the vocab from train, encode both splits. Returns the per-stage times."""
    stages = {}
    t = time.perf_counter()
    train_tokens = [basic_english(text) for _, _, text in raw.train]
    test_tokens = [basic_english(text) for _, _, text in raw.test]
    stages["tokenize"] = time.perf_counter() - t
    t = time.perf_counter()
    vocab = build_vocab(train_tokens, min_freq, max_vocab)
    stoi = {w: i for i, w in enumerate(vocab)}
    stages["vocab"] = time.perf_counter() - t
    t = time.perf_counter()
    get = stoi.get
    train_ids = [[get(w, UNK_ID) for w in tokens] for tokens in train_tokens]
    test_ids = [[get(w, UNK_ID) for w in tokens] for tokens in test_tokens]
    stages["encode"] = time.perf_counter() - t
    return (
        EncodedCorpus(vocab, train_ids, [r[0] for r in raw.train], test_ids, [r[0] for r in raw.test]),
        stages,
    )


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "imdb-ddp-reference"


def load_corpus(data: str, min_freq: int, max_vocab: int, cache_dir: str | None, log=print) -> EncodedCorpus:
    """The encoded corpus, from a pickle cache keyed by the file's size and mtime and the
    vocab settings when there is one (throughput runs need not re-tokenize every time;
    the pipeline benchmark times the uncached path)."""
    path = Path(data)
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{min_freq}|{max_vocab}|v1".encode()).hexdigest()[:16]
    cache = Path(cache_dir) / f"encoded-{key}.pkl" if cache_dir else None
    if cache is not None and cache.is_file():
        with open(cache, "rb") as f:
            return pickle.load(f)
    t = time.perf_counter()
    encoded, _ = encode_corpus(read_corpus(path), min_freq, max_vocab)
    log(f"reference: corpus loaded and encoded in {time.perf_counter() - t:.1f} s")
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            pickle.dump(encoded, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, cache)
    return encoded


# ---------------------------------------------------------------------------------------
# Splits (same sizes and rules as ours; the random draws differ, the RNGs being different)
# ---------------------------------------------------------------------------------------


def balanced_subset(labels: list[int], k: int, seed: int) -> list[int]:
    """A seeded subset of k indices with both labels as equal as possible (sorted)."""
    if k <= 0 or k >= len(labels):
        return list(range(len(labels)))
    rng = random.Random(seed * 1000003 + 3)
    groups = [[i for i, l in enumerate(labels) if l == 0], [i for i, l in enumerate(labels) if l == 1]]
    for g in groups:
        rng.shuffle(g)
    take_pos = min(k - k // 2, len(groups[1]))
    take_neg = min(k - take_pos, len(groups[0]))
    take_pos = min(k - take_neg, len(groups[1]))
    return sorted(groups[0][:take_neg] + groups[1][:take_pos])


def train_val_split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    order = list(range(n))
    random.Random(seed * 1000003 + 2).shuffle(order)
    n_val = min(n, round(n * fraction))
    return sorted(order[n_val:]), sorted(order[:n_val])


@dataclass
class Split:
    ids: list[list[int]]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.ids)


def truncate(ids: list[int], n: int, mode: str) -> list[int]:
    """A review cut to at most `n` tokens (0: whole) as ours are: its head, its tail, or
    both (the first ceil(n/2) and the last floor(n/2) tokens); never empty."""
    if 0 < n < len(ids):
        if mode == "head":
            ids = ids[:n]
        elif mode == "tail":
            ids = ids[-n:]
        else:
            ids = ids[: (n + 1) // 2] + (ids[len(ids) - n // 2:] if n // 2 else [])
    return ids if ids else [UNK_ID]  # a review needs one step


def job_splits(corpus: EncodedCorpus, args) -> tuple[Split, Split, Split]:
    """Train subset -> validation hold-out -> test subset, each truncated to --max-len."""

    def cut(ids: list[int]) -> list[int]:
        return truncate(ids, args.max_len, args.truncation)

    subset = balanced_subset(corpus.train_labels, args.train_subset, args.seed)
    train_pos, val_pos = train_val_split(len(subset), args.val_fraction, args.seed)
    pick = lambda positions: Split([cut(corpus.train_ids[subset[p]]) for p in positions],
                                   [corpus.train_labels[subset[p]] for p in positions])
    test = balanced_subset(corpus.test_labels, args.test_subset, args.seed)
    return pick(train_pos), pick(val_pos), Split([cut(corpus.test_ids[i]) for i in test],
                                                  [corpus.test_labels[i] for i in test])


# ---------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------


def plan_batches(split: Split, indices: list[int], batch_size: int, bucketed: bool, pool: int,
                 rng: random.Random) -> list[list[int]]:
    """`indices` already shuffled. Unsorted: consecutive chunks (the tutorial's shuffled
    DataLoader). Bucketed (like ours): sort by length inside pools of `pool` batches, cut
    into batches, then shuffle the order of the batches. A last partial batch is kept."""
    if not bucketed:
        return [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    batches = []
    span = batch_size * max(1, pool)
    for start in range(0, len(indices), span):
        chunk = sorted(indices[start:start + span], key=lambda i: -len(split.ids[i]))
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def collate(split: Split, batch: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens batch x max_len padded with <pad>, lengths, labels), as the tutorial's
    collate_fn with pad_sequence."""
    seqs = [torch.tensor(split.ids[i], dtype=torch.long) for i in batch]
    tokens = pad_sequence(seqs, batch_first=True, padding_value=PAD_ID)
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    labels = torch.tensor([split.labels[i] for i in batch], dtype=torch.long)
    return tokens, lengths, labels


# ---------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------


class LSTMClassifier(nn.Module):
    """Embedding -> LSTM (packed, batch_first) -> Dropout on the last layer's final hidden
    state -> Linear(2)."""

    def __init__(self, vocab_size: int, embed_dim: int, hidden: int, layers: int, dropout: float):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.lstm = nn.LSTM(embed_dim, hidden, num_layers=layers, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden, 2)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        embedded = self.embedding(tokens)
        packed = pack_padded_sequence(embedded, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, (hidden, _) = self.lstm(packed)
        return self.fc(self.dropout(hidden[-1]))


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, indices: list[int], device: torch.device,
             batch_size: int = 256) -> tuple[int, int, float]:
    """(correct, total, summed loss) over `indices`; batches sorted by length for speed
    (evaluation is not part of any throughput figure)."""
    was_training = model.training
    model.eval()
    order = sorted(indices, key=lambda i: len(split.ids[i]))
    correct, total, loss_sum = 0, 0, 0.0
    for start in range(0, len(order), batch_size):
        tokens, lengths, labels = collate(split, order[start:start + batch_size])
        tokens, labels = tokens.to(device), labels.to(device)
        logits = model(tokens, lengths)
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
        total += len(labels)
    model.train(was_training)
    return correct, total, loss_sum


# ---------------------------------------------------------------------------------------
# CLI and reporting
# ---------------------------------------------------------------------------------------

ACCURACY_MARKS = (0.70, 0.75, 0.80, 0.85, 0.88, 0.90)


def add_common_args(p: argparse.ArgumentParser) -> None:
    env = os.environ.get
    p.add_argument("--data", default=env("IMDB_DATA"), help="the IMDB tarball (default: $IMDB_DATA)")
    p.add_argument("--cache-dir", default=env("REFERENCE_CACHE_DIR", str(default_cache_dir())),
                   help="pickle cache of the encoded corpus ('' disables)")
    p.add_argument("--min-freq", type=int, default=1)
    p.add_argument("--max-vocab", type=int, default=0, help="0: all words")
    p.add_argument("--embed-dim", type=int, default=128)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--max-len", type=int, default=0, help="cut reviews to N tokens (0: whole reviews)")
    p.add_argument("--truncation", default="head", choices=["head", "tail", "both"],
                   help="which tokens --max-len keeps: the first, the last, or half of each")
    p.add_argument("--train-subset", type=int, default=0, help="label-balanced, seeded (0: all)")
    p.add_argument("--test-subset", type=int, default=0, help="label-balanced, seeded (0: all)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after N steps in all (throughput runs)")
    p.add_argument("--bucketed", action="store_true",
                   help="like-for-like mode: sort by length in pools of --bucket-pool batches, then shuffle batches")
    p.add_argument("--bucket-pool", type=int, default=100)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--eval-every-steps", type=int, default=0,
                   help="also evaluate on validation every N steps (0: at epoch ends only)")
    p.add_argument("--target-val-accuracy", type=float, default=0.0,
                   help="stop once validation accuracy reaches this (time-to-accuracy runs)")
    p.add_argument("--no-eval", action="store_true", help="skip validation and test (throughput runs)")
    p.add_argument("--test-each-eval", action="store_true",
                   help="also evaluate the test split at every evaluation (time to a test accuracy)")


def check_args(p: argparse.ArgumentParser, args) -> None:
    if not args.data:
        p.error("--data (or $IMDB_DATA) is required")
    for name in ("embed_dim", "hidden", "layers", "batch_size", "epochs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= args.val_fraction < 1:
        p.error("--val-fraction must be in [0, 1)")
    if not 0 <= args.dropout < 1:
        p.error("--dropout must be in [0, 1)")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device (or a CPU-only torch install)")


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def time_to_marks(evals: list[dict]) -> dict:
    """Training seconds (evaluation excluded) at which validation accuracy first reached
    each mark."""
    out = {}
    for mark in ACCURACY_MARKS:
        hit = next((e for e in evals if e["val_accuracy"] >= mark), None)
        out[f"{mark:.2f}"] = None if hit is None else hit["train_seconds"]
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
