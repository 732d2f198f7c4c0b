#!/usr/bin/env python3
"""Checks deploy/ without a cluster: (1) renders every overlay and deploy/jobset with
`kubectl kustomize`, (2) validates each render against the Kubernetes schemas bundled in
kubernetes-validate (--strict, 1.31 and the newest it has; the JobSet's job templates as
Jobs), (3) checks the contract of the rendered YAML: N agrees everywhere, the coordinator's
address is the headless Service's name and port, the job secret comes only from a Secret,
the restricted Pod Security fields are there, GPUs appear only in limits, and /dev/shm is
memory-backed where a pod has GPUs.

A missing tool skips its step with a line that says so (exit 0); a broken contract exits 1.
Usage: deploy/tests/check_manifests.py [--render-dir DIR]
"""

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

try:
    import yaml
except ImportError:  # PyYAML comes with kubernetes-validate
    yaml = None

DEPLOY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RENDERS = ["base", "overlays/cpu", "overlays/multi-node-gpu", "overlays/single-node-gpu", "jobset"]
# Components that no overlay includes, rendered on top of overlays/cpu: name -> components.
COMBINATIONS = {"overlays/cpu+tls+persistent-output": ["components/tls", "components/persistent-output"]}
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
    if path in COMBINATIONS:
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
    templates as Jobs (the CRD's own schema is not bundled)."""
    plain = []
    for d in docs:
        if d["kind"] == "JobSet":
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
    """(owner name, component, pod template spec, job spec or None) for every pod template."""
    for d in docs:
        if d["kind"] == "Job":
            yield d["metadata"]["name"], d["spec"]["template"], d["spec"]
        elif d["kind"] == "JobSet":
            for rj in d["spec"]["replicatedJobs"]:
                yield f"{d['metadata']['name']}-{rj['name']}", rj["template"]["spec"]["template"], rj["template"]["spec"]


def env_of(container):
    return {e["name"]: e for e in container.get("env", [])}


def arg_value(container, flag):
    for a in container.get("args", []):
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def check_security(name, docs, failures):
    for owner, tpl, _ in pod_templates(docs):
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


def check_jobs(name, docs, failures):
    """N, the coordinator's address, failure policies."""
    jobs = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Job"}
    services = [d for d in docs if d["kind"] == "Service"]
    coord = jobs.get("imdb-ddp-coordinator")
    if not failures.check(coord is not None, f"{name}: no coordinator Job"):
        return
    cspec = coord["spec"]
    failures.check(cspec.get("completionMode") == "Indexed" and cspec.get("completions") == 1, f"{name}: coordinator is a 1-pod Indexed Job")
    ccont = next(c for c in cspec["template"]["spec"]["containers"] if c["name"] == "coordinator")
    n_env = int(env_of(ccont)["TRAINER_WORKERS"]["value"])
    failures.check(arg_value(ccont, "--workers") is None, f"{name}: --workers as an arg besides TRAINER_WORKERS")
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
        # single-node-gpu: one pod, N local workers, one GPU each.
        gpus = int(ccont["resources"]["limits"].get(GPU, 0))
        failures.check("--external-workers" not in ccont.get("args", []), f"{name}: local workers expected")
        failures.check(gpus == n_env, f"{name}: {gpus} GPUs but TRAINER_WORKERS={n_env}")
        print(f"ok: {name}: one pod, N = {n_env} local workers = GPUs")
        return
    wspec = workers["spec"]
    n = wspec["completions"]
    failures.check(wspec.get("completionMode") == "Indexed", f"{name}: workers are an Indexed Job")
    failures.check(wspec["parallelism"] == n and n_env == n, f"{name}: N: completions {n}, parallelism {wspec['parallelism']}, TRAINER_WORKERS {n_env}")
    failures.check("--external-workers" in ccont.get("args", []), f"{name}: coordinator needs --external-workers")
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
    wcont = next(c for c in wspec["template"]["spec"]["containers"] if c["name"] == "worker")
    addr = env_of(wcont).get("COORDINATOR_ADDR", {}).get("value")
    failures.check(addr == expected, f"{name}: workers dial {addr!r}, expected {expected!r}")
    check_worker_pod(name, wcont, failures)
    print(f"ok: {name}: N = {n} everywhere; workers dial {expected}")


def check_worker_pod(name, wcont, failures):
    env = env_of(wcont)
    failures.check(
        env.get("POD_IP", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "status.podIP",
        f"{name}: POD_IP from status.podIP",
    )
    failures.check(arg_value(wcont, "--advertise-host") == "$(POD_IP)", f"{name}: the ring advertises the pod IP")
    rank = env.get("TRAINER_RANK", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath", "")
    failures.check("job-completion-index" in rank, f"{name}: the rank hint is the completion index")
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
    rjs = {rj["name"]: rj for rj in spec["replicatedJobs"]}
    coord, workers = rjs["coordinator"], rjs["workers"]
    cspec, wspec = coord["template"]["spec"], workers["template"]["spec"]
    ccont = cspec["template"]["spec"]["containers"][0]
    wcont = wspec["template"]["spec"]["containers"][0]
    n = wspec["completions"]
    n_env = int(env_of(ccont)["TRAINER_WORKERS"]["value"])
    failures.check(wspec["parallelism"] == n == n_env, f"{name}: N: completions {n}, parallelism {wspec['parallelism']}, TRAINER_WORKERS {n_env}")
    failures.check(coord["replicas"] == 1 and cspec["completions"] == 1, f"{name}: one coordinator pod")
    failures.check(spec.get("coordinator", {}).get("replicatedJob") == "coordinator", f"{name}: spec.coordinator")
    net = spec.get("network", {})
    failures.check(net.get("enableDNSHostnames") is True and net.get("publishNotReadyAddresses") is True, f"{name}: network")
    failures.check(workers.get("dependsOn") == [{"name": "coordinator", "status": "Ready"}], f"{name}: dependsOn Ready")
    failures.check(spec.get("failurePolicy", {}).get("maxRestarts", 0) > 0, f"{name}: failurePolicy restarts the group")
    host = env_of(wcont).get("COORDINATOR_HOST", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
    failures.check(host == "metadata.annotations['jobset.sigs.k8s.io/coordinator']", f"{name}: coordinator from the annotation")
    port = coordinator_port(ccont)
    failures.check(arg_value(wcont, "--coordinator") == f"$(COORDINATOR_HOST):{port}", f"{name}: workers dial the annotation's host on {port}")
    for rj, jspec in [("coordinator", cspec), ("workers", wspec)]:
        check_failure_policy(f"{name}/{rj}", jspec, failures, count_75=False)
        labels = jspec["template"].get("metadata", {}).get("labels", {})
        failures.check(labels.get("app.kubernetes.io/instance") == "imdb-ddp", f"{name}/{rj}: pod labels for the NetworkPolicy")
    check_worker_pod(name, wcont, failures)
    print(f"ok: {name}: N = {n} everywhere; workers dial $(COORDINATOR_HOST):{port}")


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


def check_all(tmp):
    failures = Failures()
    have_validate = shutil.which("kubernetes-validate") is not None
    if not have_validate:
        skip("kubernetes-validate not found: schemas not checked (pip install kubernetes-validate)")
    for name in RENDERS + list(COMBINATIONS):
        text = render(name, tmp)
        with open(os.path.join(tmp, name.replace("/", "_") + ".yaml"), "w") as f:
            f.write(text)
        docs = [d for d in yaml.safe_load_all(text) if d]
        print(f"ok: {name} renders ({len(docs)} objects: {', '.join(sorted(d['kind'] for d in docs))})")
        if have_validate:
            validate(name, docs, tmp, failures)
        before = len(failures.items)
        check_security(name, docs, failures)
        check_secret(name, docs, failures)
        check_network_policy(name, docs, failures)
        if any(d["kind"] == "JobSet" for d in docs):
            check_jobset(name, docs, failures)
        else:
            check_jobs(name, docs, failures)
        if len(failures.items) == before:
            print(f"ok: {name}: security, secret, network policy and failure policy contract")
    for f in failures.items:
        print(f"FAIL: {f}")
    if failures.items:
        return 1
    print(f"deploy: {len(RENDERS) + len(COMBINATIONS)} renders checked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
