#!/usr/bin/env python3
"""Elastic chaos (issue 22): random kills and random joins of external workers in a
`--workers 2:4` job, and whether every job completes without hanging and how far its test
accuracy lands from the fixed-size run's. Run as `bench/chaos.py --elastic` (which calls
this) or directly:

    cargo build --release --bins
    python3 bench/chaos.py --elastic --data aclImdb_v1.tar.gz --trials 20 --seed 1 --results bench/RESULTS.md

Each trial runs the small job below (JOB: 1,600 training reviews, a 16-wide LSTM with
concat pooling, dropout off, a global batch of 32: 50 steps per epoch, 8 epochs, a checkpoint
every 10 steps; heartbeat and ring timeouts of 15 s), which learns to about 80% in seconds, under
`coordinator --external-workers --workers 2:4 --rendezvous-wait 2 --rejoin-timeout 5`,
starting 2 to 4 `worker join` processes (one libtorch thread each, the job's train.threads).
Once the replicas are first ready, 1 to 3 events come at random times within 70% of the
fixed-size run's wall time, so that they land while the job trains, however fast the machine
is (a fixed window outlived the job once workers ran at one thread each, and most events never
came): a random live worker SIGKILLed (only while more than
2 live, so that the job can always go on) or a new worker started (only while fewer than 4
live). A trial completes when the coordinator exits 0. It hangs when the coordinator writes no
line for --stall-seconds (its progress and checkpoint lines come every few seconds while it
works), and is cut off, counted apart from hangs, when it is still working after
--trial-timeout (4 workers on 2 cores are slow, not stuck). The accuracy gap is against `coordinator --workers 4` (local workers, the
same config and global batch, no faults); with dropout off the only differences are float
rounding at other world sizes and the steps redone after a loss.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
JOB = """
[data]
min_freq = 2
max_vocab = 5000
max_len = 200
truncation = "both"
val_fraction = 0.2
train_subset = 2000
test_subset = 400

[model]
embed_dim = 16
hidden = 16
layers = 1
dropout = 0.0
head = "concat_pool"

