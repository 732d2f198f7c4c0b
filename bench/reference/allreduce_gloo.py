"""gloo's all-reduce of the 51 MB gradient buffer (12,887,552 f32 = 100,684 x 128, the full
vocab's embedding) among N processes on 127.0.0.1: the reference for our TCP ring.

    python bench/reference/allreduce_gloo.py --world 2 [--iters 10 --warmup 2]

Processes are started with torch.multiprocessing (spawn); each call is preceded by a barrier
so that every rank starts together. Prints one JSON object with the slowest rank's median
seconds per call (as our ring_bench reports it), the bus bandwidth (2 (N-1)/N x bytes / time, as nccl-tests
reports it) and, for scale, the median time of a plain copy of the same buffer.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DEFAULT_NUMEL = 100_684 * 128  # 12,887,552 floats, 51.55 MB


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, port: int, numel: int, iters: int, warmup: int, queue) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        buf = torch.full((numel,), float(rank + 1), dtype=torch.float32)
        times = []
        for i in range(warmup + iters):
            dist.barrier()
            t = time.perf_counter()
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            elapsed = time.perf_counter() - t
            if i >= warmup:
                times.append(elapsed)
        # The sum of (rank + 1) over ranks, scaled by world^calls: check one element.
        expected = float(world * (world + 1) // 2) * float(world) ** (warmup + iters - 1)
        ok = abs(buf[0].item() - expected) <= 1e-3 * expected
        copy = None
        if rank == 0:
            src = torch.ones(numel)
            dst = torch.empty(numel)
            copies = []
            for _ in range(max(iters, 5)):
                t = time.perf_counter()
                dst.copy_(src)
                copies.append(time.perf_counter() - t)
            copy = statistics.median(copies)
        queue.put({"rank": rank, "times": times, "copy": copy, "correct": ok})
    finally:
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=2, help="number of processes")
    p.add_argument("--numel", type=int, default=DEFAULT_NUMEL, help="f32 elements in the buffer")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()
    if args.world < 2 or args.numel < 1 or args.iters < 1 or args.warmup < 0:
        p.error("--world must be at least 2, --numel and --iters at least 1, --warmup at least 0")
    # Power-of-world growth of the values would overflow f32 over many calls: keep it finite.
    if float(args.world) ** (args.iters + args.warmup) > 1e30:
        p.error("too many iterations for this world size (the summed values would overflow f32)")
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(worker, args=(args.world, free_port(), args.numel, args.iters, args.warmup, queue),
                       nprocs=args.world, join=True, start_method="spawn")
    ranks = sorted((queue.get() for _ in range(args.world)), key=lambda r: r["rank"])
    medians = [statistics.median(r["times"]) for r in ranks]
    median = max(medians)  # the slowest rank's median, as our ring_bench reports
    copy = ranks[0]["copy"]
    size = args.numel * 4
    print(json.dumps({
        "world": args.world, "bytes": size, "iters": args.iters, "seconds_median": median,
        "rank_medians": medians, "bus_gbps": 2 * (args.world - 1) / args.world * size / median / 1e9,
        "copy_seconds_median": copy, "ratio_to_copy": median / copy, "correct": all(r["correct"] for r in ranks),
    }))


if __name__ == "__main__":
    main()
