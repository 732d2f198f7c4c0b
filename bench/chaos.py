#!/usr/bin/env python3
"""Chaos benchmark: kill random workers at random times and check that every job still
finishes, bitwise equal to an uninterrupted run of the same config and world size.

    cargo build --release --bins
    python3 bench/chaos.py --data aclImdb_v1.tar.gz            # 20 trials (make chaos)
    python3 bench/chaos.py --data ... --trials 5 --seed 7 --json runs/chaos.json
    python3 bench/chaos.py --data ... --results bench/RESULTS.md   # rewrite its section there

Each trial picks a world size of 2 to 4, then kills (SIGKILL) a random worker process one
to three times, each at a random moment: while the workers register, in an epoch, during a
checkpoint upload or an evaluation. The coordinator (configs/test-tiny.toml, 8 epochs, a
checkpoint every 3 steps) restarts the group from its last checkpoint each time. A trial
passes when the job exits 0 and its final parameter checksum and test accuracy equal the
uninterrupted run's. Prints a table per trial and a summary line; nothing here is timed
against a target. Only the standard library is needed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "test-tiny.toml"
JOB_FLAGS = [
    "--epochs", "8",
    "--checkpoint-every-steps", "3",
    "--heartbeat-timeout", "3",
    "--register-timeout", "60",
    "--max-restarts", "8",
]


def coordinator_cmd(args: argparse.Namespace, world: int, out: Path) -> list[str]:
    return [
        str(args.coordinator), "--workers", str(world), "--config", str(CONFIG),
        "--data", str(args.data), "--out", str(out), "--worker-bin", str(args.worker),
        "--cache-dir", str(args.cache), *JOB_FLAGS,
    ]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update({"RUST_LOG": "warn", "WORKER_RING_TIMEOUT": "3"})
    for var in ("TRAINER_CONFIG", "TRAINER_JOB_SECRET", "COORDINATOR_ADDR"):
        e.pop(var, None)
    return e


def worker_pids(coordinator_pid: int) -> list[int]:
    """The coordinator's live child processes (its local workers)."""
    try:
        children = Path(f"/proc/{coordinator_pid}/task/{coordinator_pid}/children").read_text().split()
    except OSError:
        return []
    return [int(c) for c in children]


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def reference(args: argparse.Namespace, world: int, work: Path) -> dict:
    out = work / f"reference-{world}"
    proc = subprocess.run(coordinator_cmd(args, world, out), env=env(), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"the uninterrupted run with {world} workers failed:\n{proc.stderr[-3000:]}")
    return summary(out)