[train]
epochs = 8
lr = 0.02
batch_order = "bucketed"
bucket_pool = 4
bptt = 0
seed = 5
device = "cpu"
log_every = 10
eval_batch_size = 100
threads = 1
"""
SECRET = "chaos-elastic-job-secret"
FLAGS = ["--checkpoint-every-steps", "10", "--global-batch-size", "32", "--heartbeat-timeout", "15",
         "--register-timeout", "60", "--max-restarts", "20", "--max-resizes", "20"]
ELASTIC = ["--workers", "2:4", "--external-workers", "--rendezvous-wait", "2", "--rejoin-timeout", "5"]
MIN, MAX = 2, 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    # A killed worker is seen at once (its session and ring connections break); the timeouts
    # only catch silent ones, so they are long enough for a 2-core machine shared with others.
    e = dict(os.environ, RUST_LOG="info", WORKER_RING_TIMEOUT="15", TRAINER_JOB_SECRET=SECRET)
    for var in ("TRAINER_CONFIG", "COORDINATOR_ADDR"):
        e.pop(var, None)
    return e


def write_config(work: Path) -> Path:
    path = work / "job.toml"
    path.write_text(JOB)
    return path


class Coordinator:
    """A coordinator whose log lines are kept as they come (bench/world_size_bench.py too)."""

    def __init__(self, cmd: list[str], environment: dict[str, str] | None = None):
        self.proc = subprocess.Popen(cmd, env=environment or env(), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, errors="replace")
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def saw(self, text: str) -> bool:
        return any(text in line for line in list(self.lines))


def join(args: argparse.Namespace, addr: str) -> subprocess.Popen:
    return subprocess.Popen([str(args.worker), "join"], env=dict(env(), COORDINATOR_ADDR=addr),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def reference(args: argparse.Namespace, config: Path, work: Path) -> tuple[float, float]:
    """The fixed-size run's test accuracy and wall time in seconds."""
    out = work / "reference"
    cmd = [str(args.coordinator), "--workers", str(MAX), "--config", str(config), "--data", str(args.data),
           "--out", str(out), "--worker-bin", str(args.worker), "--cache-dir", str(work / "cache"), *FLAGS]
    started = time.monotonic()
    p = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=args.trial_timeout)
    if p.returncode != 0:
        sys.exit(f"the fixed-size run failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text())["test_accuracy"], time.monotonic() - started


def trial(args: argparse.Namespace, n: int, rng: random.Random, config: Path, work: Path, ref: float,
          window: float) -> dict:
    out = work / f"trial-{n}"
    port = free_port()
    addr = f"127.0.0.1:{port}"
    coord = Coordinator([str(args.coordinator), *ELASTIC, "--listen", addr, "--config", str(config), "--data",
                         str(args.data), "--out", str(out), "--cache-dir", str(work / "cache"), *FLAGS])
    workers = [join(args, addr) for _ in range(rng.randint(MIN, MAX))]
    started, events, result = time.monotonic(), [], {"trial": n, "started_with": len(workers)}
    deadline = started + args.trial_timeout
    while not coord.saw("all replicas ready") and coord.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    plan = sorted(rng.uniform(0, window) for _ in range(rng.randint(1, 3)))
    t0 = time.monotonic()
    for at in plan:
        time.sleep(max(0.0, t0 + at - time.monotonic()))
        if coord.proc.poll() is not None:
            break
        live = [w for w in workers if w.poll() is None]
        kill = len(live) > MIN and (len(live) >= MAX or rng.random() < 0.5)
        if kill:
            victim = rng.choice(live)
            victim.send_signal(signal.SIGKILL)
            events.append(f"kill@{at:.1f}s")
        elif len(live) < MAX:
            workers.append(join(args, addr))
            events.append(f"join@{at:.1f}s")
    seen, last_line = len(coord.lines), time.monotonic()
    code = None
    while code is None:
        try:
            code = coord.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            if len(coord.lines) != seen:
                seen, last_line = len(coord.lines), time.monotonic()
            stalled = time.monotonic() - last_line > args.stall_seconds
            if stalled or time.monotonic() > deadline:
                coord.proc.kill()
                coord.proc.wait()
                code = "hung" if stalled else "cut off"
    for w in workers:
        if w.poll() is None:
            try:
                w.wait(timeout=15)
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait()
    result.update(events=events, exit=code, seconds=round(time.monotonic() - started, 1))
    summary_path = out / "summary.json"
    if code == 0 and summary_path.exists():
        s = json.loads(summary_path.read_text())
        result.update(
            world_sizes=[w["world_size"] for w in s.get("world_sizes", [])],
            resizes=s.get("resizes"), restarts=s.get("restarts"), test_accuracy=s["test_accuracy"],
            gap_points=round(100 * abs(s["test_accuracy"] - ref), 2),
        )
    else:
        errors = [line for line in coord.lines if line.startswith("error")]
        result["error"] = (errors or coord.lines or [""])[-1][:300]
    shutil.rmtree(out, ignore_errors=True)
    return result


def write_section(args: argparse.Namespace, results: list[dict], ref: float, completed: int, hung: int,
                  gap: float | None, window: float) -> None:
    rows = ["| trial | workers at start | events | exit | world sizes | resizes | restarts | test acc. | gap (points) | s |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r['trial']} | {r['started_with']} | {' '.join(r['events'])} | {r['exit']} "
                    f"| {' > '.join(map(str, r.get('world_sizes', [])))} | {r.get('resizes', '')} "
                    f"| {r.get('restarts', '')} | {r.get('test_accuracy', '')} | {r.get('gap_points', '')} "
                    f"| {r['seconds']} |")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    body = (
        "## Elastic chaos: random kills and joins at --workers 2:4 (bench/chaos.py --elastic, issue 22)\n\n"
        f"`python3 bench/chaos.py --elastic --trials {args.trials} --seed {args.seed}` on {cpu} "
        f"({os.cpu_count()} cores), binaries {args.coordinator.parent}; how each trial "
        "is made: bench/chaos_elastic.py. The fixed-size run (4 local workers, no faults) reached test "
        f"accuracy {ref}; the events came within {window:.1f} s (70% of its wall time) of the replicas being "
        "ready.\n\n"
        f"**{completed}/{len(results)} completed, {hung} hung, "
        f"{sum(r['exit'] == 'cut off' for r in results)} cut off; largest test accuracy gap to the fixed-size "
        f"run: {'-' if gap is None else f'{gap:.2f} points'}.**\n\n" + "\n".join(rows) + "\n\n"
    )
    block = f"<!-- section:chaos-elastic -->\n{body}<!-- /section:chaos-elastic -->\n"
    text = args.results.read_text() if args.results.exists() else ""
    pattern = re.compile(r"<!-- section:chaos-elastic -->\n.*?<!-- /section:chaos-elastic -->\n", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block
    args.results.write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=os.environ.get("IMDB_DATA"))
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--trial-timeout", type=float, default=900.0, help="a trial still working after this is cut off")
    p.add_argument("--stall-seconds", type=float, default=90.0, help="a coordinator silent this long is hung")
    p.add_argument("--coordinator", type=Path, default=ROOT / "target/release/coordinator")
    p.add_argument("--worker", type=Path, default=ROOT / "target/release/worker")
    p.add_argument("--results", type=Path, help="markdown file whose chaos-elastic section to rewrite")
    p.add_argument("--json", type=Path, help="write every trial's result here")
    args = p.parse_args(argv)
    if not args.data:
        sys.exit("give the corpus with --data or IMDB_DATA")
    work = Path(tempfile.mkdtemp(prefix="chaos-elastic-"))
    try:
        config = write_config(work)
        ref, ref_seconds = reference(args, config, work)
        window = max(2.0, 0.7 * ref_seconds)
        print(f"fixed-size run (4 workers): test accuracy {ref} in {ref_seconds:.1f} s; events within "
              f"{window:.1f} s of the replicas being ready", flush=True)
        rng = random.Random(args.seed)
        results = []
        for n in range(1, args.trials + 1):
            r = trial(args, n, rng, config, work, ref, window)
            results.append(r)
            print(json.dumps(r), flush=True)
        completed = sum(r["exit"] == 0 for r in results)
        hung = sum(r["exit"] == "hung" for r in results)
        cut = sum(r["exit"] == "cut off" for r in results)
        gaps = [r["gap_points"] for r in results if "gap_points" in r]
        gap = max(gaps) if gaps else None
        print(f"{completed}/{len(results)} completed, {hung} hung, {cut} cut off, largest accuracy gap "
              f"{'-' if gap is None else f'{gap:.2f} points'}")
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
        if args.results:
            write_section(args, results, ref, completed, hung, gap, window)
        return 0 if completed == len(results) else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
