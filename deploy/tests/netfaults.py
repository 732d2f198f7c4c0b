#!/usr/bin/env python3
"""Network faults inside a network namespace, for the pod harness (run_pods.py) and the chaos
benchmark (bench/chaos.py). Only the standard library; root, `ip`, `tc` and `iptables`.

  * Latency and loss on a device's egress: `tc qdisc ... netem delay D loss P` where the
    kernel has sch_netem. Kernels built without it (CONFIG_NET_SCH_NETEM unset, as on the
    development machines here) get the same fault from a delay line: an iptables NFQUEUE
    rule hands every egress packet to `python3 netfaults.py delay-line`, which holds each one
    for D ms (in arrival order) and drops a fraction P, both in the kernel's queue, so that
    the sending socket never sees an error, as on a lossy wire.
  * A partition: iptables DROP rules in the INPUT chains of the namespaces on both sides,
    so that packets leave and are lost on the way, as on a wire that is cut.

Every change is undone by `close()`; a namespace deleted with its rules needs nothing.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

HERE = os.path.abspath(__file__)


def missing_tools() -> list[str]:
    """The tools the faults need that this machine lacks (Debian: iproute2, iptables)."""
    return [t for t in ("ip", "tc", "iptables") if shutil.which(t) is None]


def in_ns(ns: str | None, *args: str) -> list[str]:
    return (["ip", "netns", "exec", ns] if ns else []) + list(args)


def run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {p.returncode}: {p.stderr.strip()}")
    return p


def iptables(ns: str | None, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    # -w: wait for the xtables lock rather than fail when another iptables runs.
    return run(in_ns(ns, "iptables", "-w", *args), check=check)


class Rules:
    """iptables rules added in order and removed in reverse by `close()`."""

    def __init__(self):
        self.added: list[tuple[str | None, str, list[str]]] = []

    def add(self, ns: str | None, chain: str, *spec: str, table: str = "filter") -> None:
        iptables(ns, "-t", table, "-I", chain, *spec)
        self.added.append((ns, table, [chain, *spec]))

    def close(self) -> None:
        while self.added:
            ns, table, spec = self.added.pop()
            iptables(ns, "-t", table, "-D", *spec, check=False)


def partition(rules: Rules, sides: list[tuple[str | None, list[str]]]) -> None:
    """Drops, on arrival, what each namespace receives that matches one of its specs (each
    spec a list of iptables match arguments)."""
    for ns, specs in sides:
        for spec in specs:
            rules.add(ns, "INPUT", *spec, "-j", "DROP")


class Latency:
    """`delay_ms` of delay and a `loss` fraction on the egress of `dev` in namespace `ns`
    (`match`: extra iptables arguments that narrow the packets, delay line only)."""

    def __init__(self, ns: str | None, dev: str, delay_ms: float, loss: float, seed: int = 1,
                 queue: int = 7, match: list[str] | None = None, prefer: str = "auto"):
        self.ns, self.dev, self.delay_ms, self.loss, self.seed = ns, dev, delay_ms, loss, seed
        self.queue, self.match, self.prefer = queue, match or [], prefer
        self.how = None
        self.rules = Rules()
        self.line: subprocess.Popen | None = None
        self.netem_error = None

    def start(self) -> str:
        """Applies the fault; returns how it was made."""
        if self.prefer in ("auto", "netem") and not self.match:
            p = run(in_ns(None, "tc", *(["-n", self.ns] if self.ns else []), "qdisc", "add", "dev", self.dev,
                          "root", "netem", "delay", f"{self.delay_ms:g}ms", "loss", f"{self.loss * 100:g}%"),
                    check=False)
            if p.returncode == 0:
                self.how = f"tc netem delay {self.delay_ms:g}ms loss {self.loss * 100:g}% on {self.dev}"
                return self.how
            self.netem_error = p.stderr.strip()
            if self.prefer == "netem":
                raise RuntimeError(f"tc netem refused: {self.netem_error}")
        self.line = subprocess.Popen(
            in_ns(self.ns, sys.executable, HERE, "delay-line", "--queue", str(self.queue),
                  "--delay-ms", str(self.delay_ms), "--loss", str(self.loss), "--seed", str(self.seed)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ready = self.line.stdout.readline()
        if not ready.startswith("ready"):
            err = self.line.stderr.read()
            raise RuntimeError(f"the delay line did not start: {ready.strip()} {err.strip()}")
        # On arrival, not on departure: a packet held on the sending host still counts
        # against its socket (TCP small queues), which would let only two packets a socket
        # through per delay. Past the veth (or lo) it belongs to no socket any more.
        self.rules.add(self.ns, "PREROUTING", "-i", self.dev, *self.match, "-j", "NFQUEUE",
                       "--queue-num", str(self.queue), table="mangle")
        why = f" (tc netem: {self.netem_error})" if self.netem_error else ""
        self.how = (f"NFQUEUE delay line, {self.delay_ms:g} ms and {self.loss * 100:g}% loss on what arrives on "
                    f"{self.dev}{' ' + ' '.join(self.match) if self.match else ''}{why}")
        return self.how

    def close(self) -> str:
        """Removes the fault; returns the delay line's counts (empty for netem)."""
        stats = ""
        if self.how and self.how.startswith("tc netem"):
            run(in_ns(None, "tc", *(["-n", self.ns] if self.ns else []), "qdisc", "del", "dev", self.dev, "root"),
                check=False)
        self.rules.close()
        if self.line is not None:
            if self.line.poll() is None:
                self.line.send_signal(signal.SIGTERM)
            try:
                out, _ = self.line.communicate(timeout=10)
                stats = out.strip()
            except subprocess.TimeoutExpired:
                self.line.kill()
                self.line.communicate()
            self.line = None
        self.how = None
        return stats


