#!/usr/bin/env python3
"""Chaos benchmark: faults at random times, and what the job did about them. Every job must
finish bitwise equal to an uninterrupted run of the same config and world size; a run folder
that fills up must stop with exit 5 (storage, not retried) without spending a restart and then
resume to the same end, and one too small from the start must be refused with exit 5.

    cargo build --release --bins
    python3 bench/chaos.py --data aclImdb_v1.tar.gz            # 20 kill-worker trials (make chaos)
    python3 bench/chaos.py --data ... --trials 5 --seed 7 --json runs/chaos.json
    python3 bench/chaos.py --data ... --results bench/RESULTS.md   # rewrite its section there
    python3 bench/chaos.py --data ... --kind all --trials 3 --reliability bench/RELIABILITY.md
    python3 bench/chaos.py --data ... --kind partition-ring --kind stray-ring-client --trials 5
    python3 bench/chaos.py --elastic --data ... --trials 20   # kills and joins at --workers 2:4 (chaos_elastic.py)

Each trial runs configs/test-tiny.toml (8 epochs, a checkpoint every 3 steps, heartbeat and
ring timeouts of 3 s) with local workers (`coordinator --workers N`, N from 2 to 4) and makes
one fault of its kind (`--kind`, repeatable; KINDS below says how each is made). A trial
completes when the job exits 0, and is bitwise equal when its final parameter checksum and
test accuracy equal the uninterrupted run's. Time to detect runs from the fault to the
coordinator's first line about it (its own lines, not the worker lines it relays); what the
user saw is that line. The network kinds run the job in a network namespace of its own
(only its loopback), so that iptables rules and a delay on `lo` touch nothing else on the
machine; they need root and iptables (deploy/tests/netfaults.py makes them) and are skipped
with a line that says why otherwise, as are the disk kinds without root (a tmpfs mount).

Prints a row per trial and a table per kind; nothing here is timed against a target. Only
the standard library is needed. Exits 1 when a trial did not do what its kind expects.
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
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "deploy" / "tests"))
import netfaults  # noqa: E402  (deploy/tests/netfaults.py: iptables, the delay line)

sys.path.insert(0, str(ROOT / "bench"))
from chaos_report import binaries, kind_row, short, write_reliability, write_section  # noqa: E402  (beside this file)

CONFIG = ROOT / "configs" / "test-tiny.toml"
HEARTBEAT_TIMEOUT = 3
RING_TIMEOUT = 3
JOB_FLAGS = [
    "--epochs", "8",
    "--checkpoint-every-steps", "3",
    "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT),
    "--register-timeout", "60",
    "--max-restarts", "8",
]
STOP_WORKER_SECONDS = 10
STOP_COORDINATOR_SECONDS = 30
LATENCY_MS = 50
LOSS = 0.01

# kind: (how it is made, what is expected). "equal" = exit 0 and bitwise equal.
KINDS = {
    "kill-worker": ("SIGKILL of one to three random workers, each at a random moment of the first 2 s",
                    "equal"),
    "kill-two-workers": ("SIGKILL of two workers at the same moment (0.3 to 2 s in)", "equal"),
    "kill-coordinator": ("SIGKILL of the coordinator (0.3 to 2 s in); a supervisor starts it again with "
                         "--resume=auto on the same --out", "equal after the supervisor's restart"),
    "term-coordinator": ("SIGTERM to the coordinator (0.3 to 2 s in); when it exits, a supervisor starts it "
                         "again with --resume=auto", "exit 75 first, then equal after the restart"),
    "stop-worker": (f"SIGSTOP of a random worker for {STOP_WORKER_SECONDS} s (0 to 1.5 s after the replicas are "
                    "ready), then SIGCONT", "equal"),
    "stop-coordinator": (f"SIGSTOP of the coordinator for {STOP_COORDINATOR_SECONDS} s (0 to 1.5 s after the "
                         "replicas are ready), then SIGCONT", "equal (with or without a restart), nothing corrupt"),
    "latency": (f"{LATENCY_MS} ms on every packet and {LOSS * 100:g}% of them lost on the job's loopback "
                "(all processes) from the start", "equal, no restart, only slower"),
    "partition-ring": ("once the ring is up (0.2 to 1 s after), iptables DROP of both directions of a random "
                       "worker's ring connections; healed after the detection and at least the ring timeout",
                       "equal, after a restart"),
    "partition-coordinator": ("once training runs, iptables DROP of both directions of a random worker's "
                              "connection to the coordinator, its ring up; healed after the detection and at "
                              "least the heartbeat timeout", "equal, after a restart"),
    "stray-ring-client": ("a client connects to each ring listener as soon as it appears, four times: "
                          "64 random bytes, a hello with a wrong job token, a hello whose token length is "
                          "2^32-1, and a connection that sends nothing for 5 s", "equal"),
    "bitflip": ("the coordinator killed (SIGKILL) after its second checkpoint, then in the latest "
                "checkpoint-*.safetensors the lowest exponent bit of a random element of a random model "
                "parameter flipped (the value doubles or halves), then --resume",
                "equal: the damaged file named and set aside, the previous checkpoint restored"),
    "truncated": ("the coordinator killed after its second checkpoint, the latest checkpoint-*.safetensors "
                  "cut to half its length, then --resume",
                  "equal: the damaged file named and set aside, the previous checkpoint restored"),
    "full-disk": ("--out on a 64 MiB tmpfs; once a checkpoint is committed, a file takes every free byte; "
                  "when the job has stopped, the file is deleted and the job resumed with --resume",
                  "exit 5 (or 0 if no checkpoint came after) with no restart spent, then equal after the resume"),
    "disk-too-small": ("--out on a tmpfs with room for one checkpoint and 64 KiB more",
                       "refused at the start with exit 5, before any worker starts"),
}
NETWORK_KINDS = ["latency", "partition-ring", "partition-coordinator", "stray-ring-client"]
# A coordinator line about a problem (its own lines; the workers' arrive as "[worker pid N] ...").
# Generic WARN/ERROR lines are left out: "worker did not stop in time" comes before the line
# that names the fault.
PROBLEM = re.compile(r"restart \d+/\d+|^error|SIGTERM|lost|failed|timed out|hung|unreachable|corrupt|"
                     r"damaged|mismatch|sha-?256|integrity|no space|storage|disk|refus|not a safetensors", re.I)
RESUMED = re.compile(r"resum", re.I)
READY = re.compile(r"all replicas ready")


def coordinator_cmd(args: argparse.Namespace, world: int, out: Path) -> list[str]:
    return [
        str(args.coordinator), "--workers", str(world), "--config", str(CONFIG),
        "--data", str(args.data), "--out", str(out), "--worker-bin", str(args.worker),
        "--cache-dir", str(args.cache), *JOB_FLAGS,
    ]


def env() -> dict[str, str]:
    e = dict(os.environ)
    # The log level a user gets by default (info): what they would see.
    e.update({"RUST_LOG": "info", "WORKER_RING_TIMEOUT": str(RING_TIMEOUT)})
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


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


class Job:
    """One coordinator process (with its local workers) and the lines of its stderr, each
    with the time it arrived."""

    def __init__(self, args: argparse.Namespace, world: int, out: Path, extra: list[str] | None = None,
                 ns: str | None = None, wrap: list[str] | None = None):
        cmd = (wrap or []) + coordinator_cmd(args, world, out) + (extra or [])
        if ns:
            cmd = ["ip", "netns", "exec", ns] + cmd
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, errors="replace")
        self.lines: list[tuple[float, str]] = []
        self.seen_workers: set[int] = set()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def workers(self) -> list[int]:
        pids = worker_pids(self.proc.pid)
        self.seen_workers.update(pids)
        return pids

    def wait(self, timeout: float) -> int | str:
        try:
            code = self.proc.wait(timeout=max(0.0, timeout))
        except subprocess.TimeoutExpired:
            for pid in self.workers():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.kill()
            self.proc.wait()
            code = "timeout"
        self.reader.join(timeout=5)
        return code

    def first(self, since: float, pattern: re.Pattern = PROBLEM, own: bool = True) -> tuple[float, str] | None:
        for t, line in list(self.lines):
            if t >= since and (not own or not line.startswith("[worker pid")) and pattern.search(line):
                return t, line
        return None

    def last_error(self) -> str:
        own = [line for _, line in self.lines if not line.startswith("[worker pid")]
        errors = [line for line in own if line.startswith("error")]
        return (errors or own or [""])[-1]


def reference(args: argparse.Namespace, world: int, work: Path) -> dict:
    out = work / f"reference-{world}"
    job = Job(args, world, out)
    code = job.wait(args.trial_timeout)
    if code != 0:
        sys.exit(f"the uninterrupted run with {world} workers failed ({code}):\n"
                 + "\n".join(line for _, line in job.lines[-30:]))
    s = summary(out)
    s["seconds"] = round(time.monotonic() - job.started, 1)
    ckpts = sorted(out.glob("checkpoint-*.safetensors"))
    s["checkpoint_bytes"] = max(p.stat().st_size for p in ckpts) if ckpts else 0
    shutil.rmtree(out, ignore_errors=True)
    return s


# --- network helpers (the job in its own network namespace) -------------------------------


def tcp_links(ns: str) -> list[tuple[int, int, int]]:
    """Established TCP connections in `ns`: (local port, peer port, pid)."""
    p = subprocess.run(["ip", "netns", "exec", ns, "ss", "-tnpH", "state", "established"],
                       capture_output=True, text=True)
    links = []
    for line in p.stdout.splitlines():
        m = re.search(r"\S+:(\d+)\s+\S+:(\d+)\s+users:\(\(\"[^\"]*\",pid=(\d+)", line)
        if m:
            links.append((int(m.group(1)), int(m.group(2)), int(m.group(3))))
    return links


def listening_ports(pid: int) -> list[int]:
    """The TCP ports process `pid` listens on (its namespace's /proc/net/tcp and its fds)."""
    try:
        inodes = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
        ports = []
        with open(f"/proc/{pid}/net/tcp") as f:
            next(f)
            for line in f:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:
                    ports.append(int(cols[1].split(":")[1], 16))
        return ports
    except OSError:
        return []


def drop_both_ways(rules: netfaults.Rules, ns: str, a: int, b: int) -> None:
    for sport, dport in ((a, b), (b, a)):
        rules.add(ns, "INPUT", "-i", "lo", "-p", "tcp", "--sport", str(sport), "--dport", str(dport),
                  "-j", "DROP")


def env_rank(pid: int) -> int | None:
    try:
        for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            if item.startswith(b"TRAINER_RANK="):
                return int(item.split(b"=", 1)[1])
    except (OSError, ValueError):
        pass
    return None


RING_MAGIC = b"TRNRING1"


def stray_payloads(world: int, rank: int, rng: random.Random) -> list[tuple[str, bytes, float]]:
    """What the stray client sends: (what, bytes, seconds to hold the connection)."""
    prev = (rank - 1) % world
    hello = lambda token_len, token: (RING_MAGIC + struct.pack("<IB", 1, 1) + struct.pack("<III", world, prev, token_len)
                                      + token)
    return [
        ("64 random bytes", bytes(rng.getrandbits(8) for _ in range(64)), 0.5),
        ("a hello with a wrong job token", hello(32, bytes(rng.getrandbits(8) for _ in range(32))), 0.5),
        ("a hello with a token length of 2^32-1", hello(0xFFFFFFFF, b""), 0.5),
        ("a connection that sends nothing", b"", 5.0),
    ]


def stray_main(argv: list[str]) -> None:
    """`chaos.py stray WORLD SEED` (then the coordinator's pid on stdin): the stray ring client, a process of its
    own. Connects to every ring listener of the coordinator's workers as soon as it appears
    (four connections each, stray_payloads); prints a JSON line per connection."""
    world, seed = int(argv[0]), int(argv[1])
    # Started before the job (Python takes a while to start; a listener lives well under a
    # second): the coordinator's pid comes on stdin.
    coordinator = int(sys.stdin.readline())
    rng = random.Random(seed)
    done: set[tuple[int, int]] = set()
    held: list = []
    while alive(coordinator):
        for pid in worker_pids(coordinator):
            for port in listening_ports(pid):
                if (pid, port) in done:
                    continue
                done.add((pid, port))
                rank = env_rank(pid)
                for what, data, hold in stray_payloads(world, rank if rank is not None else 0, rng):
                    t = time.monotonic()
                    try:
                        s = socket.create_connection(("127.0.0.1", port), timeout=1)
                        if data:
                            s.sendall(data)
                        held.append((time.monotonic() + hold, s))
                        note = ""
                    except OSError as e:
                        note = f": {e}"
                    print(json.dumps({"t": t, "what": f"worker pid {pid} (rank {rank}) port {port}: {what}{note}"}),
                          flush=True)
        now = time.monotonic()
        for item in [h for h in held if h[0] <= now]:
            item[1].close()
            held.remove(item)
        # A listener may live only tens of milliseconds (from the rendezvous to the handshake).
        time.sleep(0.001)


# --- trials --------------------------------------------------------------------------------


def wait_until(job: Job, cond, limit: float) -> bool:
    end = time.monotonic() + limit
    while time.monotonic() < end and job.proc.poll() is None:
        if cond():
            return True
        time.sleep(0.01)
    return False


def signal_pid(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def trial(args: argparse.Namespace, kind: str, n: int, world: int, work: Path, ref: dict) -> dict:
    """One trial; run again (up to 3 times) when its fault could not be made, say because the
    job ended first or the stray client found no listener open: such a run tests nothing."""
    for attempt in range(1, 4):
        result = one_trial(args, kind, n, world, work, ref, attempt)
        if result["faults"]:
            break
    result["attempts"] = attempt
    return result


def one_trial(args: argparse.Namespace, kind: str, n: int, world: int, work: Path, ref: dict,
              attempt: int) -> dict:
    rng = random.Random(args.seed * 1000 + n + 100000 * (attempt - 1))
    out = work / f"trial-{n}"
    result: dict = {"kind": kind, "trial": n, "world": world, "faults": 0}
    ns = None
    rules = netfaults.Rules()
    latency = None
    start = time.monotonic()
    try:
        if kind in NETWORK_KINDS:
            ns = f"chaos{os.getpid() % 100000}t{n}"
            netfaults.run(["ip", "netns", "add", ns])
            netfaults.run(["ip", "-n", ns, "link", "set", "lo", "up"])
        if kind == "latency":
            latency = netfaults.Latency(ns, "lo", LATENCY_MS, LOSS, seed=n)
            result["how"] = latency.start()
            result["faults"] = 1
            result["fault_at"] = time.monotonic()
        run_trial(args, kind, rng, world, out, ns, rules, result, ref)
    finally:
        rules.close()
        if latency is not None:
            result["fault_counts"] = latency.close()
        if ns:
            netfaults.run(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(out, ignore_errors=True)
    result["seconds"] = round(time.monotonic() - start, 1)
    result["reference_s"] = ref["seconds"]
    # What the kind expects.
    bitwise = (result.get("exit") == 0 and result.get("checksum") == ref["final_parameter_checksum"]
               and result.get("test_accuracy") == ref["test_accuracy"])
    result["bitwise"] = bitwise
    if kind in ("bitflip", "truncated"):
        ok = bitwise and "cannot be restored" in result.get("saw", "")
    elif kind == "full-disk":
        ok = bitwise and result.get("exits", [None])[0] in (0, 5) and result.get("restarts") == 0
    elif kind == "disk-too-small":
        ok = result.get("exit") == 5 and not result.get("workers_started")
    elif kind == "latency":
        ok = bitwise and result.get("restarts") == 0
    elif kind == "term-coordinator":
        ok = bitwise and result.get("exits", [None])[0] == 75
    else:
        ok = bitwise
    if result.get("stragglers"):
        ok = False
    if not result["faults"]:
        ok = False
        result.setdefault("error", "the fault was never made (the job ended first, or nothing to aim at)")
    result["as_expected"] = ok
    return result


def finish(job: Job, out: Path, result: dict, deadline: float) -> None:
    """Waits for the job; records its exit, restarts and checksum (or its last error line)."""
    code = job.wait(deadline - time.monotonic())
    note_restarts(job, result)
    result.setdefault("exits", []).append(code)
    result["exit"] = code
    if code == 0:
        s = summary(out)
        result.update(restarts=s["restarts"], steps_lost=s["steps_lost"],
                      checksum=s["final_parameter_checksum"], test_accuracy=s["test_accuracy"])
        result.pop("error", None)
    else:
        result["restarts"] = None
        result["error"] = job.last_error() or f"exit {code}"


def note_restarts(job: Job, result: dict) -> None:
    """Keeps the coordinator's restart lines (their causes)."""
    lines = [line for _, line in job.lines if re.match(r"restart \d+/\d+", line)]
    if lines:
        result.setdefault("restart_lines", []).extend(lines)


def detected(result: dict, job: Job, since: float, pattern: re.Pattern = PROBLEM, own: bool = True) -> None:
    hit = job.first(since, pattern, own)
    if hit:
        result.setdefault("detect_s", round(hit[0] - since, 2))
        result.setdefault("saw", hit[1])


def run_trial(args, kind, rng, world, out, ns, rules, result, ref) -> None:
    deadline = time.monotonic() + args.trial_timeout
    if kind in ("full-disk", "disk-too-small"):
        run_full_disk(args, kind, rng, world, out, result, ref, deadline)
        return
    stray = None
    if kind == "stray-ring-client":
        stray = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, __file__, "stray", str(world),
                                  str(rng.randrange(1 << 30))], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True)
    job = Job(args, world, out, ns=ns)
    at = job.started + rng.uniform(0.3, 2.0)
    if kind == "kill-worker":
        kills = sorted(job.started + rng.uniform(0.2, 2.0) for _ in range(rng.randint(1, 3)))
        for t in kills:
            wait_until(job, lambda: time.monotonic() >= t, t - time.monotonic() + 1)
            pids = job.workers()
            if job.proc.poll() is None and pids and signal_pid(rng.choice(pids), signal.SIGKILL):
                result["faults"] += 1
                result.setdefault("fault_at", time.monotonic())
    elif kind == "kill-two-workers":
        wait_until(job, lambda: time.monotonic() >= at, 3)
        pids = job.workers()
        if job.proc.poll() is None and len(pids) >= 2:
            for pid in rng.sample(pids, 2):
                result["faults"] += signal_pid(pid, signal.SIGKILL)
            result["fault_at"] = time.monotonic()
    elif kind == "stop-worker":
        at_training(job, rng)
        pids = job.workers()
        if job.proc.poll() is None and pids:
            victim = rng.choice(pids)
            if signal_pid(victim, signal.SIGSTOP):
                result["faults"] = 1
                result["fault_at"] = time.monotonic()
                wait_until(job, lambda: time.monotonic() >= result["fault_at"] + STOP_WORKER_SECONDS,
                           STOP_WORKER_SECONDS + 1)
                signal_pid(victim, signal.SIGCONT)
    elif kind == "stop-coordinator":
        at_training(job, rng)
        if job.proc.poll() is None:
            job.workers()
            signal_pid(job.proc.pid, signal.SIGSTOP)
            result["faults"] = 1
            result["fault_at"] = time.monotonic()
            time.sleep(STOP_COORDINATOR_SECONDS)
            signal_pid(job.proc.pid, signal.SIGCONT)
    elif kind in ("kill-coordinator", "term-coordinator"):
        wait_until(job, lambda: time.monotonic() >= at, 3)
        if job.proc.poll() is None:
            job.workers()
            signal_pid(job.proc.pid, signal.SIGKILL if kind == "kill-coordinator" else signal.SIGTERM)
            result["faults"] = 1
            result["fault_at"] = time.monotonic()
        supervise(args, job, world, out, result, deadline)
        return
    elif kind in ("bitflip", "truncated"):
        damage_checkpoint(args, kind, job, rng, world, out, result, deadline)
        return
    elif kind in ("partition-ring", "partition-coordinator"):
        partition(kind, job, rng, ns, rules, result)
    elif kind == "stray-ring-client":
        stray.stdin.write(f"{job.proc.pid}\n")
        stray.stdin.close()
        code = job.wait(deadline - time.monotonic())
        note_restarts(job, result)
        try:
            stray.wait(timeout=10)
        except subprocess.TimeoutExpired:
            stray.kill()
            stray.wait()
        out_text = stray.stdout.read()
        stray_log = [json.loads(line) for line in out_text.splitlines() if line.startswith("{")]
        result["faults"] = len(stray_log)
        if stray_log:
            result["fault_at"] = stray_log[0]["t"]
            result["stray"] = [e["what"] for e in stray_log]
        refusals = [re.sub(r".*reason=", "", line) for _, line in job.lines if "refused a ring connection" in line]
        result["refused"] = (f"{len(refusals)} of the stray connections refused (the others came while no "
                             f"handshake was reading)" + (": " + "; ".join(sorted(set(refusals))) if refusals else ""))
        # The workers are the ones who refuse a stranger: their lines count here.
        if "fault_at" in result:
            detected(result, job, result["fault_at"], re.compile(r"refused a ring connection|stray|hello", re.I),
                     own=False)
            result.setdefault("saw", "nothing")
        result["exits"] = [code]
        result["exit"] = code
        if code == 0:
            s = summary(out)
            result.update(restarts=s["restarts"], steps_lost=s["steps_lost"],
                          checksum=s["final_parameter_checksum"], test_accuracy=s["test_accuracy"])
        else:
            result["restarts"] = None
            result["error"] = job.last_error()
        return
    finish(job, out, result, deadline)
    if "fault_at" in result:
        detected(result, job, result["fault_at"])
    result.setdefault("saw", "nothing")


def at_training(job: Job, rng: random.Random) -> None:
    """Waits until the replicas are ready (training runs), then 0 to 1.5 s more: a process
    stopped before the workers register only delays the start, which tests nothing."""
    wait_until(job, lambda: job.first(job.started, READY) is not None, 60)
    t = time.monotonic() + rng.uniform(0.0, 1.5)
    wait_until(job, lambda: time.monotonic() >= t, 2)


def partition(kind, job, rng, ns, rules, result) -> None:
    """Cuts a random worker's ring links (or its link to the coordinator) once they exist;
    heals after the coordinator names it and at least the timeout has passed."""
    coord_ports: list[int] = []
    victim = None
    links: list[tuple[int, int]] = []

    def ready() -> bool:
        nonlocal victim, links, coord_ports
        coord_ports = listening_ports(job.proc.pid)
        pids = job.workers()
        if not coord_ports or not pids:
            return False
        if victim is None:
            victim = rng.choice(pids)
        mine = [(lp, pp) for lp, pp, pid in tcp_links(ns) if pid == victim]
        ring = [(lp, pp) for lp, pp in mine if pp not in coord_ports]
        to_coordinator = [(lp, pp) for lp, pp in mine if pp in coord_ports]
        links = ring if kind == "partition-ring" else to_coordinator
        # The ring is up (a link to the next rank and one from the previous): training runs.
        return len(ring) >= 2 and bool(to_coordinator)

    if not wait_until(job, ready, 60):
        return
    t = time.monotonic() + rng.uniform(0.2, 1.0)
    wait_until(job, lambda: time.monotonic() >= t, 2)
    if job.proc.poll() is not None:
        return
    for a, b in links:
        drop_both_ways(rules, ns, a, b)
    result["faults"] = 1
    result["fault_at"] = t0 = time.monotonic()
    result["cut"] = f"pid {victim} rank {env_rank(victim)}: {len(links)} connection(s) {links}"
    limit = RING_TIMEOUT if kind == "partition-ring" else HEARTBEAT_TIMEOUT
    wait_until(job, lambda: job.first(t0) is not None and time.monotonic() >= t0 + limit + 1, 60)
    rules.close()


def supervise(args, job: Job, world: int, out: Path, result: dict, deadline: float) -> None:
    """A supervisor: when the coordinator exits with anything but 0, 2, 3 or 4, start it again
    with --resume=auto on the same --out (at most 3 times)."""
    first = job
    for _ in range(4):
        finish(job, out, result, deadline)
        code = result["exit"]
        if job is first and "fault_at" in result:
            detected(result, job, result["fault_at"])
        if code in (0, 2, 3, 4, "timeout") or len(result["exits"]) > 3:
            break
        old = set(job.seen_workers)
        had_checkpoint = (out / "checkpoint.json").exists()
        job = Job(args, world, out, extra=["--resume=auto"])
        if "saw" not in result:
            # SIGKILL leaves no line: what the user sees is the restarted coordinator's line
            # about resuming.
            wait_until(job, lambda: job.first(job.started, RESUMED) is not None, 30)
            hit = job.first(job.started, RESUMED)
            result["saw"] = f"(exit {code}) then: " + (
                hit[1] if hit else "nothing about resuming" if had_checkpoint else "(no checkpoint yet) a fresh start")
        # The killed coordinator's local workers must not outlive it for long.
        end = time.monotonic() + 15
        while any(alive(p) for p in old) and time.monotonic() < end:
            time.sleep(0.1)
        stragglers = [p for p in old if alive(p)]
        if stragglers:
            result["stragglers"] = stragglers
            for p in stragglers:
                signal_pid(p, signal.SIGKILL)
    result.setdefault("saw", "nothing")


def damage_checkpoint(args, kind, job: Job, rng, world, out: Path, result, deadline) -> None:
    """Kills the coordinator after its second checkpoint (so that there is a previous one to
    fall back to), damages the latest checkpoint file, and resumes."""
    pointer = out / "checkpoint.json"

    def second_checkpoint() -> bool:
        try:
            return json.loads(pointer.read_text()).get("previous_file") is not None
        except (OSError, ValueError):
            return False

    wait_until(job, second_checkpoint, 60)
    t = time.monotonic() + rng.uniform(0.0, 0.5)
    wait_until(job, lambda: time.monotonic() >= t, 1)
    if job.proc.poll() is not None:
        finish(job, out, result, deadline)
        result["error"] = "the job ended before the coordinator could be killed"
        return
    pids = job.workers()
    signal_pid(job.proc.pid, signal.SIGKILL)
    job.wait(10)
    end = time.monotonic() + 15
    while any(alive(p) for p in pids) and time.monotonic() < end:
        time.sleep(0.05)
    latest = out / json.loads(pointer.read_text())["file"]
    data = bytearray(latest.read_bytes())
    if kind == "bitflip":
        (hlen,) = struct.unpack_from("<Q", data, 0)
        header = json.loads(bytes(data[8:8 + hlen]))
        # A bit that matters if it goes unnoticed: the lowest exponent bit (the value doubles
        # or halves) of one element of a model parameter, which the final checksum covers (a
        # flip in the Adam moment of an embedding row that is never used again changes
        # nothing, which would test nothing).
        name = rng.choice(sorted(k for k, v in header.items() if k.startswith("model.") and v["dtype"] == "F32"
                                 and v["data_offsets"][1] > v["data_offsets"][0]))
        begin, end_ = header[name]["data_offsets"]
        element = rng.randrange((end_ - begin) // 4)
        byte = 8 + hlen + begin + 4 * element + 2  # little-endian f32: bit 23 is bit 7 of byte 2
        before = struct.unpack_from("<f", data, byte - 2)[0]
        data[byte] ^= 0x80
        after = struct.unpack_from("<f", data, byte - 2)[0]
        latest.write_bytes(bytes(data))
        result["damage"] = (f"{latest.name}: bit 23 of {name}[{element}] flipped ({before:.6g} became "
                            f"{after:.6g})")
    else:
        latest.write_bytes(bytes(data[:len(data) // 2]))
        result["damage"] = f"{latest.name}: cut from {len(data)} to {len(data) // 2} bytes"
    result["faults"] = 1
    resumed = Job(args, world, out, extra=["--resume"])
    result["fault_at"] = resumed.started
    finish(resumed, out, result, deadline)
    detected(result, resumed, resumed.started)
    result.setdefault("saw", "nothing")


def run_full_disk(args, kind, rng, world, out: Path, result, ref, deadline) -> None:
    """--out on a tmpfs. full-disk: a file takes every free byte once a checkpoint is
    committed; when the job has stopped the file goes and the job is resumed. disk-too-small:
    a tmpfs with room for one checkpoint and 64 KiB more, which the job must refuse."""
    small = kind == "disk-too-small"
    size_kib = args.disk_kib or (-(-(ref["checkpoint_bytes"] + 64 * 1024) // 4096) * 4 if small else 64 * 1024)
    out.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "chaos-disk", str(out)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        result["error"] = f"cannot mount a tmpfs: {mounted.stderr.strip()}"
        return
    filler = out / "filler"
    try:
        job = Job(args, world, out, extra=["--checkpoint-failures", "2"])
        result["damage"] = f"--out on a {size_kib} KiB tmpfs (a checkpoint is {ref['checkpoint_bytes']} bytes)"
        if small:
            result["faults"] = 1
            result["fault_at"] = job.started
        else:
            committed = re.compile(r"checkpoint committed")
            wait_until(job, lambda: job.first(job.started, committed) is not None, 60)
            # Unbuffered: every byte the filesystem takes stays taken, down to the last one.
            fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                for size in (65536, 4096, 1):
                    block = b"\0" * size
                    try:
                        while os.write(fd, block) > 0:
                            pass
                    except OSError:
                        pass
            finally:
                os.close(fd)
            result["faults"] = 1
            result["fault_at"] = time.monotonic()
        code = job.wait(deadline - time.monotonic())
        note_restarts(job, result)
        result["exits"] = [code]
        result["exit"] = code
        result["workers_started"] = any("worker registered" in line for _, line in job.lines)
        result["restarts"] = None
        result["error"] = job.last_error() or f"exit {code}"
        detected(result, job, result["fault_at"])
        if not small and code != "timeout":
            filler.unlink(missing_ok=True)
            if code != 0:
                resumed = Job(args, world, out, extra=["--resume"])
                finish(resumed, out, result, deadline)
            elif (out / "summary.json").exists():
                s = summary(out)
                result.update(restarts=s["restarts"], steps_lost=s["steps_lost"],
                              checksum=s["final_parameter_checksum"], test_accuracy=s["test_accuracy"])
                result.pop("error", None)
    finally:
        subprocess.run(["umount", "-l", str(out)], check=False)
    result.setdefault("saw", "nothing")


def main() -> None:
    # `--elastic`: random kills and joins at --workers 2:4 (issue 22), in a module of its own.
    if "--elastic" in sys.argv[1:]:
        import chaos_elastic  # noqa: E402  (bench/chaos_elastic.py)
        sys.exit(chaos_elastic.main([a for a in sys.argv[1:] if a != "--elastic"]))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.environ.get("IMDB_DATA"), help="the corpus (default: $IMDB_DATA)")
    p.add_argument("--kind", action="append", choices=list(KINDS) + ["all"],
                   help="fault kind (repeatable; default kill-worker; all = every kind)")
    p.add_argument("--trials", type=int, default=20, help="trials per kind")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--coordinator", type=Path, default=ROOT / "target/release/coordinator")
    p.add_argument("--worker", type=Path, default=ROOT / "target/release/worker")
    p.add_argument("--trial-timeout", type=float, default=180.0)
    p.add_argument("--disk-kib", type=int, help="the tmpfs size of the disk kinds (default: 64 MiB for "
                   "full-disk, one checkpoint + 64 KiB for disk-too-small)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--results", type=Path, help="rewrite the chaos section (kill-worker trials) of this markdown file")
    p.add_argument("--reliability", type=Path, help="rewrite this file (bench/RELIABILITY.md): a row per kind")
    args = p.parse_args()
    args.kind = args.kind or ["kill-worker"]
    kinds = list(KINDS) if "all" in args.kind else list(dict.fromkeys(args.kind))
    if not args.data:
        sys.exit("--data (or IMDB_DATA) must name the corpus")
    for binary in (args.coordinator, args.worker):
        if not binary.is_file():
            sys.exit(f"{binary} is missing: cargo build --release --bins")
    skipped: dict[str, str] = {}
    if any(k in NETWORK_KINDS for k in kinds):
        can = netfaults.check()
        for k in NETWORK_KINDS:
            why = can["latency" if k == "latency" else "partition"]
            if k in kinds and why:
                skipped[k] = why
    for disk_kind in ("full-disk", "disk-too-small"):
        if disk_kind in kinds and os.geteuid() != 0:
            skipped[disk_kind] = "needs root (a tmpfs mount)"
    for k, why in skipped.items():
        print(f"skipped: --kind {k}: {why}")
    rng = random.Random(args.seed)
    args.binaries = binaries(args)
    print(f"binaries: {args.binaries}")
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        work = Path(tmp)
        args.cache = work / "cache"
        refs: dict[int, dict] = {}
        results = []
        # A first run builds the encoded-corpus cache, so that the uninterrupted runs' times
        # (compared with the trials') do not include it.
        reference(args, 2, work)
        print(f"{'kind':>21} {'trial':>5} {'world':>5} {'faults':>6} {'exit':>8} {'restarts':>8} {'lost':>5} "
              f"{'bitwise':>7} {'expected':>8} {'detect':>6} {'seconds':>7}")
        n = 0
        for kind in kinds:
            if kind in skipped:
                continue
            for _ in range(args.trials):
                n += 1
                world = rng.randint(2, 4)
                if world not in refs:
                    refs[world] = reference(args, world, work)
                r = trial(args, kind, n, world, work, refs[world])
                results.append(r)
                exits = "→".join(str(e) for e in r.get("exits", [r["exit"]]))
                print(f"{kind:>21} {n:>5} {world:>5} {r['faults']:>6} {exits:>8} {str(r['restarts']):>8} "
                      f"{str(r.get('steps_lost', '-')):>5} {('yes' if r['bitwise'] else 'NO'):>7} "
                      f"{('yes' if r['as_expected'] else 'NO'):>8} {str(r.get('detect_s', '-')):>6} "
                      f"{r['seconds']:>7}  {short(r.get('saw', ''), 160)}"
                      + (f"  [{r['error']}]" if r.get("error") and r.get("error") != r.get("saw") else ""),
                      flush=True)
        print()
        for kind in kinds:
            rs = [r for r in results if r["kind"] == kind]
            if rs:
                k = kind_row(kind, rs)
                print(f"chaos {kind}: {k['completed']}/{k['trials']} completed, {k['bitwise']}/{k['trials']} bitwise "
                      f"equal, {k['as_expected']}/{k['trials']} as expected, {k['restarts']} restarts, exits "
                      f"{k['exits']}, detected in {k['detect']}")
        args.binaries_after = binaries(args)
        if args.binaries_after != args.binaries:
            print(f"the binaries changed during the run: {args.binaries_after}")
        kills = [r for r in results if r["kind"] == "kill-worker"]
        if args.results and kills:
            write_section(args, kills, sum(1 for r in kills if r["exit"] == 0), sum(1 for r in kills if r["bitwise"]),
                          sum(r["faults"] for r in kills), sum(r["restarts"] or 0 for r in kills), JOB_FLAGS)
        if args.reliability:
            write_reliability(args, kinds, results, refs, skipped, KINDS, JOB_FLAGS, RING_TIMEOUT)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"results": results, "references": refs}, indent=1, default=str))
        if any(not r["as_expected"] for r in results) or args.binaries_after != args.binaries:
            sys.exit(1)


if __name__ == "__main__":
    if sys.argv[1:2] == ["stray"]:
        stray_main(sys.argv[2:])
    else:
        main()
