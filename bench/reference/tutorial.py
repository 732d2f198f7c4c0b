"""The tutorial's IMDB LSTM recipe in plain PyTorch: the reference our trainer is compared with.

    python bench/reference/tutorial.py --data $IMDB_DATA                       # the tutorial, 5 epochs
    python bench/reference/tutorial.py --data $IMDB_DATA --embed-dim 64 --hidden 128 --layers 1 \
        --max-len 256 --train-subset 8000 --max-steps 200 --no-eval --threads 2  # a throughput run
    python bench/reference/tutorial.py ... --bucketed                          # like for like with ours

As the tutorial writes it: shuffled, unsorted batches of 32, padded and packed with
pack_padded_sequence(enforce_sorted=False), Embedding(128) -> LSTM(256, 2 layers) ->
Dropout(0.5) -> Linear(2), CrossEntropy, Adam(1e-3). `--bucketed` forms batches the way our
trainer does (length-sorted pools of 100 batches, batch order shuffled) for a like-for-like
comparison.

Prints one JSON line per evaluation and a final JSON summary (stdout); logs go to stderr.
tokens_per_second counts the non-pad tokens of the training batches per second of training
(evaluation excluded, batching and collation included).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    LSTMClassifier, add_common_args, check_args, collate, emit, evaluate, job_splits, load_corpus,
    log, plan_batches, sync, time_to_marks,
)


class SingleProcess:
    """What changes between one process and DDP: the sample order, the reductions, who prints."""

    rank, world_size = 0, 1

    def epoch_indices(self, n: int, seed: int, epoch: int) -> list[int]:
        # DataLoader(shuffle=True): a fresh permutation every epoch.
        g = torch.Generator().manual_seed(seed * 1000 + epoch)
        return torch.randperm(n, generator=g).tolist()

    def eval_indices(self, n: int) -> list[int]:
        return list(range(n))

    def sum(self, *values: float) -> list[float]:
        return list(values)

    def max(self, value: float) -> float:
        return value

    def wrap(self, model: nn.Module) -> nn.Module:
        return model


class Stopwatch:
    """Training time only: stopped around evaluations; synchronizes a GPU at each edge."""

    def __init__(self, device: torch.device):
        self.device, self.total, self._since = device, 0.0, None

    def start(self) -> None:
        sync(self.device)
        self._since = time.perf_counter()

    def stop(self) -> None:
        if self._since is not None:
            sync(self.device)
            self.total += time.perf_counter() - self._since
            self._since = None


def train(args, dist=None, system: str = "pytorch-tutorial") -> dict | None:
    """The training loop; `dist` is SingleProcess() or ddp.py's Distributed."""
    dist = dist or SingleProcess()
    torch.manual_seed(args.seed)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if args.device == "cuda" else torch.device("cpu")
    say = log if dist.rank == 0 else (lambda _msg: None)

    corpus = load_corpus(args.data, args.min_freq, args.max_vocab, args.cache_dir or None, log=say)
    train_split, val_split, test_split = job_splits(corpus, args)
    say(f"reference: vocab {len(corpus.vocab)}, train {len(train_split)}, val {len(val_split)}, "
        f"test {len(test_split)}, world size {dist.world_size}, threads {torch.get_num_threads()}")

    model = dist.wrap(LSTMClassifier(len(corpus.vocab), args.embed_dim, args.hidden, args.layers,
                                     args.dropout).to(device))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    criterion = nn.CrossEntropyLoss()
    batch_rng = random.Random(args.seed * 7919)  # the same on every rank: equal batch counts

    def reached(record: dict) -> bool:
        return args.target_val_accuracy > 0 and record["val_accuracy"] >= args.target_val_accuracy

    def validate(epoch: int, step: int) -> dict:
        c, n, loss = dist.sum(*evaluate(model, val_split, dist.eval_indices(len(val_split)), device))
        record = {"type": "eval", "split": "val", "epoch": epoch, "step": step,
                  "val_accuracy": c / max(n, 1), "val_loss": loss / max(n, 1),
                  "train_seconds": dist.max(watch.total), "wall_seconds": time.perf_counter() - wall}
        if args.test_each_eval:
            c, n, _ = dist.sum(*evaluate(model, test_split, dist.eval_indices(len(test_split)), device))
            record["test_accuracy"] = c / max(n, 1)
        if dist.rank == 0:
            emit(record)
        return record

    step, train_tokens, loss_sum, loss_n = 0, 0, 0.0, 0
    evals: list[dict] = []
    watch = Stopwatch(device)
    wall = time.perf_counter()
    stop = False
    epochs_run = 0
    for epoch in range(args.epochs):
        model.train()
        indices = dist.epoch_indices(len(train_split), args.seed, epoch)
        batches = plan_batches(train_split, indices, args.batch_size, args.bucketed, args.bucket_pool, batch_rng)
        watch.start()
        for batch in batches:
            tokens, lengths, labels = collate(train_split, batch)
            tokens, labels = tokens.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            optimizer.zero_grad()
            loss = criterion(model(tokens, lengths), labels)
            loss.backward()
            optimizer.step()
            step += 1
            train_tokens += int(lengths.sum())
            if step % 50 == 0:  # .item() syncs a GPU: only now and then
                loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
            if args.max_steps > 0 and step >= args.max_steps:
                stop = True
                break
            if args.eval_every_steps > 0 and step % args.eval_every_steps == 0 and not args.no_eval:
                watch.stop()
                evals.append(validate(epoch + 1, step))
                if reached(evals[-1]):
                    stop = True
                    break
                watch.start()
        watch.stop()
        epochs_run = epoch + 1
        if not args.no_eval and not (evals and evals[-1]["step"] == step):
            evals.append(validate(epoch + 1, step))
            stop = stop or reached(evals[-1])
        if stop:
            break

    test_accuracy = None
    if not args.no_eval:
        c, n, _ = dist.sum(*evaluate(model, test_split, dist.eval_indices(len(test_split)), device))
        test_accuracy = c / max(n, 1)
    (total_tokens,) = dist.sum(float(train_tokens))
    seconds = dist.max(watch.total)
    summary = {
        "type": "summary", "system": system, "mode": "bucketed" if args.bucketed else "tutorial",
        "world_size": dist.world_size, "device": str(device), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "epochs": epochs_run, "steps": step,
        "train_tokens": int(total_tokens), "train_seconds": seconds,
        "tokens_per_second": total_tokens / seconds if seconds > 0 else 0.0,
        "seconds_per_step": seconds / step if step else None,
        "mean_sampled_train_loss": loss_sum / loss_n if loss_n else None,
        "test_accuracy": test_accuracy,
        "best_val_accuracy": max((e["val_accuracy"] for e in evals), default=None),
        "time_to_val_accuracy": time_to_marks(evals),
        "evals": [{k: e[k] for k in ("epoch", "step", "val_accuracy", "test_accuracy", "train_seconds", "wall_seconds")
                   if k in e} for e in evals],
        "wall_seconds": time.perf_counter() - wall,
        "config": {k: v for k, v in vars(args).items() if k not in ("data", "cache_dir")},
    }
    if dist.rank == 0:
        emit(summary)
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    args = p.parse_args()
    check_args(p, args)
    train(args)


if __name__ == "__main__":
    main()