def check() -> dict[str, str | None]:
    """Whether the faults can be made here: {"partition": why not or None, "latency": ...},
    tried in a scratch network namespace (iptables works, a delay is really applied)."""
    missing = missing_tools()
    if os.geteuid() != 0:
        return dict.fromkeys(("partition", "latency"), "needs root (network namespaces, iptables)")
    if missing:
        why = f"missing {' '.join(missing)} (apt-get install iproute2 iptables)"
        return dict.fromkeys(("partition", "latency"), why)
    ns = f"nfcheck{os.getpid()}"
    p = run(["ip", "netns", "add", ns], check=False)
    if p.returncode != 0:
        return dict.fromkeys(("partition", "latency"), f"cannot add a network namespace: {p.stderr.strip()}")
    out: dict[str, str | None] = {}
    try:
        run(["ip", "-n", ns, "link", "set", "lo", "up"])
        p = iptables(ns, "-L", "INPUT", check=False)
        out["partition"] = None if p.returncode == 0 else f"iptables does not work here: {p.stderr.strip()}"
        lat = Latency(ns, "lo", 30, 0.0)
        try:
            how = lat.start()
            took = connect_ms(ns, "127.0.0.1", 9)
            out["latency"] = None if took >= 27 else f"{how} did not delay a TCP handshake ({took:.1f} ms)"
        except (RuntimeError, OSError, ValueError) as e:
            out["latency"] = f"cannot delay packets: {e}"
        finally:
            lat.close()
    finally:
        run(["ip", "netns", "del", ns], check=False)
    return out


def connect_ms(ns: str | None, host: str, port: int, timeout: float = 5.0) -> float:
    """Milliseconds a TCP handshake from namespace `ns` to host:port takes (a refused
    connection counts: its RST answers the SYN just the same)."""
    code = (
        "import socket,time,sys\n"
        f"t=time.monotonic()\n"
        f"s=socket.socket();s.settimeout({timeout})\n"
        f"try: s.connect(({host!r},{port}))\n"
        "except ConnectionRefusedError: pass\n"
        "print((time.monotonic()-t)*1000)\n"
    )
    p = run(in_ns(ns, sys.executable, "-c", code))
    return float(p.stdout.strip())


# --- the delay line: a minimal NFQUEUE client over raw netlink ---------------------------

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_CONFIG, NFQNL_MSG_VERDICT_BATCH = 0, 2, 3
NFQNL_MSG_VERDICT = 1
NFQA_PACKET_HDR, NFQA_VERDICT_HDR = 1, 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN = 1, 2, 3
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2
NF_DROP, NF_ACCEPT = 0, 1
SO_RCVBUFFORCE = 33


