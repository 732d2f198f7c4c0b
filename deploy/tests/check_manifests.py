#!/usr/bin/env python3
"""Checks deploy/ without a cluster: (1) renders every overlay, deploy/jobset and
deploy/pytorchjob with `kubectl kustomize`, (2) validates each render against the Kubernetes
schemas bundled in kubernetes-validate (--strict, 1.31 and the newest it has; the JobSet's
job templates and the PyTorchJob's pod templates as Jobs) and the JobSet and PyTorchJob
themselves against their CRDs' schemas (schemas/, unknown fields refused as
`kubectl apply --validate=strict` refuses them), (3) checks the contract of the rendered
YAML: MIN and MAX (--workers MIN:MAX, MIN <= MAX) agree everywhere (the worker Job's
successPolicy and completions, the JobSet's, the PyTorchJob's elasticPolicy and replicas),
the coordinator's address is what the workers dial, a lost worker pod is replaced without
restarting the job, the job secret comes only from a Secret, the restricted Pod Security
fields are there, GPUs appear only in limits, and /dev/shm is memory-backed where a pod has
GPUs. (4) Broken variants (MIN > MAX, counts that disagree) must each be refused with their
message: the checks themselves are tested.

A missing tool skips its step with a line that says so (exit 0); a broken contract exits 1.
Usage: deploy/tests/check_manifests.py [--render-dir DIR]
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from crd_schemas import validate_crds  # noqa: E402  (beside this file)
from manifest_variants import VARIANTS  # noqa: E402

try:
    import yaml
except ImportError:  # PyYAML comes with kubernetes-validate
    yaml = None

DEPLOY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RENDERS = ["base", "overlays/cpu", "overlays/multi-node-gpu", "overlays/single-node-gpu", "jobset", "pytorchjob"]
# Components that no overlay includes, rendered on top of overlays/cpu: name -> components.
COMBINATIONS = {"overlays/cpu+tls+persistent-output": ["components/tls", "components/persistent-output"]}
# Copies of deploy/base/job.toml (kustomize reads no file outside a kustomization's folder).
JOB_CONFIG_COPIES = ["jobset/job.toml", "pytorchjob/job.toml"]
PERMANENT_EXIT_CODES = {2, 3, 4, 5, 6}
RETRYABLE_EXIT_CODE = 75
GPU = "nvidia.com/gpu"


class Failures:
    def __init__(self):
        self.items = []

    def check(self, ok, what):
        if not ok:
            self.items.append(what)
        return ok


def skip(message):
    print(f"skipped: {message}")


def render(path, tmp):
    if path in VARIANTS:
        # A kustomization beside the renders that patches a render into a broken variant, and
        # runs the render's replacements again, as a user's edit of its numbers would.
        v = VARIANTS[path]
        where = os.path.join(tmp, "variant-" + re.sub(r"[^a-z0-9]+", "-", path))
        os.makedirs(where, exist_ok=True)
        with open(os.path.join(where, "kustomization.yaml"), "w") as f:
            f.write(f"resources:\n  - {os.path.relpath(os.path.join(DEPLOY, v['base']), where)}\npatches:\n{v['patches']}")
            if v.get("replacements"):
                shutil.copy(os.path.join(DEPLOY, v["replacements"]), where)
                f.write(f"replacements:\n  - path: {os.path.basename(v['replacements'])}\n")
        path = where
    elif path in COMBINATIONS:
        # A kustomization beside the renders that adds the components to overlays/cpu.
        where = os.path.join(tmp, "combination-" + re.sub(r"[^a-z0-9]+", "-", path))
        os.makedirs(where, exist_ok=True)
        rel = lambda p: os.path.relpath(os.path.join(DEPLOY, p), where)  # noqa: E731
        with open(os.path.join(where, "kustomization.yaml"), "w") as f:
            f.write(f"resources:\n  - {rel('overlays/cpu')}\ncomponents:\n")
            f.write("".join(f"  - {rel(c)}\n" for c in COMBINATIONS[path]))
        path = where
    out = subprocess.run(["kubectl", "kustomize", os.path.join(DEPLOY, path)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"FAIL: kubectl kustomize {path}:\n{out.stderr}")
    return out.stdout


def newest_schema_version():
    import kubernetes_validate

    base = os.path.join(os.path.dirname(kubernetes_validate.__file__), "kubernetes-json-schema")
    versions = []
    for d in os.listdir(base):
        m = re.fullmatch(r"v(\d+)\.(\d+)\.(\d+)-local-strict", d)
        if m:
            versions.append(tuple(int(x) for x in m.groups()))
    return ".".join(str(x) for x in max(versions))


def validate(name, docs, tmp, failures):
    """kubernetes-validate --strict on the plain Kubernetes objects; the JobSet's job
    templates and the PyTorchJob's pod templates as Jobs (the CRDs' own schemas are checked
    by validate_crds)."""
    plain = []
    for d in docs:
        if d["kind"] == "PyTorchJob":
            for rtype, rs in d["spec"].get("pytorchReplicaSpecs", {}).items():
                tpl = dict(rs.get("template", {}))
                # The operator sets the pods' restartPolicy from the replica's.
                tpl["spec"] = {**tpl.get("spec", {}), "restartPolicy": rs.get("restartPolicy", "OnFailure")}
                plain.append(
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "metadata": {"name": f"{d['metadata']['name']}-{rtype.lower()}"},
                        "spec": {"template": tpl},
                    }
                )
        elif d["kind"] == "JobSet":
            for rj in d["spec"]["replicatedJobs"]:
                plain.append(
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "metadata": {"name": f"{d['metadata']['name']}-{rj['name']}"},
                        "spec": rj["template"]["spec"],
                    }
                )
        else:
            plain.append(d)
    path = os.path.join(tmp, name.replace("/", "_") + ".validate.yaml")
    with open(path, "w") as f:
        yaml.safe_dump_all(plain, f)
    for version in ["1.31.0", newest_schema_version()]:
        out = subprocess.run(
            ["kubernetes-validate", "--strict", "--quiet", "-k", version, path], capture_output=True, text=True
        )
        if failures.check(out.returncode == 0, f"{name}: kubernetes-validate {version}:\n{out.stdout}{out.stderr}"):
            print(f"ok: {name} validates against Kubernetes {version} (--strict, {len(plain)} objects)")


def pod_templates(docs):
    """(owner name, pod template, job spec or None) for every pod template."""
    for d in docs:
        if d["kind"] == "Job":
            yield d["metadata"]["name"], d["spec"]["template"], d["spec"]
        elif d["kind"] == "JobSet":
            for rj in d["spec"]["replicatedJobs"]:
                yield f"{d['metadata']['name']}-{rj['name']}", rj["template"]["spec"]["template"], rj["template"]["spec"]
        elif d["kind"] == "PyTorchJob":
            for rtype, rs in d["spec"]["pytorchReplicaSpecs"].items():
                yield f"{d['metadata']['name']}-{rtype.lower()}", rs["template"], None


def env_of(container):
    return {e["name"]: e for e in container.get("env", [])}


def arg_value(container, flag):
    for a in container.get("args", []):
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def check_security(name, docs, failures):
    for owner, tpl, jspec in pod_templates(docs):
        spec = tpl["spec"]
        psc = spec.get("securityContext", {})
        failures.check(psc.get("runAsNonRoot") is True, f"{name}/{owner}: pod runAsNonRoot")
        failures.check(psc.get("runAsUser", 0) != 0, f"{name}/{owner}: pod runAsUser must not be 0")
        failures.check(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{name}/{owner}: seccomp")
        failures.check(spec.get("automountServiceAccountToken") is False, f"{name}/{owner}: no service account token")
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec.get("initContainers", []) + spec["containers"]:
            where = f"{name}/{owner}/{c['name']}"
            sc = c.get("securityContext", {})
            failures.check(sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation")
            failures.check(sc.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem")
            failures.check(sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: drop ALL capabilities")
            failures.check(sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, f"{where}: runAsNonRoot")
            image = c.get("image", "")
            failures.check(
                ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"{where}: image {image!r} needs a tag, not latest"
            )
            res = c.get("resources", {})
            for kind in ["requests", "limits"]:
                for r in ["cpu", "memory"]:
                    failures.check(r in res.get(kind, {}), f"{where}: resources.{kind}.{r}")
            # GPUs only in limits (Kubernetes sets requests = limits for extended resources).
            failures.check(GPU not in res.get("requests", {}), f"{where}: {GPU} in requests")
            gpus = int(res.get("limits", {}).get(GPU, 0))
            mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
            if gpus > 0:
                shm = mounts.get("/dev/shm")
                ok = shm is not None and volumes.get(shm["name"], {}).get("emptyDir", {}).get("medium") == "Memory"
                failures.check(ok, f"{where}: {gpus} GPU(s) but no memory-backed /dev/shm")
                failures.check(
                    any(t.get("key") == GPU for t in spec.get("tolerations", [])), f"{where}: GPU toleration"
                )
            # Writable mounts only from emptyDirs or claims (the root is read-only).
            for m in mounts.values():
                v = volumes.get(m["name"], {})
                if not m.get("readOnly"):
                    failures.check(
                        "emptyDir" in v or "persistentVolumeClaim" in v,
                        f"{where}: writable mount {m['mountPath']} of a {sorted(v)} volume",
                    )
        if jspec is not None:
            failures.check(spec.get("restartPolicy") == "Never", f"{name}/{owner}: restartPolicy Never")


def check_secret(name, docs, failures):
    text = yaml.safe_dump_all(docs)
    failures.check(not any(d["kind"] == "Secret" for d in docs), f"{name}: a Secret object in the manifests")
    for owner, tpl, _ in pod_templates(docs):
        spec = tpl["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec["containers"]:
            where = f"{name}/{owner}/{c['name']}"
            env = env_of(c)
            failures.check(not any(a.startswith("--secret=") for a in c.get("args", [])), f"{where}: --secret literal")
            literal = env.get("TRAINER_JOB_SECRET", {})
            failures.check("value" not in literal, f"{where}: TRAINER_JOB_SECRET as a literal value")
            if "TRAINER_JOB_SECRET" in env:
                failures.check("secretKeyRef" in literal.get("valueFrom", {}), f"{where}: secret not from a Secret")
            path = env.get("TRAINER_JOB_SECRET_FILE", {}).get("value")
            ok = "TRAINER_JOB_SECRET" in env
            if path:
                for m in c.get("volumeMounts", []):
                    if path.startswith(m["mountPath"].rstrip("/") + "/"):
                        ok = "secret" in volumes.get(m["name"], {})
            failures.check(ok, f"{where}: the job secret must come from a mounted Secret ({path})")
    failures.check("BEGIN" not in text and "PRIVATE KEY" not in text, f"{name}: key material in the manifests")
    # TLS files (certificate, key, CA) come from mounted Secrets too.
    for owner, tpl, _ in pod_templates(docs):
        spec = tpl["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec["containers"]:
            for var, e in env_of(c).items():
                if "TLS" not in var:
                    continue
                mounts = [m for m in c.get("volumeMounts", []) if e.get("value", "").startswith(m["mountPath"].rstrip("/") + "/")]
                failures.check(
                    len(mounts) == 1 and "secret" in volumes.get(mounts[0]["name"], {}),
                    f"{name}/{owner}/{c['name']}: {var} must name a file of a mounted Secret",
                )


def coordinator_port(container):
    listen = arg_value(container, "--listen")
    return int(listen.rsplit(":", 1)[1]) if listen else None


def container(spec, name, where, failures):
    """The container `name` of a pod spec, or None with a failure that says so."""
    found = next((c for c in spec.get("containers", []) if c.get("name") == name), None)
    failures.check(found is not None, f"{where}: no container named {name!r}")
    return found


def workers_range(ccont, where, failures):
    """The coordinator's --workers (TRAINER_WORKERS) as (MIN, MAX), or None with a failure
    that says what is wrong with it."""
    failures.check(arg_value(ccont, "--workers") is None, f"{where}: --workers as an arg besides TRAINER_WORKERS")
    value = str(env_of(ccont).get("TRAINER_WORKERS", {}).get("value", ""))
    m = re.fullmatch(r"(\d+)(?::(\d+))?", value)
    if not failures.check(m is not None, f"{where}: TRAINER_WORKERS is {value!r}: write N or MIN:MAX"):
        return None
    lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
    if not failures.check(1 <= lo <= hi, f"{where}: TRAINER_WORKERS {value}: MIN ({lo}) must be at least 1 and at most MAX ({hi})"):
        return None
    return lo, hi


def check_worker_job_range(where, wspec, rng, failures):
    """An Indexed worker Job of MAX pods that is complete once MIN succeeded, for the
    coordinator's --workers MIN:MAX."""
    lo, hi = rng
    n, par = wspec.get("completions"), wspec.get("parallelism")
    failures.check(
        n == hi and par == hi,
        f"{where}: MAX: completions {n} and parallelism {par}, but the coordinator's TRAINER_WORKERS says MAX = {hi}",
    )
    rules = wspec.get("successPolicy", {}).get("rules", [])
    counts = [r["succeededCount"] for r in rules if "succeededCount" in r and "succeededIndexes" not in r]
    if lo < hi:
        if not failures.check(
            len(rules) == 1 and len(counts) == 1,
            f"{where}: an elastic job (MIN {lo} < MAX {hi}) needs one successPolicy rule with a succeededCount: "
            "without it a job that ends below MAX leaves the Job incomplete",
        ):
            return
    if counts:
        failures.check(
            counts[0] == lo,
            f"{where}: MIN: successPolicy succeededCount {counts[0]}, but the coordinator's TRAINER_WORKERS says MIN = {lo}",
        )
        failures.check(
            counts[0] <= (n if isinstance(n, int) else 0),
            f"{where}: successPolicy succeededCount {counts[0]} is above completions {n} (MIN > MAX; the API refuses it)",
        )