def trial(args: argparse.Namespace, n: int, world: int, kills: list[float], work: Path) -> dict:
    out = work / f"trial-{n}"
    start = time.monotonic()
    proc = subprocess.Popen(coordinator_cmd(args, world, out), env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed = 0
    rng = random.Random(args.seed * 1000 + n)
    for at in kills:
        while proc.poll() is None and time.monotonic() - start < at:
            time.sleep(0.01)
        pids = worker_pids(proc.pid)
        if proc.poll() is not None or not pids:
            continue
        try:
            os.kill(rng.choice(pids), signal.SIGKILL)
            killed += 1
        except ProcessLookupError:
            pass
    try:
        _, err = proc.communicate(timeout=args.trial_timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        return {"trial": n, "world": world, "kills": killed, "exit": "timeout", "restarts": None,
                "bitwise": False, "seconds": time.monotonic() - start, "error": "timed out"}
    result = {"trial": n, "world": world, "kills": killed, "exit": proc.returncode,
              "seconds": round(time.monotonic() - start, 1)}
    if proc.returncode == 0:
        s = summary(out)
        result["restarts"] = s["restarts"]
        result["steps_lost"] = s["steps_lost"]
        result["checksum"] = s["final_parameter_checksum"]
        result["test_accuracy"] = s["test_accuracy"]
    else:
        result["restarts"] = None
        result["error"] = err.strip().splitlines()[-1] if err.strip() else ""
    shutil.rmtree(out, ignore_errors=True)
    return result


def table_rows(results: list[dict]) -> list[str]:
    rows = ["| trial | workers | kills | exit | restarts | steps lost | bitwise equal | seconds |",
            "|---|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r['trial']} | {r['world']} | {r['kills']} | {r['exit']} | {r['restarts']} | "
                    f"{r.get('steps_lost', '-')} | {'yes' if r['bitwise'] else 'NO'} | {r['seconds']} |")
    return rows


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def write_section(args: argparse.Namespace, results: list[dict], completed: int, bitwise: int,
                  kills: int, restarts: int) -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = (
        "## Chaos: random workers killed at random times (bench/chaos.py, `make chaos`)\n\n"
        f"Measured {when} on {cpu_name()} ({os.cpu_count()} cores); commit {commit}; "
        f"`python3 bench/chaos.py --trials {args.trials} --seed {args.seed}` with release binaries. "
        "Each trial runs configs/test-tiny.toml with "
        f"`{' '.join(JOB_FLAGS)}` on 2 to 4 local workers and SIGKILLs one to three random "
        "workers in its first 2 s; bitwise equal = the same final parameter checksum and test "
        "accuracy as the uninterrupted run of that world size.\n\n"
        f"**{completed}/{len(results)} completed, {bitwise}/{len(results)} bitwise equal, "
        f"{kills} workers killed, {restarts} restarts.** (Kills that land in the same attempt, "
        "before the group restarted, cost one restart.)\n\n"
        + "\n".join(table_rows(results)) + "\n\n"
    )
    block = f"<!-- section:chaos -->\n{body}<!-- /section:chaos -->\n"
    text = args.results.read_text() if args.results.exists() else ""
    pattern = re.compile(r"<!-- section:chaos -->\n.*?<!-- /section:chaos -->\n", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip("\n") + "\n\n" + block
    args.results.write_text(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.environ.get("IMDB_DATA"), help="the corpus (default: $IMDB_DATA)")
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--coordinator", type=Path, default=ROOT / "target/release/coordinator")
    p.add_argument("--worker", type=Path, default=ROOT / "target/release/worker")
    p.add_argument("--trial-timeout", type=float, default=180.0)
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--results", type=Path, help="rewrite the chaos section of this markdown file")
    args = p.parse_args()
    if not args.data:
        sys.exit("--data (or IMDB_DATA) must name the corpus")
    for binary in (args.coordinator, args.worker):
        if not binary.is_file():
            sys.exit(f"{binary} is missing: cargo build --release --bins")
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        work = Path(tmp)
        args.cache = work / "cache"
        refs: dict[int, dict] = {}
        results = []
        print(f"{'trial':>5} {'world':>5} {'kills':>5} {'exit':>5} {'restarts':>8} {'lost':>5} "
              f"{'bitwise':>7} {'seconds':>7}")
        for n in range(1, args.trials + 1):
            world = rng.randint(2, 4)
            if world not in refs:
                refs[world] = reference(args, world, work)
            # One to three kills within the first 2 s of a job that runs for 2 to 3 s uninterrupted (2-core machine).
            kills = sorted(rng.uniform(0.2, 2.0) for _ in range(rng.randint(1, 3)))
            r = trial(args, n, world, kills, work)
            ref = refs[world]
            r["bitwise"] = (r.get("exit") == 0
                            and r.get("checksum") == ref["final_parameter_checksum"]
                            and r.get("test_accuracy") == ref["test_accuracy"])
            results.append(r)
            print(f"{n:>5} {world:>5} {r['kills']:>5} {str(r['exit']):>5} {str(r['restarts']):>8} "
                  f"{str(r.get('steps_lost', '-')):>5} {('yes' if r['bitwise'] else 'NO'):>7} "
                  f"{r['seconds']:>7}" + (f"  {r['error']}" if r.get("error") else ""), flush=True)
        completed = sum(1 for r in results if r["exit"] == 0)
        bitwise = sum(1 for r in results if r["bitwise"])
        restarts = sum(r["restarts"] or 0 for r in results)
        kills = sum(r["kills"] for r in results)
        print(f"\nchaos: {completed}/{len(results)} completed, {bitwise}/{len(results)} bitwise equal "
              f"to the uninterrupted run, {kills} workers killed, {restarts} restarts")
        if args.results:
            write_section(args, results, completed, bitwise, kills, restarts)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"results": results, "completed": completed,
                                             "bitwise": bitwise, "restarts": restarts}, indent=1))
        if completed < len(results) or bitwise < len(results):
            sys.exit(1)


if __name__ == "__main__":
    main()