class Queue:
    def __init__(self, num: int):
        self.num = num
        self.seq = 0
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)

    def send(self, msg_type: int, flags: int, attrs: list[tuple[int, bytes]]) -> int:
        self.seq += 1
        payload = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(self.num))
        for t, data in attrs:
            a = struct.pack("=HH", 4 + len(data), t) + data
            payload += a + b"\0" * (-len(a) % 4)
        hdr = struct.pack("=IHHII", 16 + len(payload), (NFNL_SUBSYS_QUEUE << 8) | msg_type, flags, self.seq, 0)
        self.sock.send(hdr + payload)
        return self.seq

    def configure(self, msg_attrs: list[tuple[int, bytes]]) -> None:
        seq = self.send(NFQNL_MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, msg_attrs)
        while True:
            for mtype, mseq, body in self.messages(self.sock.recv(65536)):
                if mtype == NLMSG_ERROR and mseq == seq:
                    err = struct.unpack("=i", body[:4])[0]
                    if err:
                        raise OSError(-err, f"nfqueue config: {os.strerror(-err)}")
                    return

    @staticmethod
    def messages(data: bytes):
        off = 0
        while off + 16 <= len(data):
            length, mtype, _flags, seq, _pid = struct.unpack_from("=IHHII", data, off)
            if length < 16:
                break
            yield mtype, seq, data[off + 16:off + length]
            off += (length + 3) & ~3

    def bind(self) -> None:
        self.configure([(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, 0))])
        self.configure([(NFQA_CFG_PARAMS, struct.pack("!IB", 0xFFFF, NFQNL_COPY_META))])
        self.configure([(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", 1 << 16))])

    def packet_ids(self, data: bytes):
        for mtype, _seq, body in self.messages(data):
            if mtype != (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                continue
            off = 4  # nfgenmsg
            while off + 4 <= len(body):
                alen, atype = struct.unpack_from("=HH", body, off)
                if alen < 4:
                    break
                if atype & 0x3FFF == NFQA_PACKET_HDR:
                    yield struct.unpack_from("!I", body, off + 4)[0]
                    break
                off += (alen + 3) & ~3

    def verdict(self, packet_id: int, verdict: int, batch: bool = False) -> None:
        self.send(NFQNL_MSG_VERDICT_BATCH if batch else NFQNL_MSG_VERDICT, NLM_F_REQUEST,
                  [(NFQA_VERDICT_HDR, struct.pack("!II", verdict, packet_id))])


def delay_line(args: argparse.Namespace) -> int:
    """Holds every packet of the queue for --delay-ms (first in, first out) and drops a
    --loss fraction of them; prints its counts when it gets SIGTERM."""
    q = Queue(args.queue)
    q.bind()
    rng = random.Random(args.seed)
    delay = args.delay_ms / 1000.0
    pending: collections.deque[tuple[float, int]] = collections.deque()
    counts = {"packets": 0, "dropped": 0, "overruns": 0}
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    print("ready", flush=True)
    while not stop:
        now = time.monotonic()
        wait = max(0.0, pending[0][0] - now) if pending else 0.5
        try:
            readable, _, _ = select.select([q.sock], [], [], wait)
        except InterruptedError:
            continue
        if readable:
            try:
                data = q.sock.recv(1 << 20)
            except OSError:  # ENOBUFS: the kernel dropped packets it could not hand over
                counts["overruns"] += 1
                data = b""
            arrived = time.monotonic()
            for pid in q.packet_ids(data):
                counts["packets"] += 1
                if rng.random() < args.loss:
                    counts["dropped"] += 1
                    q.verdict(pid, NF_DROP)
                else:
                    pending.append((arrived + delay, pid))
        now = time.monotonic()
        last = None
        while pending and pending[0][0] <= now:
            last = pending.popleft()[1]
        if last is not None:
            # Every packet still queued with an id up to `last` is due (ids grow with arrival,
            # and the dropped ones already have their verdict).
            q.verdict(last, NF_ACCEPT, batch=True)
    # Let what is held go on its way rather than drop it with the queue.
    if pending:
        q.verdict(pending[-1][1], NF_ACCEPT, batch=True)
    print(f"delay line: {counts['packets']} packets, {counts['packets'] - counts['dropped']} delayed "
          f"{args.delay_ms:g} ms, {counts['dropped']} dropped, {counts['overruns']} overruns", flush=True)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("delay-line", help="serve an NFQUEUE queue: delay and drop its packets")
    d.add_argument("--queue", type=int, required=True)
    d.add_argument("--delay-ms", type=float, required=True)
    d.add_argument("--loss", type=float, default=0.0)
    d.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    return delay_line(args)


if __name__ == "__main__":
    sys.exit(main())
