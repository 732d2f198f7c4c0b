#!/usr/bin/env python3
"""Runs the pods of the rendered deploy/overlays/cpu as real processes, one network
namespace per pod, as a cluster would run them (no cluster needed; root needed).

For N workers (--workers, default 2) it renders overlays/cpu with N (MIN = MAX = N: the
worker Job's completions and successPolicy) and the job config replaced by
configs/test-tiny.toml, then for every pod of both Jobs:
  * a network namespace with its own IP on a private bridge, which itself lives in a
    namespace of its own: nothing touches the host's network, and traffic stays inside;
  * an /etc/hosts holding what cluster DNS would serve (<pod host>.<subdomain> for every
    pod), an empty resolv.conf, and the pod's host name (a UTS namespace);
  * the environment as the kubelet builds it: literal values, fieldRef (pod IP, name,
    completion index annotation), secretKeyRef and configMapKeyRef, resourceFieldRef, then
    `$(VAR)` expansion in env values and args, plus the Job controller's
    JOB_COMPLETION_INDEX;
  * a read-only root (a tmpfs root, remounted read-only, with the host's /usr, /lib and
    /etc bound read-only, the image's /usr/local/bin/{coordinator,worker} mapped to the
    built binaries and libtorch at the path their RUNPATH names), the pod's volumes
    (ConfigMap and Secret files read-only, emptyDirs writable and owned by fsGroup), all
    in a private mount namespace that dies with the pod;
  * runAsUser/runAsGroup/fsGroup, no_new_privs and no capabilities through setpriv.
The corpus is the one thing added: there is no internet here, so the coordinator pod gets
IMDB_DATA and the shared corpus bound read-only at /corpus (a cluster downloads it).

Then it asserts that the coordinator pod exits 0 and that summary.json shows the world size
and equal replica checksums; with --kill-worker, worker pod 1 is killed (SIGKILL) once a
checkpoint is committed (the test config checkpoints every 3 steps) and a new pod 1 is
started (a new IP, as the Job controller would): the job must finish through a restart of
the group from that checkpoint, bitwise equal to the uninterrupted run. Every namespace, process and folder is
removed on exit, also on failure or Ctrl-C.

With --class-folders, N = 2 runs once more on a corpus of one folder per class (IMDB's
ratings as four classes, cut from the tarball at test time, bound at /corpus/reviews): the
run must end with labels.json holding the four class names and a 4x4 confusion matrix and a
macro-F1 in summary.json, as a team's own data would train on a cluster.

With --fault (repeatable; netfaults.py beside this file makes the network faults), the job
runs again under a fault and must end bitwise equal to the whole run of its N (the same
final_parameter_checksum and test_accuracy in summary.json). Worker pod 1 is the victim; the
detected faults run with COORDINATOR_HEARTBEAT_TIMEOUT=5 and WORKER_RING_TIMEOUT=5 (env
patches of the overlay, --heartbeat-timeout/--ring-timeout), and during them the harness is
the worker Job's controller too: a failed worker pod is replaced by a new one (new IP) as
the rendered podFailurePolicy and backoffLimit say.
  * latency: 50 ms of delay and 1% packet loss on worker pod 1 from its start (tc netem
    where the kernel has it, else an NFQUEUE delay line on what the pod receives; a TCP
    handshake from the pod must take the delay). Expected: no restart, only slower.
  * partition-ring: after a checkpoint, worker pod 1 and its ring peers drop each other's
    packets to and from the ring port (iptables DROP on arrival, both sides); the
    coordinator keeps its sessions. Expected: the coordinator names rank 1 within the ring
    timeout (+ --detect-slack), restarts the group, and the partition is healed after
    longer than the ring timeout.
  * partition-coordinator: the same between worker pod 1 and the coordinator (all
    traffic), the ring up. Expected: named within the heartbeat timeout, a restart.
  * sigstop-coordinator: the coordinator stopped (SIGSTOP) for --stop-seconds (30), then
    SIGCONT. Expected: nothing corrupt; it ends equal, with or without a restart (the
    workers give up on a silent coordinator after its heartbeat timeout and their pods are
    replaced).
--json writes what each run saw (how the fault was made, time to detect, the coordinator's
first line about it, restarts, pods replaced).

With --image-bundle (an unpacked OCI image, as `make image` makes), the pods run from the
image instead: its folders are the read-only root and its environment comes first.

The pods themselves (the bridge namespace, the render, each pod's environment, root and
isolation) are in pods.py beside this file; this file runs jobs with them. elastic_pods.py
runs elastic jobs (--workers MIN:MAX: a pod deleted and not replaced, a pod added) with the
same machinery (Run, run(), render's min_workers).

Skips (exit 0, with a line saying why) when not root or a tool is missing; a fault whose
tools or permissions are missing (iptables, root) is skipped with a line that says so.
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

try:
    import yaml
except ImportError:
    yaml = None

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import netfaults  # noqa: E402  (beside this file)
import pods  # noqa: E402  (beside this file: the pods themselves)
from pods import (  # noqa: E402
    CLUSTER_DOMAIN,
    NAMESPACE,
    RATING_CLASSES,
    REPO,
    Cluster,
    Pod,
    check_isolation,
    load_image,
    log,
    make_class_folders,
    read_log,
    render,
    sh,
    start_pod,
)


# What each scenario does (after the first committed checkpoint unless it says otherwise)
# and the letter that keeps its namespaces' names apart.
SCENARIOS = {
    None: ("", ""),
    "kill-worker": ("k", "worker pod 1 killed after a checkpoint and replaced"),
    "latency": ("l", "{latency_ms:g} ms of latency and {loss_pct:g}% packet loss on worker pod 1 from its start"),
    "partition-ring": ("r", "worker pod 1 cut off from its ring peers (port {ring_port}) after a checkpoint"),
    "partition-coordinator": ("c", "worker pod 1 cut off from the coordinator (its ring up) after a checkpoint"),
    "sigstop-coordinator": ("s", "the coordinator stopped (SIGSTOP) for {stop_seconds:g} s after a checkpoint, then continued"),
    "class-folders": ("f", "a corpus of 4 class folders (IMDB's ratings 1-2, 3-4, 7-8, 9-10) instead of the tarball"),
}
FAULTS = [k for k in SCENARIOS if k not in (None, "kill-worker", "class-folders")]
# The faults that must be detected: they run with short timeouts (set through the pods' env).
DETECTED = ["partition-ring", "partition-coordinator", "sigstop-coordinator"]
# A coordinator line that names a fault (generic WARN lines, such as an upload that broke
# off, can come first and name nothing).
PROBLEM = re.compile(r"restart \d+/\d+|^error|lost|failed|timed out|unreachable|hung", re.I)


def run(args, workers, scenario=None, run_class=None):
    """One job in a cluster of its own (`run_class`, default Run, plays it), torn down after."""
    tag = f"{os.getpid() % 10000}{workers}{SCENARIOS[scenario][0]}"
    work = tempfile.mkdtemp(prefix=f"pods-{tag}-")
    os.chmod(work, 0o755)
    cluster = Cluster(work, tag)

    def on_signal(signum, frame):
        cluster.close()
        sys.exit(128 + signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return (run_class or Run)(cluster, args, workers, scenario).go()
    finally:
        cluster.close()
        for s, h in old.items():
            signal.signal(s, h)


class Run:
    """One job: its pods, the Job controller's part where a fault needs it, the fault, and
    the checks of how the job ended."""

    def __init__(self, cluster, args, workers, scenario, min_workers=None, env=None):
        """`min_workers` makes the job elastic (--workers MIN:workers); `env` adds variables
        to the Jobs' containers ({job name: {name: value}})."""
        self.cluster, self.args, self.workers, self.scenario = cluster, args, workers, scenario
        if scenario in DETECTED:
            env = {
                "imdb-ddp-coordinator": {"COORDINATOR_HEARTBEAT_TIMEOUT": f"{args.heartbeat_timeout:g}"},
                "imdb-ddp-workers": {"WORKER_RING_TIMEOUT": f"{args.ring_timeout:g}"},
            }
        self.docs = render(workers, cluster.work, env, min_workers)
        self.corpus = args.corpus
        if scenario == "class-folders":
            self.corpus = make_class_folders(args.corpus, os.path.join(cluster.work, "reviews"))
        jobs = {d["metadata"]["name"]: d for d in self.docs if d["kind"] == "Job"}
        self.svc = next(d for d in self.docs if d["kind"] == "Service")
        self.coord_job, self.worker_job = jobs["imdb-ddp-coordinator"], jobs["imdb-ddp-workers"]
        worker = self.worker_job["spec"]["template"]["spec"]["containers"][0]
        self.ring_port = next(p["containerPort"] for p in worker["ports"] if p["name"] == "ring")
        self.what = f"overlays/cpu, N = {workers}"
        if scenario:
            self.what += ", " + SCENARIOS[scenario][1].format(
                latency_ms=args.latency_ms, loss_pct=args.loss * 100, ring_port=self.ring_port,
                stop_seconds=args.stop_seconds)
        if env:
            self.what += " (" + ", ".join(f"{k}={v}" for e in env.values() for k, v in e.items()) + ")"
        n = self.worker_job["spec"]["completions"]
        assert n == workers, f"rendered {n} workers, expected {workers}"
        self.secrets = {"imdb-ddp-job-secret": {"job-secret": os.urandom(16).hex() + "\n"}}
        self.binaries = {
            "/usr/local/bin/coordinator": os.path.join(args.bin_dir, "coordinator"),
            "/usr/local/bin/worker": os.path.join(args.bin_dir, "worker"),
        }
        self.pods = [Pod(self.coord_job, 0, self.docs, self.secrets)] + [
            Pod(self.worker_job, i, self.docs, self.secrets) for i in range(n)
        ]
        self.every_worker_pod = list(self.pods[1:])
        self.nets = {}
        self.procs = {}
        # The Job controller: a failed worker pod is replaced unless its exit code fails the
        # Job (podFailurePolicy FailJob), at most backoffLimit times.
        self.controller = scenario in FAULTS
        policy = self.worker_job["spec"].get("podFailurePolicy", {}).get("rules", [])
        self.fail_job_codes = {c for r in policy if r["action"] == "FailJob" for c in r.get("onExitCodes", {}).get("values", [])}
        self.backoff_limit = self.worker_job["spec"].get("backoffLimit", 6)
        self.replaced = 0
        self.report = {"scenario": scenario or "none", "workers": workers}
        self.latency = None

    def hosts_file(self):
        # What cluster DNS serves for the headless Service: <hostname>.<subdomain>[.<ns>.svc...]
        lines = []
        for p in self.pods:
            sub = p.spec.get("subdomain")
            names = [p.hostname]
            if sub:
                fq = f"{p.hostname}.{sub}"
                names = [fq, f"{fq}.{NAMESPACE}.svc.{CLUSTER_DOMAIN}"] + names
            lines.append(f"{self.nets[p.hostname][1]} {' '.join(names)}\n")
        return "".join(lines)

    def start(self, pod):
        self.procs[pod.hostname] = start_pod(
            self.cluster, pod, self.hosts_file(), self.binaries, self.corpus, *self.nets[pod.hostname]
        )

    def replace(self, slot, why):
        """A new pod for the index of self.pods[slot], with a new namespace and IP."""
        old = self.pods[slot]
        self.cluster.remove_namespace(self.nets[old.hostname][0])
        new = Pod(self.worker_job, old.index, self.docs, self.secrets)
        self.replaced += 1
        self.nets[new.hostname] = self.cluster.add_pod_network(f"{new.hostname}r{self.replaced}")
        self.pods[slot] = new
        self.every_worker_pod.append(new)
        log(f"pod {old.name} {why}; the Job controller starts a new pod for index {old.index}")
        self.start(new)

    def controller_tick(self):
        if not self.controller:
            return
        for slot in range(1, len(self.pods)):
            pod = self.pods[slot]
            code = self.procs[pod.hostname].poll()
            if code is None or code == 0:
                continue
            if code in self.fail_job_codes:
                self.fail(f"worker pod {pod.name} exited {code}, which fails the Job (podFailurePolicy)")
            if self.replaced >= self.backoff_limit:
                self.fail(f"worker pod {pod.name} exited {code} after backoffLimit {self.backoff_limit} replacements")
            self.replace(slot, f"exited {code}")

    def coordinator_log(self):
        return read_log(self.cluster, self.pods[0])

    def ended_cleanly(self, code):
        """The coordinator's log and each worker pod's exit code, once all exited 0 (else the
        run fails)."""
        clog = self.coordinator_log()
        worker_codes = {}
        for p in self.pods[1:]:
            try:
                worker_codes[p.name] = self.procs[p.hostname].wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker_codes[p.name] = None
        if code != 0 or any(c != 0 for c in worker_codes.values()):
            self.fail(f"coordinator exit {code}, workers {worker_codes}")
        return clog, worker_codes

    def fail(self, message):
        for p in self.every_worker_pod:
            code = self.procs[p.hostname].poll() if self.procs.get(p.hostname) else None
            print(f"--- {p.name} (exit {code}):\n{read_log(self.cluster, p)[-3000:]}")
        raise SystemExit(f"FAIL: {self.what}: {message}\n{self.coordinator_log()[-6000:]}")

    def until(self, cond, limit, what):
        """Yields (to the main loop) until cond() holds; fails after `limit` seconds."""
        end = time.time() + limit
        while not cond():
            if time.time() > end:
                self.fail(f"{what}: not within {limit:g} s")
            yield

    def first_problem(self, mark):
        """The first line of the coordinator's log after offset `mark` that says something
        went wrong, or None."""
        for line in self.coordinator_log()[mark:].splitlines():
            if PROBLEM.search(line):
                return line
        return None

    def go(self):
        log(f"--- {self.what}")
        self.cluster.setup_bridge()
        self.nets = {p.hostname: self.cluster.add_pod_network(p.hostname) for p in self.pods}
        assert self.svc["spec"]["clusterIP"] == "None"
        if self.scenario == "latency":
            self.start_latency()
        self.started = time.time()
        for p in self.pods:
            self.start(p)
        steps = self.steps()
        deadline = time.time() + self.args.timeout
        code = None
        while True:
            self.controller_tick()
            if steps is not None:
                try:
                    next(steps)
                except StopIteration:
                    steps = None
            code = self.procs[self.pods[0].hostname].poll()
            if code is not None:
                break
            if time.time() > deadline:
                break
            time.sleep(0.05)
        seconds = time.time() - self.started
        if self.latency is not None:
            stats = self.latency.close()
            self.cluster.faults.remove(self.latency)
            self.report["fault_counts"] = stats
            log(f"latency removed{': ' + stats if stats else ''}")
        if steps is not None:
            self.fail(f"the job ended (coordinator exit {code}) before the fault's steps were done")
        return self.check(code, seconds)

    def start_latency(self):
        victim = self.pods[2]
        ns = self.nets[victim.hostname][0]
        self.latency = netfaults.Latency(ns, "eth0", self.args.latency_ms, self.args.loss, seed=self.workers)
        self.cluster.faults.append(self.latency)
        how = self.latency.start()
        # The fault is real: a TCP handshake from the pod now takes the delay.
        coordinator_ip = self.nets[self.pods[0].hostname][1]
        probe = netfaults.connect_ms(ns, coordinator_ip, 50051)
        log(f"fault on pod {victim.name}: {how}; a TCP handshake from it to the coordinator's IP took {probe:.1f} ms")
        if probe < 0.9 * self.args.latency_ms:
            self.fail(f"the latency is not in effect: a TCP handshake took {probe:.1f} ms")
        self.report.update(how=how, probe_ms=round(probe, 1))

    def steps(self):
        """The scenario, as a generator that yields while it waits."""
        trigger = "checkpoint committed" if self.scenario not in (None, "latency") else "epoch started"
        coordinator = self.pods[0]
        yield from self.until(lambda: trigger in self.coordinator_log(), 300, f"the coordinator's log never said '{trigger}'")
        for p in self.pods[:2]:
            check_isolation(p, self.procs[p.hostname].pid, self.nets[p.hostname][1])
        victim = self.pods[2]
        v_ns, v_ip = self.nets[victim.hostname]
        c_ns, c_ip = self.nets[coordinator.hostname]
        if self.scenario == "kill-worker":
            self.procs[victim.hostname].kill()
            code = self.procs[victim.hostname].wait()
            self.replace(2, f"killed (exit {code})")
        elif self.scenario in ("partition-ring", "partition-coordinator"):
            rules = netfaults.Rules()
            self.cluster.faults.append(rules)
            if self.scenario == "partition-ring":
                peers = [self.nets[p.hostname] for p in self.pods[1:] if p is not victim]
                port = str(self.ring_port)
                ring = lambda ip: [["-s", ip, "-p", "tcp", "--sport", port], ["-s", ip, "-p", "tcp", "--dport", port]]
                sides = [(v_ns, [spec for _, ip in peers for spec in ring(ip)])] + [(ns, ring(v_ip)) for ns, _ in peers]
                limit = self.args.ring_timeout
            else:
                sides = [(v_ns, [["-s", c_ip]]), (c_ns, [["-s", v_ip]])]
                limit = max(self.args.heartbeat_timeout, self.args.ring_timeout)
            mark = len(self.coordinator_log())
            netfaults.partition(rules, sides)
            t0 = time.time()
            log(f"fault: {SCENARIOS[self.scenario][1].format(ring_port=self.ring_port)}: iptables DROP on arrival, "
                + "; ".join(f"in {ns}: {len(specs)} rule(s)" for ns, specs in sides))
            yield from self.until(lambda: self.first_problem(mark), limit + 30, "the coordinator never named the fault")
            line = self.first_problem(mark)
            detect = time.time() - t0
            log(f"detected after {detect:.1f} s (timeout {limit:g} s): {line.strip()}")
            self.report.update(detect_seconds=round(detect, 1), detect_line=line.strip())
            # Held for longer than the collective (or heartbeat) timeout, then healed.
            yield from self.until(lambda: time.time() >= t0 + limit + 1, limit + 2, "")
            rules.close()
            self.cluster.faults.remove(rules)
            log(f"partition healed after {time.time() - t0:.1f} s")
            # Named within the timeout (plus the heartbeat tick, the 0.7 s the coordinator
            # gathers the ranks' reports in, and debug binaries on a busy machine).
            if detect > limit + self.args.detect_slack:
                self.fail(f"detected after {detect:.1f} s, more than the timeout {limit:g} s + {self.args.detect_slack:g} s")
            named = [f"rank {victim.index}", v_ip]
            if not any(n in line for n in named):
                self.fail(f"the coordinator's first line about the fault names neither of {named}: {line}")
        elif self.scenario == "sigstop-coordinator":
            pid = self.procs[coordinator.hostname].pid
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
            if comm != "coordinator":
                self.fail(f"pid {pid} is {comm}, not the coordinator")
            mark = len(self.coordinator_log())
            os.kill(pid, signal.SIGSTOP)
            t0 = time.time()
            log(f"fault: coordinator (pid {pid}) stopped with SIGSTOP")
            yield from self.until(lambda: time.time() >= t0 + self.args.stop_seconds, self.args.stop_seconds + 1, "")
            os.kill(pid, signal.SIGCONT)
            log(f"coordinator continued (SIGCONT) after {time.time() - t0:.1f} s")
            # Who noticed: the workers (the coordinator's silence), then the coordinator.
            lost = [
                (p.name, line)
                for p in self.every_worker_pod
                for line in read_log(self.cluster, p).splitlines()
                if "lost the coordinator" in line
            ]
            if lost:
                log(f"the workers noticed: {lost[0][0]}: {lost[0][1].strip()}")
                self.report["workers_saw"] = lost[0][1].strip()
            yield from self.until(lambda: self.first_problem(mark), 60, "the coordinator never said what it found")
            line = self.first_problem(mark)
            self.report.update(detect_seconds=round(time.time() - t0, 1), detect_line=line.strip())
            log(f"the coordinator's first line after it continued: {line.strip()}")

    def check(self, code, seconds):
        clog, _ = self.ended_cleanly(code)
        run_dir = os.path.join(self.cluster.work, self.pods[0].name, "volumes", "run", "run")
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
        n = self.workers
        sums = summary.get("replica_checksums", [])
        ok = summary.get("world_size") == n and len(sums) == n and len(set(sums)) == 1
        restarts = summary.get("restarts")
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f if line.strip()]
        resumed = next((r["resumed_from_global_step"] for r in records if r.get("type") == "restart"), None)
        if self.scenario == "kill-worker":
            ok = ok and restarts == 1 and bool(resumed)
        elif self.scenario == "latency":
            # Only slower: no restart.
            ok = ok and restarts == 0
        elif self.scenario in ("partition-ring", "partition-coordinator"):
            ok = ok and restarts >= 1
        elif self.scenario == "class-folders":
            # The classes came from the folders, and the 4-class metrics came out.
            with open(os.path.join(run_dir, "labels.json")) as f:
                labels = json.load(f)
            confusion = summary.get("test_metrics", {}).get("confusion", [])
            ok = ok and labels == sorted(set(RATING_CLASSES.values())) and len(confusion) == 4
            ok = ok and "macro_f1" in summary.get("test_metrics", {})
        if not ok:
            self.fail(f"summary {json.dumps(summary)}")
        ranks = re.findall(r"worker registered rank=(\d+) hostname=(\S+)", clog)
        for rank, host in ranks:
            if host != f"imdb-ddp-workers-{rank}":
                self.fail(f"rank {rank} registered from pod {host}")
        log(
            f"ok: {self.what}: coordinator exit 0 in {seconds:.0f} s, world_size {n}, "
            f"replica checksums equal ({sums[0]}), restarts {restarts}"
            + (f" (resumed at step {resumed})" if resumed else "")
            + (f", {self.replaced} pod(s) replaced" if self.controller else "")
            + ", pod i = rank i "
            f"({len(ranks)} registrations), test accuracy {summary.get('test_accuracy')}"
        )
        self.report.update(
            exit=code, seconds=round(seconds, 1), restarts=restarts, pods_replaced=self.replaced,
            checksum=summary.get("final_parameter_checksum"), test_accuracy=summary.get("test_accuracy"),
        )
        return summary, self.report


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, action="append", help="N (repeatable; default 2)")
    parser.add_argument("--kill-worker", action="store_true", help="also run with worker pod 1 killed and replaced")
    parser.add_argument("--class-folders", action="store_true",
                        help="also run N = 2 on a 4-class corpus of class folders cut from the tarball")
    parser.add_argument("--bin-dir", default=os.path.join(REPO, "target", "debug"))
    parser.add_argument("--corpus", default=os.environ.get("IMDB_DATA"))
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument(
        "--image-bundle", help="run the pods from this unpacked OCI image (umoci unpack) instead of the built binaries"
    )
    faults = parser.add_argument_group("network and process faults (each run compared with the whole run of its N)")
    faults.add_argument("--fault", action="append", choices=FAULTS, default=[], help="repeatable")
    faults.add_argument("--fault-workers", type=int, action="append", help="the N the faults run with (default: every --workers)")
    faults.add_argument("--latency-ms", type=float, default=50.0)
    faults.add_argument("--loss", type=float, default=0.01, help="packet loss fraction with --fault latency")
    faults.add_argument("--heartbeat-timeout", type=float, default=5.0, help="COORDINATOR_HEARTBEAT_TIMEOUT of the detected faults")
    faults.add_argument("--ring-timeout", type=float, default=5.0, help="WORKER_RING_TIMEOUT of the detected faults")
    faults.add_argument("--detect-slack", type=float, default=5.0, help="seconds past the timeout a detection may take")
    faults.add_argument("--stop-seconds", type=float, default=30.0, help="how long --fault sigstop-coordinator stops it")
    faults.add_argument("--json", help="write every run's report here")
    args = parser.parse_args()
    missing = [t for t in ["kubectl", "ip", "unshare", "setpriv", "chroot", "mount"] if shutil.which(t) is None]
    if os.geteuid() != 0:
        print("skipped: the pods in network namespaces need root (ip netns, mount, setpriv)")
        return 0
    if missing or yaml is None:
        print(f"skipped: pods in network namespaces: missing {missing or ['PyYAML']}")
        return 0
    if not args.corpus or not os.path.exists(args.corpus):
        print("skipped: pods in network namespaces: IMDB_DATA not set (there is no internet to download it)")
        return 0
    args.corpus = os.path.realpath(args.corpus)
    if args.image_bundle:
        pods.IMAGE = load_image(os.path.realpath(args.image_bundle))
        log(f"pods run from the image at {args.image_bundle}")
    for b in [] if args.image_bundle else ["coordinator", "worker"]:
        if not os.path.isfile(os.path.join(args.bin_dir, b)):
            print(f"skipped: {args.bin_dir}/{b} is not built (cargo build --workspace --bins)")
            return 0
    try:
        sh("ip", "netns", "list", capture_output=True)
    except (subprocess.CalledProcessError, OSError) as e:
        print(f"skipped: network namespaces unavailable: {e}")
        return 0
    faults = list(dict.fromkeys(args.fault))
    network = [f for f in faults if f != "sigstop-coordinator"]
    if network:
        can = netfaults.check()
        for f in network:
            why = can["latency" if f == "latency" else "partition"]
            if why:
                print(f"skipped: --fault {f}: {why}")
                faults.remove(f)
    reports = []
    for n in args.workers or [2]:
        whole, report = run(args, n)
        reports.append(report)
        scenarios = (["kill-worker"] if args.kill_worker else []) + (
            faults if n in (args.fault_workers or args.workers or [2]) else []
        )
        for scenario in scenarios:
            other, report = run(args, n, scenario)
            # On the CPU a run restarted from its checkpoint (or slowed down) ends bitwise
            # equal: the same final parameters and the same test accuracy.
            a = (whole["final_parameter_checksum"], whole["test_accuracy"])
            b = (other["final_parameter_checksum"], other["test_accuracy"])
            report["bitwise_equal"] = a == b
            reports.append(report)
            if args.json:
                write_json(args.json, reports)
            if a != b:
                raise SystemExit(f"FAIL: N = {n}, {scenario}: the run ended with {b}, the whole run with {a}")
            log(f"ok: N = {n}, {scenario}: ends bitwise equal to the whole run (checksum {a[0]}, test accuracy {a[1]})")
    if args.class_folders:
        summary, report = run(args, 2, "class-folders")
        reports.append(report)
        metrics = summary["test_metrics"]
        log(f"ok: N = 2, class folders: {len(metrics['confusion'])} classes from the folders, "
            f"test macro-F1 {metrics['macro_f1']:.3f}, confusion {metrics['confusion']}")
    if args.json:
        write_json(args.json, reports)
    return 0


def write_json(path, reports):
    with open(path, "w") as f:
        json.dump(reports, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
