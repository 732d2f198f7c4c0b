"""The tutorial's model under DistributedDataParallel: the reference for our multi-process runs.

    torchrun --nproc-per-node 2 bench/reference/ddp.py --data $IMDB_DATA --threads 1 \
        --embed-dim 64 --hidden 128 --layers 1 --max-len 256 --train-subset 8000 --max-steps 200 --no-eval

gloo on CPU, NCCL with --device cuda (one GPU per process, LOCAL_RANK). Each rank reads
the corpus itself (as a DDP user's script does; the encoded corpus is cached) and takes its
part of every epoch from a DistributedSampler (shuffled, seeded, drop_last so that every
rank runs the same number of steps). --batch-size is per process, as ours. Validation and
test are sharded across ranks and summed. Rank 0 prints the JSON lines and the summary;
tokens_per_second is the sum over ranks of non-pad training tokens per second of training.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_common_args, check_args  # noqa: E402
from tutorial import train  # noqa: E402


class Distributed:
    def __init__(self, device: str):
        backend = "nccl" if device == "cuda" else "gloo"
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")

    def epoch_indices(self, n: int, seed: int, epoch: int) -> list[int]:
        sampler = DistributedSampler(range(n), num_replicas=self.world_size, rank=self.rank,
                                     shuffle=True, seed=seed, drop_last=True)
        sampler.set_epoch(epoch)
        return list(sampler)

    def eval_indices(self, n: int) -> list[int]:
        return list(range(self.rank, n, self.world_size))

    def _reduce(self, values, op) -> list[float]:
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op)
        return t.tolist()

    def sum(self, *values: float) -> list[float]:
        return self._reduce(values, dist.ReduceOp.SUM)

    def max(self, value: float) -> float:
        return self._reduce([value], dist.ReduceOp.MAX)[0]

    def wrap(self, model: nn.Module) -> nn.Module:
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    args = p.parse_args()
    check_args(p, args)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        p.error("launch with torchrun --nproc-per-node N (RANK and WORLD_SIZE are not set)")
    ctx = Distributed(args.device)
    try:
        # Reading the corpus on every rank at once is slow on a small machine: rank 0 fills
        # the cache first, the others then load it.
        if ctx.rank == 0 and args.cache_dir:
            from common import load_corpus
            load_corpus(args.data, args.min_freq, args.max_vocab, args.cache_dir)
        dist.barrier()
        train(args, ctx, system="pytorch-ddp")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
