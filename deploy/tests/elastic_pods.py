#!/usr/bin/env python3
"""Elastic jobs (`--workers MIN:MAX`) as pods of the rendered deploy/overlays/cpu, run as real
processes in network namespaces by run_pods.py's machinery (root needed; no cluster).

overlays/cpu is rendered with MAX worker pods (the worker Job's completions) and MIN (its
successPolicy's succeededCount), so that the coordinator's TRAINER_WORKERS is "MIN:MAX", with
configs/test-tiny.toml (checkpoints every 3 steps) and, as env patches of the overlay,
TRAINER_EPOCHS (--epochs, 4: time for a pod to join) and the case's short wait.
Two cases (--case, repeatable; default both):

  * pod-deleted (COORDINATOR_REJOIN_TIMEOUT=--rejoin-timeout, 5 s): MAX worker pods; once
    a checkpoint is committed, worker pod --victim (default 1: a pod in the middle, so
    that a survivor's index lies past the new world size) is deleted as the kubelet deletes
    a pod (SIGTERM, SIGKILL after the pod's terminationGracePeriodSeconds) and its network
    removed, and NOT replaced (its node is gone, or no capacity is left for it). The
    coordinator restarts the group at MAX, waits --rejoin-timeout for a replacement, then
    goes on with MAX - 1 from the last checkpoint. Expected: coordinator exit 0;
    summary.json's world_sizes [MAX, MAX - 1], one restart and one resize; a
    {"type": "resize"} record MAX -> MAX - 1 in metrics.jsonl whose cause names
    --rejoin-timeout; the surviving pods, and only they, in the last group, all exit 0.
    Rank hints are advisory when elastic: a hint past the world size or taken gets the
    highest free rank, so after pod 1 of 3 is lost pods 0 and 2 are ranks 0 and 1 in
    whichever order they register (before that fix pod 2 could take rank 0, pod 0's hint
    was refused as taken, and the group of 2 never formed).
  * pod-added (COORDINATOR_RENDEZVOUS_WAIT=--rendezvous-wait, 2 s): only MIN worker pods
    start; the job starts with them after the rendezvous wait. Once a checkpoint is
    committed, the other pods (MIN..MAX-1) are added, as a Pending pod is scheduled late. Expected: the coordinator names them as asking
    to join, the group grows to MAX at the next checkpoint, exit 0, world_sizes [MIN, MAX],
    one resize (starting at MIN is none), a resize record MIN -> MAX, every pod in the last group at its own rank, all exit 0.

Both also check: equal replica checksums of the final world size in summary.json; and the
rendered worker Job completes by its successPolicy (at least succeededCount pods exited 0;
pod-deleted ends with fewer than completions, so only the successPolicy makes it complete).
--repeat runs each case that many times. Skips (exit 0, with a line saying why) where
run_pods.py would: not root, a tool, the corpus (IMDB_DATA) or the binaries missing.
Usage: IMDB_DATA=... deploy/tests/elastic_pods.py [--case pod-deleted] [--repeat 3]
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run_pods  # noqa: E402  (beside this file)
from run_pods import check_isolation, log  # noqa: E402

CASES = {
    "pod-deleted": ("d", "a worker pod deleted after a checkpoint and not replaced"),
    "pod-added": ("g", "MIN worker pods, the others added after a checkpoint"),
}
# run_pods.run names a run's namespaces by the scenario's letter.
run_pods.SCENARIOS.update(CASES)
REGISTERED = re.compile(r"worker registered rank=(\d+) hostname=(\S+).*?attempt=(\d+)")


class ElasticRun(run_pods.Run):
    """One elastic job: MAX rendered worker pods, of which pod-added starts only MIN."""

    def __init__(self, cluster, args, workers, scenario):
        # pod-deleted waits --rejoin-timeout for the replacement that never comes, and starts
        # with all MAX pods (the manifest's 60 s rendezvous wait ends once they are there).
        # pod-added starts with MIN after --rendezvous-wait; when it grows, the group of MAX
        # re-forms within a rejoin timeout long enough for a busy machine.
        waits = (
            {"COORDINATOR_REJOIN_TIMEOUT": f"{args.rejoin_timeout:g}"}
            if scenario == "pod-deleted"
            else {"COORDINATOR_RENDEZVOUS_WAIT": f"{args.rendezvous_wait:g}", "COORDINATOR_REJOIN_TIMEOUT": "60"}
        )
        env = {"imdb-ddp-coordinator": {**waits, "TRAINER_EPOCHS": str(args.epochs)}}
        self.waits = waits
        super().__init__(cluster, args, workers, scenario, min_workers=args.min, env=env)
        self.min, self.max = args.min, workers
        coord = self.coord_job["spec"]["template"]["spec"]["containers"][0]
        flag = run_pods.Pod(self.coord_job, 0, self.docs, self.secrets).environment("0.0.0.0")["TRAINER_WORKERS"]
        if flag != f"{self.min}:{self.max}":
            raise SystemExit(f"the rendered coordinator's TRAINER_WORKERS is {flag!r}, not {self.min}:{self.max}")
        self.what = (
            f"overlays/cpu, --workers {flag} ({coord['name']} TRAINER_WORKERS), "
            + (f"worker pod {args.victim} deleted after a checkpoint and not replaced"
               if scenario == "pod-deleted" else
               f"{self.min} worker pods, {self.max - self.min} added after a checkpoint")
            + " (" + ", ".join(f"{k}={v}" for k, v in {**self.waits, "TRAINER_EPOCHS": args.epochs}.items()) + ")"
        )
        self.late = []
        if scenario == "pod-added":
            # Pods MIN..MAX-1 are not started yet (Pending: no node for them so far).
            self.late = self.pods[1 + self.min:]
            self.pods = self.pods[: 1 + self.min]
            self.every_worker_pod = list(self.pods[1:])
        self.deleted = None

    def steps(self):
        coordinator_log = self.coordinator_log
        yield from self.until(lambda: "checkpoint committed" in coordinator_log(), 300,
                              "the coordinator's log never said 'checkpoint committed'")
        for p in self.pods[:2]:
            check_isolation(p, self.procs[p.hostname].pid, self.nets[p.hostname][1])
        if self.scenario == "pod-deleted":
            slot = 1 + self.args.victim
            victim = self.pods[slot]
            proc = self.procs[victim.hostname]
            grace = victim.spec.get("terminationGracePeriodSeconds", 30)
            # What the kubelet does to a deleted pod: SIGTERM, then SIGKILL after the grace.
            proc.terminate()
            t0 = time.time()
            yield from self.until(lambda: proc.poll() is not None or time.time() > t0 + grace, grace + 5, "")
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            self.cluster.remove_namespace(self.nets[victim.hostname][0])
            self.deleted = (victim, proc.returncode)
            del self.pods[slot]
            log(f"pod {victim.name} deleted (SIGTERM, exit {proc.returncode} after {time.time() - t0:.1f} s) "
                "and not replaced")
        else:
            for pod in self.late:
                self.nets[pod.hostname] = self.cluster.add_pod_network(pod.hostname)
                self.pods.append(pod)
                self.every_worker_pod.append(pod)
                self.start(pod)
            yield from self.until(lambda: "asks to join" in coordinator_log(), 60,
                                  "the coordinator never said that a late pod asks to join")

    def check(self, code, seconds):
        clog, worker_codes = self.ended_cleanly(code)
        if self.scenario == "pod-deleted" and self.deleted is None:
            self.fail("the job ended before the pod was deleted")
        run_dir = os.path.join(self.cluster.work, self.pods[0].name, "volumes", "run", "run")
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f if line.strip()]
        deleted = self.scenario == "pod-deleted"
        sizes = [self.max, self.max - 1] if deleted else [self.min, self.max]
        problems = []
        history = [s.get("world_size") for s in summary.get("world_sizes", [])]
        if history != sizes:
            problems.append(f"world_sizes {history}, expected {sizes}")
        sums = summary.get("replica_checksums", [])
        if summary.get("world_size") != sizes[-1] or len(sums) != sizes[-1] or len(set(sums)) != 1:
            problems.append(f"world_size {summary.get('world_size')}, replica_checksums {sums}")
        resizes = [r for r in records if r.get("type") == "resize"]
        last = resizes[-1] if resizes else {}
        if (last.get("world_size_before"), last.get("world_size_after")) != (sizes[0], sizes[1]):
            problems.append(f"the last resize record is {last or 'missing'}, expected {sizes[0]} -> {sizes[1]}")
        if deleted:
            if "--rejoin-timeout" not in last.get("cause", ""):
                problems.append(f"the resize's cause does not name --rejoin-timeout: {last.get('cause')!r}")
            if (summary.get("restarts"), summary.get("resizes")) != (1, 1):
                problems.append(f"restarts {summary.get('restarts')}, resizes {summary.get('resizes')}; expected 1 and 1")
        else:
            if "asks to join" not in clog:
                problems.append("the coordinator never said that a pod asks to join")
            # Starting at MIN after --rendezvous-wait is no resize; the growth to MAX is the one.
            if (summary.get("restarts"), summary.get("resizes")) != (0, 1):
                problems.append(f"restarts {summary.get('restarts')}, resizes {summary.get('resizes')}; expected 0 and 1")
        # The last group: the pods still running, one rank each.
        regs = [(int(r), h, int(a)) for r, h, a in REGISTERED.findall(clog)]
        final_attempt = max((a for _, _, a in regs), default=-1)
        final = sorted((r, h) for r, h, a in regs if a == final_attempt)
        alive = sorted(p.hostname for p in self.pods[1:])
        if sorted(h for _, h in final) != alive or [r for r, _ in final] != list(range(sizes[-1])):
            problems.append(f"the last group (attempt {final_attempt}) is {final}, expected ranks 0..{sizes[-1] - 1} "
                            f"held by {alive}")
        if not deleted and any(h != f"imdb-ddp-workers-{r}" for r, h in final):
            problems.append(f"grown to MAX, every pod should hold its own index as rank: {final}")
        # The worker Job, as the Job controller would judge it: complete by its successPolicy.
        wspec = self.worker_job["spec"]
        needed = wspec["successPolicy"]["rules"][0]["succeededCount"]
        succeeded = sum(1 for c in worker_codes.values() if c == 0)
        if succeeded < needed:
            problems.append(f"{succeeded} worker pods succeeded, fewer than the successPolicy's {needed}")
        if deleted and succeeded >= wspec["completions"]:
            problems.append(f"{succeeded} pods succeeded with one deleted: completions {wspec['completions']}?")
        if problems:
            self.fail("; ".join(problems) + f"\nsummary {json.dumps(summary)}")
        log(
            f"ok: {self.what}: coordinator exit 0 in {seconds:.0f} s, world sizes {history}, "
            f"restarts {summary.get('restarts')}, resizes {summary.get('resizes')}, resize record "
            f"{last['world_size_before']} -> {last['world_size_after']} at step {last.get('resumed_from_global_step')} "
            f"({last.get('cause')}), last group {final}, replica checksums equal ({sums[0]}), "
            f"the worker Job complete by its successPolicy ({succeeded} of {wspec['completions']} pods "
            f"succeeded, {needed} needed), test accuracy {summary.get('test_accuracy')}"
        )
        return summary, {"case": self.scenario, "seconds": round(seconds, 1), "world_sizes": history}


def preflight(args):
    """None when the pods can run here, else why not (run_pods.py's skips)."""
    if os.geteuid() != 0:
        return "the pods in network namespaces need root (ip netns, mount, setpriv)"
    missing = [t for t in ["kubectl", "ip", "unshare", "setpriv", "chroot", "mount"] if shutil.which(t) is None]
    if missing or run_pods.yaml is None:
        return f"pods in network namespaces: missing {missing or ['PyYAML']}"
    if not args.corpus or not os.path.exists(args.corpus):
        return "pods in network namespaces: IMDB_DATA not set (there is no internet to download it)"
    for b in ["coordinator", "worker"]:
        if not os.path.isfile(os.path.join(args.bin_dir, b)):
            return f"{args.bin_dir}/{b} is not built (cargo build --workspace --bins)"
    try:
        run_pods.sh("ip", "netns", "list", capture_output=True)
    except (subprocess.CalledProcessError, OSError) as e:
        return f"network namespaces unavailable: {e}"
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", action="append", choices=list(CASES), help="repeatable (default: both)")
    parser.add_argument("--min", type=int, default=2, help="MIN of --workers MIN:MAX (default 2)")
    parser.add_argument("--max", type=int, default=3, help="MAX of --workers MIN:MAX (default 3)")
    parser.add_argument("--victim", type=int, default=1, help="pod-deleted: the index of the deleted pod (default 1)")
    parser.add_argument("--rejoin-timeout", type=float, default=5.0, help="pod-deleted: COORDINATOR_REJOIN_TIMEOUT (s)")
    parser.add_argument("--rendezvous-wait", type=float, default=2.0, help="pod-added: COORDINATOR_RENDEZVOUS_WAIT (s)")
    parser.add_argument("--epochs", type=int, default=4, help="TRAINER_EPOCHS: long enough for a pod to join")
    parser.add_argument("--repeat", type=int, default=1, help="run each case this many times")
    parser.add_argument("--bin-dir", default=os.path.join(run_pods.REPO, "target", "debug"))
    parser.add_argument("--corpus", default=os.environ.get("IMDB_DATA"))
    parser.add_argument("--timeout", type=float, default=600)
    # What run_pods.Run reads of run_pods.py's fault flags (no fault runs here).
    parser.set_defaults(latency_ms=0.0, loss=0.0, stop_seconds=0.0)
    args = parser.parse_args()
    cases = list(dict.fromkeys(args.case or list(CASES)))
    if not 1 <= args.min < args.max:
        parser.error(f"--min {args.min} --max {args.max}: an elastic job needs 1 <= MIN < MAX")
    if "pod-deleted" in cases and not (args.min <= args.max - 1 and 0 <= args.victim < args.max):
        parser.error(f"pod-deleted: --victim {args.victim} must be a pod index below --max {args.max}")
    if args.repeat < 1 or args.epochs < 1 or args.rejoin_timeout <= 0 or args.rendezvous_wait <= 0:
        parser.error("--repeat and --epochs must be at least 1, the timeouts above 0")
    why = preflight(args)
    if why:
        print(f"skipped: {why}")
        return 0
    args.corpus = os.path.realpath(args.corpus)
    times = {}
    for i in range(args.repeat):
        for case in cases:
            _, report = run_pods.run(args, args.max, case, run_class=ElasticRun)
            times.setdefault(case, []).append(report["seconds"])
    for case, t in times.items():
        log(f"ok: {case}: {len(t)} run(s) passed, {', '.join(f'{s:.0f}' for s in t)} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