def max_restarts(ccont):
    arg = arg_value(ccont, "--max-restarts")
    value = arg if arg is not None else env_of(ccont).get("COORDINATOR_MAX_RESTARTS", {}).get("value", "3")
    return int(value) if str(value).isdigit() else -1


def check_jobs(name, docs, failures):
    """MIN and MAX, the coordinator's address, failure policies."""
    jobs = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Job"}
    services = [d for d in docs if d["kind"] == "Service"]
    coord = jobs.get("imdb-ddp-coordinator")
    if not failures.check(coord is not None, f"{name}: no coordinator Job"):
        return
    cspec = coord["spec"]
    failures.check(cspec.get("completionMode") == "Indexed" and cspec.get("completions") == 1, f"{name}: coordinator is a 1-pod Indexed Job")
    ccont = container(cspec["template"]["spec"], "coordinator", name, failures)
    rng = ccont and workers_range(ccont, name, failures)
    if not rng:
        return
    workers = jobs.get("imdb-ddp-workers")
    port = coordinator_port(ccont)
    failures.check(
        any(p["containerPort"] == port and p.get("name") == "grpc" for p in ccont.get("ports", [])),
        f"{name}: coordinator containerPort {port}",
    )
    probe = ccont.get("readinessProbe", {})
    if "COORDINATOR_TLS_CERT" in env_of(ccont):
        # The kubelet's grpc: probe speaks only plaintext.
        failures.check(probe.get("tcpSocket", {}).get("port") == port and "grpc" not in probe, f"{name}: TLS needs a TCP probe")
        wc = next(c for c in jobs["imdb-ddp-workers"]["spec"]["template"]["spec"]["containers"] if c["name"] == "worker")
        failures.check("TRAINER_TLS_CA" in env_of(wc), f"{name}: TLS on the coordinator but the workers have no CA")
    else:
        failures.check(probe.get("grpc", {}).get("port") == port, f"{name}: the coordinator's grpc readiness probe")
    for job in jobs.values():
        check_failure_policy(f"{name}/{job['metadata']['name']}", job["spec"], failures, count_75=True)
    if workers is None:
        # single-node-gpu: one pod, MAX local workers, one GPU each.
        gpus = int(ccont["resources"]["limits"].get(GPU, 0))
        failures.check("--external-workers" not in ccont.get("args", []), f"{name}: local workers expected")
        failures.check(gpus == rng[1], f"{name}: {gpus} GPUs but TRAINER_WORKERS MAX = {rng[1]}")
        print(f"ok: {name}: one pod, {rng[1]} local workers = GPUs")
        return
    wspec = workers["spec"]
    failures.check(wspec.get("completionMode") == "Indexed", f"{name}: workers are an Indexed Job")
    check_worker_job_range(f"{name}/imdb-ddp-workers", wspec, rng, failures)
    failures.check("--external-workers" in ccont.get("args", []), f"{name}: coordinator needs --external-workers")
    failures.check(max_restarts(ccont) >= 1, f"{name}: a lost worker pod is replaced and rejoins: --max-restarts must be >= 1")
    # The coordinator's address: <coordinator job>-0.<headless service>:<port>.
    headless = [s for s in services if s["spec"].get("clusterIP") == "None"]
    if not failures.check(len(headless) == 1, f"{name}: one headless Service"):
        return
    svc = headless[0]
    failures.check(svc["spec"].get("publishNotReadyAddresses") is True, f"{name}: publishNotReadyAddresses")
    svc_name = svc["metadata"]["name"]
    sel = svc["spec"]["selector"]
    for job in jobs.values():
        tpl = job["spec"]["template"]
        labels = tpl.get("metadata", {}).get("labels", {})
        failures.check(all(labels.get(k) == v for k, v in sel.items()), f"{name}: Service selects {job['metadata']['name']}'s pods")
        failures.check(tpl["spec"].get("subdomain") == svc_name, f"{name}: {job['metadata']['name']} subdomain = {svc_name}")
    grpc_ports = [p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc"]
    failures.check(grpc_ports == [port], f"{name}: Service grpc port {grpc_ports} vs listen {port}")
    expected = f"{coord['metadata']['name']}-0.{svc_name}:{port}"
    wcont = container(wspec["template"]["spec"], "worker", name, failures)
    if not wcont:
        return
    addr = env_of(wcont).get("COORDINATOR_ADDR", {}).get("value")
    failures.check(addr == expected, f"{name}: workers dial {addr!r}, expected {expected!r}")
    check_worker_pod(name, wcont, failures)
    print(f"ok: {name}: --workers {rng[0]}:{rng[1]} agrees with the worker Job; workers dial {expected}")


def check_worker_pod(name, wcont, failures, rank_from="job-completion-index"):
    env = env_of(wcont)
    failures.check(
        env.get("POD_IP", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "status.podIP",
        f"{name}: POD_IP from status.podIP",
    )
    failures.check(arg_value(wcont, "--advertise-host") == "$(POD_IP)", f"{name}: the ring advertises the pod IP")
    rank = env.get("TRAINER_RANK", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath", "")
    failures.check(rank_from in rank, f"{name}: the rank hint is the pod's {rank_from}, not {rank!r}")
    failures.check(float(env.get("WORKER_CONNECT_TIMEOUT", {}).get("value", 0)) >= 600, f"{name}: connect timeout >= 600 s")


def check_failure_policy(where, jspec, failures, count_75):
    rules = jspec.get("podFailurePolicy", {}).get("rules", [])
    fail_codes = set()
    for r in rules:
        if r["action"] == "FailJob" and "onExitCodes" in r and r["onExitCodes"]["operator"] == "In":
            fail_codes |= set(r["onExitCodes"]["values"])
    failures.check(fail_codes == PERMANENT_EXIT_CODES, f"{where}: FailJob on exit codes {sorted(fail_codes)}")
    failures.check(RETRYABLE_EXIT_CODE not in fail_codes, f"{where}: exit 75 must be retried")
    if count_75:
        failures.check(
            any(
                r["action"] == "Ignore" and any(c["type"] == "DisruptionTarget" for c in r.get("onPodConditions", []))
                for r in rules
            ),
            f"{where}: DisruptionTarget retried (Ignore)",
        )
        failures.check(jspec.get("backoffLimit", 0) > 0, f"{where}: backoffLimit > 0 so that 75 is retried")


def check_jobset(name, docs, failures):
    js = next(d for d in docs if d["kind"] == "JobSet")
    spec = js["spec"]
    rjs = {rj["name"]: rj for rj in spec.get("replicatedJobs", [])}
    if not failures.check({"coordinator", "workers"} <= set(rjs), f"{name}: replicatedJobs coordinator and workers"):
        return
    coord, workers = rjs["coordinator"], rjs["workers"]
    cspec, wspec = coord["template"]["spec"], workers["template"]["spec"]
    ccont = container(cspec["template"]["spec"], "coordinator", name, failures)
    wcont = container(wspec["template"]["spec"], "worker", name, failures)
    rng = ccont and workers_range(ccont, name, failures)
    if not (rng and wcont):
        return
    check_worker_job_range(f"{name}/workers", wspec, rng, failures)
    failures.check(workers.get("replicas", 1) == 1, f"{name}: one workers Job (its pods are the ranks)")
    failures.check(coord["replicas"] == 1 and cspec["completions"] == 1, f"{name}: one coordinator pod")
    failures.check(spec.get("coordinator", {}).get("replicatedJob") == "coordinator", f"{name}: spec.coordinator")
    net = spec.get("network", {})
    failures.check(net.get("enableDNSHostnames") is True and net.get("publishNotReadyAddresses") is True, f"{name}: network")
    failures.check(workers.get("dependsOn") == [{"name": "coordinator", "status": "Ready"}], f"{name}: dependsOn Ready")
    failures.check(spec.get("failurePolicy", {}).get("maxRestarts", 0) > 0, f"{name}: failurePolicy restarts the group")
    # Done when the coordinator is (a worker index lost for good must not keep it open).
    failures.check(
        spec.get("successPolicy", {}).get("targetReplicatedJobs") == ["coordinator"],
        f"{name}: successPolicy must target the coordinator alone",
    )
    # A lost worker pod is replaced by its Job and rejoins (or the job resizes): the
    # coordinator restarts the group itself, and the JobSet does not restart.
    failures.check(max_restarts(ccont) >= 1, f"{name}: the coordinator's --max-restarts must be >= 1 (a lost worker rejoins)")
    host = env_of(wcont).get("COORDINATOR_HOST", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
    failures.check(host == "metadata.annotations['jobset.sigs.k8s.io/coordinator']", f"{name}: coordinator from the annotation")
    port = coordinator_port(ccont)
    failures.check(arg_value(wcont, "--coordinator") == f"$(COORDINATOR_HOST):{port}", f"{name}: workers dial the annotation's host on {port}")
    for rj, jspec in [("coordinator", cspec), ("workers", wspec)]:
        check_failure_policy(f"{name}/{rj}", jspec, failures, count_75=rj == "workers")
        labels = jspec["template"].get("metadata", {}).get("labels", {})
        failures.check(labels.get("app.kubernetes.io/instance") == "imdb-ddp", f"{name}/{rj}: pod labels for the NetworkPolicy")
    check_worker_pod(name, wcont, failures)
    print(f"ok: {name}: --workers {rng[0]}:{rng[1]} agrees with the workers' Job; workers dial $(COORDINATOR_HOST):{port}")


def check_pytorchjob(name, docs, failures):
    """Kubeflow's PyTorchJob: the Master is the coordinator, the Workers `worker join`."""
    job = next(d for d in docs if d["kind"] == "PyTorchJob")
    spec, jname = job["spec"], job["metadata"]["name"]
    rs = spec.get("pytorchReplicaSpecs", {})
    if not failures.check({"Master", "Worker"} <= set(rs), f"{name}: pytorchReplicaSpecs Master and Worker"):
        return
    master, worker = rs["Master"], rs["Worker"]
    failures.check(master.get("replicas") == 1, f"{name}: one Master (the operator refuses others)")
    # OnFailure: the kubelet restarts the container in its pod. ExitCode would end the job on
    # 75 (1 to 127 are permanent there), Never would not restart at all.
    for rtype, r in rs.items():
        failures.check(r.get("restartPolicy") == "OnFailure", f"{name}/{rtype}: restartPolicy OnFailure, not {r.get('restartPolicy')!r}")
    # The operator requires a container named pytorch; MASTER_PORT is its port pytorchjob-port.
    ep = spec.get("elasticPolicy", {})
    lo, hi = ep.get("minReplicas"), ep.get("maxReplicas")
    ok = failures.check(
        isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi,
        f"{name}: elasticPolicy minReplicas {lo} and maxReplicas {hi}: need 1 <= minReplicas <= maxReplicas",
    )
    n = worker.get("replicas")
    failures.check(not ok or (isinstance(n, int) and lo <= n <= hi), f"{name}: Worker replicas {n} outside elasticPolicy {lo}:{hi}")
    ccont = container(master["template"]["spec"], "pytorch", f"{name}/Master", failures)
    wcont = container(worker["template"]["spec"], "pytorch", f"{name}/Worker", failures)
    rng = ccont and workers_range(ccont, f"{name}/Master", failures)
    if not (ok and rng and wcont):
        return
    failures.check(
        (lo, hi) == rng,
        f"{name}: elasticPolicy {lo}:{hi} (PET_NNODES) but the coordinator's TRAINER_WORKERS is {rng[0]}:{rng[1]}",
    )
    port = coordinator_port(ccont)
    named = [p["containerPort"] for p in ccont.get("ports", []) if p.get("name") == "pytorchjob-port"]
    failures.check(named == [port], f"{name}: the Master's port pytorchjob-port (MASTER_PORT) {named} vs --listen {port}")
    master_addr = f"{jname}-master-0"
    for var, want in [("rdzvHost", master_addr), ("rdzvPort", port)]:
        failures.check(ep.get(var, want) == want, f"{name}: elasticPolicy.{var} {ep.get(var)!r}, the coordinator is {want!r}")
    # Workers dial MASTER_ADDR:MASTER_PORT (set by the operator in every pod it creates).
    dial = env_of(wcont).get("COORDINATOR_ADDR", {}).get("value") or arg_value(wcont, "--coordinator")
    failures.check(dial in (None, f"{master_addr}:{port}"), f"{name}: workers dial {dial!r}, not the Master {master_addr}:{port}")
    failures.check("--external-workers" in ccont.get("args", []), f"{name}: coordinator needs --external-workers")
    failures.check(max_restarts(ccont) >= 1, f"{name}: the coordinator's --max-restarts must be >= 1 (a lost worker rejoins)")
    failures.check(
        spec.get("runPolicy", {}).get("cleanPodPolicy") in ("Running", "All"),
        f"{name}: runPolicy.cleanPodPolicy Running, so that a worker pod still Pending is deleted at the end",
    )
    check_worker_pod(name, wcont, failures, rank_from="training.kubeflow.org/replica-index")
    print(f"ok: {name}: elasticPolicy {lo}:{hi} = the coordinator's --workers, Worker replicas {worker.get('replicas')}; "
          f"workers dial MASTER_ADDR:MASTER_PORT = {master_addr}:{port}")


def check_job_configs(failures):
    with open(os.path.join(DEPLOY, "base", "job.toml"), "rb") as f:
        base = f.read()
    for copy in JOB_CONFIG_COPIES:
        with open(os.path.join(DEPLOY, copy), "rb") as f:
            failures.check(f.read() == base, f"deploy/{copy} differs from deploy/base/job.toml")
    print(f"ok: {', '.join(JOB_CONFIG_COPIES)} equal deploy/base/job.toml")


def check_network_policy(name, docs, failures):
    pols = [d for d in docs if d["kind"] == "NetworkPolicy"]
    if not failures.check(len(pols) == 1, f"{name}: one NetworkPolicy"):
        return
    p = pols[0]["spec"]
    sel = p["podSelector"]["matchLabels"]
    failures.check(p.get("policyTypes") == ["Ingress"], f"{name}: NetworkPolicy governs ingress")
    failures.check(p["ingress"] == [{"from": [{"podSelector": {"matchLabels": sel}}]}], f"{name}: ingress only from the job's pods")
    for owner, tpl, _ in pod_templates(docs):
        labels = tpl.get("metadata", {}).get("labels", {})
        failures.check(all(labels.get(k) == v for k, v in sel.items()), f"{name}: NetworkPolicy selects {owner}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--render-dir", help="keep the renders here")
    args = parser.parse_args()
    if shutil.which("kubectl") is None:
        skip("kubectl not found: the manifests were not rendered (Debian: apt-get install kubectl, or any kubectl >= 1.27)")
        return 0
    if yaml is None:
        skip("PyYAML not found (pip install kubernetes-validate brings it)")
        return 0
    if args.render_dir:
        os.makedirs(args.render_dir, exist_ok=True)
        return check_all(args.render_dir)
    with tempfile.TemporaryDirectory(prefix="deploy-render-") as tmp:
        return check_all(tmp)


def render_docs(name, tmp):
    text = render(name, tmp)
    with open(os.path.join(tmp, re.sub(r"[^A-Za-z0-9.-]+", "_", name) + ".yaml"), "w") as f:
        f.write(text)
    return [d for d in yaml.safe_load_all(text) if d]


def check_contract(name, docs, failures):
    validate_crds(name, docs, failures, skip)
    check_security(name, docs, failures)
    check_secret(name, docs, failures)
    check_network_policy(name, docs, failures)
    kinds = {d["kind"] for d in docs}
    if "JobSet" in kinds:
        check_jobset(name, docs, failures)
    elif "PyTorchJob" in kinds:
        check_pytorchjob(name, docs, failures)
    else:
        check_jobs(name, docs, failures)


def check_variants(tmp, failures):
    """Every broken variant is refused, with its message."""
    try:
        import jsonschema  # noqa: F401
        have = {"jsonschema"}
    except ImportError:
        have = set()
    for name, v in VARIANTS.items():
        if v.get("needs", "kubectl") not in have | {"kubectl"}:
            skip(f"the variant {name}: {v['needs']} not found")
            continue
        found = Failures()
        with open(os.devnull, "w") as quiet:
            stdout, sys.stdout = sys.stdout, quiet
            try:
                check_contract(name, render_docs(name, tmp), found)
            finally:
                sys.stdout = stdout
        hit = [f for f in found.items if v["expect"] in f]
        if failures.check(hit, f"the checks let the broken variant {name!r} pass without {v['expect']!r}: {found.items}"):
            print(f"ok: refused: {hit[0].splitlines()[0]}")


def check_all(tmp):
    failures = Failures()
    have_validate = shutil.which("kubernetes-validate") is not None
    if not have_validate:
        skip("kubernetes-validate not found: schemas not checked (pip install kubernetes-validate)")
    for name in RENDERS + list(COMBINATIONS):
        docs = render_docs(name, tmp)
        print(f"ok: {name} renders ({len(docs)} objects: {', '.join(sorted(d['kind'] for d in docs))})")
        if have_validate:
            validate(name, docs, tmp, failures)
        before = len(failures.items)
        check_contract(name, docs, failures)
        if len(failures.items) == before:
            print(f"ok: {name}: security, secret, network policy and failure policy contract")
    check_job_configs(failures)
    check_variants(tmp, failures)
    for f in failures.items:
        print(f"FAIL: {f}")
    if failures.items:
        return 1
    print(f"deploy: {len(RENDERS) + len(COMBINATIONS)} renders checked, {len(VARIANTS)} broken variants refused")
    return 0


if __name__ == "__main__":
    sys.exit(main())
