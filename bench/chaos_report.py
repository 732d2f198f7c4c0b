"""The reports of bench/chaos.py: the chaos section of bench/RESULTS.md (kill-worker trials)
and bench/RELIABILITY.md (a row per fault kind, then every trial). chaos.py passes in what
the trials ran with (its job flags, ring timeout and the kinds' descriptions).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import platform
import re
import statistics
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

def table_rows(results: list[dict]) -> list[str]:
    rows = ["| trial | workers | kills | exit | restarts | steps lost | bitwise equal | seconds |",
            "|---|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r['trial']} | {r['world']} | {r['faults']} | {r['exit']} | {r['restarts']} | "
                    f"{r.get('steps_lost', '-')} | {'yes' if r['bitwise'] else 'NO'} | {r['seconds']} |")
    return rows


def short(line: str, width: int = 220) -> str:
    line = re.sub(r"\d{4}-\d\d-\d\dT[\d:.]+Z\s+", "", line.strip())  # tracing timestamps
    line = line.replace("|", "\\|")
    return line if len(line) <= width else line[: width - 3] + "..."


def kind_row(kind: str, rs: list[dict]) -> dict:
    detects = [r["detect_s"] for r in rs if r.get("detect_s") is not None]
    if not detects:
        detect = "-"
    elif f"{min(detects):.1f}" == f"{max(detects):.1f}":
        detect = f"{detects[0]:.1f} s"
    else:
        detect = f"{min(detects):.1f} to {max(detects):.1f} s (median {statistics.median(detects):.1f})"
    exits: dict = {}
    for r in rs:
        key = "→".join(str(e) for e in r.get("exits", [r["exit"]]))
        exits[key] = exits.get(key, 0) + 1
    saw = next((r["saw"] for r in rs if r.get("saw") not in (None, "nothing")), "nothing")
    return {
        "kind": kind, "trials": len(rs), "completed": sum(1 for r in rs if r["exit"] == 0),
        "bitwise": sum(1 for r in rs if r["bitwise"]), "as_expected": sum(1 for r in rs if r["as_expected"]),
        "restarts": sum(r.get("restarts") or 0 for r in rs),
        "exits": ", ".join(f"{k} ({v})" if len(exits) > 1 or v > 1 else k for k, v in exits.items()),
        "detect": detect, "saw": saw,
    }


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def binaries(args: argparse.Namespace) -> str:
    """Which binaries ran: path, build time and the start of their sha256 (they may come from
    another checkout's target/, built from another tree than this commit's)."""
    parts = []
    for b in (args.coordinator.resolve(), args.worker.resolve()):
        st = b.stat()
        built = datetime.datetime.fromtimestamp(st.st_mtime, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        parts.append(f"{b} (built {built}, sha256 {hashlib.sha256(b.read_bytes()).hexdigest()[:12]})")
    return " and ".join(parts)


def provenance(args: argparse.Namespace) -> tuple[str, str]:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return commit, when


def write_section(args: argparse.Namespace, results: list[dict], completed: int, bitwise: int,
                  kills: int, restarts: int, job_flags: list[str]) -> None:
    commit, when = provenance(args)
    body = (
        "## Chaos: random workers killed at random times (bench/chaos.py, `make chaos`)\n\n"
        f"Measured {when} on {cpu_name()} ({os.cpu_count()} cores); commit {commit}; "
        f"`python3 bench/chaos.py --trials {args.trials} --seed {args.seed}` with release binaries. "
        "Each trial runs configs/test-tiny.toml with "
        f"`{' '.join(job_flags)}` on 2 to 4 local workers and SIGKILLs one to three random "
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


def write_reliability(args: argparse.Namespace, kinds: list[str], results: list[dict], refs: dict,
                      skipped: dict[str, str], kind_docs: dict[str, tuple[str, str]], job_flags: list[str],
                      ring_timeout: int) -> None:
    commit, when = provenance(args)
    cmd = "python3 bench/chaos.py " + " ".join(f"--kind {k}" for k in args.kind) + \
          f" --trials {args.trials} --seed {args.seed} --reliability {args.reliability}"
    lines = [
        "# Reliability: faults and what the job did",
        "",
        "Written by `bench/chaos.py --reliability` (issue 20); regenerate it rather than edit it.",
        "",
        f"Measured {when} on {cpu_name()} ({os.cpu_count()} cores, shared with other work); "
        f"`{cmd}` (chaos.py at commit {commit}) with {args.binaries}"
        + (f"; THE BINARIES CHANGED DURING THE RUN: {args.binaries_after}" if args.binaries_after != args.binaries
           else "")
        + f". Each trial runs configs/test-tiny.toml with `{' '.join(job_flags)}` "
        f"and WORKER_ring_timeout={ring_timeout} on 2 to 4 local workers (chosen at random per trial), and "
        "makes one fault of its kind at a random moment. Uninterrupted runs: "
        + ", ".join(f"{w} workers {r['seconds']} s (checksum {r['final_parameter_checksum']})"
                    for w, r in sorted(refs.items())) + ".",
        "",
        "*Completed*: the job (after a supervisor's restart where the kind has one) exited 0. *Bitwise "
        "equal*: its final parameter checksum and test accuracy equal the uninterrupted run's. *As "
        "expected*: what the kind's expectation (below) asks. *Time to detect*: from the fault to the "
        "coordinator's first line about it (its own lines, not the worker lines it relays; for the stray "
        "client the workers' refusals count); for a damaged checkpoint, from the start of the resumed run; "
        "for the full disk, from the moment it was filled; for a folder too small, from the start. *What the user saw*: that line, from the first trial that had one.",
        "",
        "| fault | trials | completed | bitwise equal | as expected | restarts | exit codes | time to detect | what the user saw |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kind in kinds:
        if kind in skipped:
            lines.append(f"| {kind} | 0 | - | - | - | - | - | - | skipped: {skipped[kind]} |")
            continue
        rs = [r for r in results if r["kind"] == kind]
        if not rs:
            continue
        k = kind_row(kind, rs)
        lines.append(f"| {kind} | {k['trials']} | {k['completed']} | {k['bitwise']} | {k['as_expected']} | "
                     f"{k['restarts']} | {k['exits']} | {k['detect']} | {short(k['saw'])} |")
    lines += ["", "Exit codes: `a→b` is the first coordinator's exit, then its restart's (by the supervisor "
              "of the coordinator kinds); -9 is SIGKILL; 75 is \"retryable\" (README).", "",
              "## How each fault is made, and what is expected", "",
              "| fault | how | expected |", "|---|---|---|"]
    for kind in kinds:
        how, expect = kind_docs[kind]
        lines.append(f"| {kind} | {how} | {expect} |")
    lines += ["", "## Trials", "",
              "| fault | trial | workers | exits | restarts | bitwise equal | as expected | detect (s) | seconds (uninterrupted) | detail |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        detail = "; ".join(str(r[k]) for k in ("damage", "cut", "how", "fault_counts", "refused", "error")
                           if r.get(k))
        if r.get("stragglers"):
            detail += f"; workers of the killed coordinator still alive after 15 s: {r['stragglers']}"
        if r["kind"] in ("latency", "stray-ring-client") and r.get("restart_lines"):
            detail += "; " + r["restart_lines"][0]
        if r.get("attempts", 1) > 1:
            detail += f"; run {r['attempts']} times: the fault could not be made in the first"
        exits = "→".join(str(e) for e in r.get("exits", [r["exit"]]))
        lines.append(f"| {r['kind']} | {r['trial']} | {r['world']} | {exits} | {r.get('restarts')} | "
                     f"{'yes' if r['bitwise'] else 'NO'} | {'yes' if r['as_expected'] else 'NO'} | "
                     f"{r.get('detect_s', '-')} | {r['seconds']} ({r['reference_s']}) | {short(detail, 300)} |")
    args.reliability.write_text("\n".join(lines) + "\n")
