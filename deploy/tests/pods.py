"""The pod machinery of run_pods.py and elastic_pods.py: a bridge network namespace (the
"cluster"), overlays/cpu rendered with kubectl kustomize, each pod of the rendered Jobs as a
Pod (its environment as the kubelet would make it), a read-only root for each, started in a
network namespace of its own with its own user and no privileges, and the checks that it is
so isolated. What the runs do with the pods (scenarios, faults, what must hold at the end) is
in run_pods.py.
"""

import json
import math
import os
import re
import shutil
import subprocess

try:
    import yaml
except ImportError:
    yaml = None

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEPLOY = os.path.join(REPO, "deploy")
NET_NS = "ddp-net"  # holds the bridge
BRIDGE = "ddpbr0"
SUBNET = "10.244.77"
CLUSTER_DOMAIN = "cluster.local"
NAMESPACE = "default"
CORPUS_MOUNT = "/corpus/aclImdb.tar.gz"
# A corpus folder (--class-folders) is bound here instead.
FOLDER_MOUNT = "/corpus/reviews"
# The unpacked OCI image the pods run from (run_pods.py --image-bundle; load_image), or None:
# the host's binaries in a minimal root.
IMAGE = None


def corpus_mount(corpus):
    return FOLDER_MOUNT if os.path.isdir(corpus) else CORPUS_MOUNT


# IMDB's ratings (the number after the review id in each file name) as four classes.
RATING_CLASSES = {1: "1-2", 2: "1-2", 3: "3-4", 4: "3-4", 7: "7-8", 8: "7-8", 9: "9-10", 10: "9-10"}


def make_class_folders(tarball, dest, per_class={"train": 150, "test": 60}):
    """A corpus of one folder per class (train/<class>/*.txt, test/<class>/*.txt), as a user
    brings their own data, cut from the IMDB tarball: four classes by rating."""
    import tarfile
    counts = {}
    with tarfile.open(tarball, "r:*") as tar:
        for m in tar:
            parts = m.name.split("/")
            if not m.isfile() or len(parts) != 4 or parts[1] not in per_class or parts[2] not in ("pos", "neg"):
                continue
            split, name = parts[1], parts[3]
            label = RATING_CLASSES.get(int(name.rsplit("_", 1)[1].split(".")[0]))
            if label is None or counts.get((split, label), 0) >= per_class[split]:
                continue
            counts[(split, label)] = counts.get((split, label), 0) + 1
            folder = os.path.join(dest, split, label)
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, name), "wb") as f:
                f.write(tar.extractfile(m).read())
            if len(counts) == 8 and all(counts[k] >= per_class[k[0]] for k in counts):
                break
    return dest


def log(msg):
    print(f"pods: {msg}", flush=True)


def sh(*args, check=True, **kw):
    return subprocess.run(list(args), check=check, **kw)


class Cluster:
    """The namespaces, processes and folders of one run; `close` removes all of them."""

    def __init__(self, work, tag):
        self.work = work
        self.tag = tag
        self.namespaces = []
        self.procs = {}
        self.next_ip = 10
        self.bridge_ready = False
        # Network faults (netfaults.Latency, netfaults.Rules): undone before the namespaces go.
        self.faults = []

    def ns_name(self, pod):
        return f"ddp{self.tag}-{pod}"[:60]

    def setup_bridge(self):
        self.bridge_ns = f"{NET_NS}{self.tag}"
        sh("ip", "netns", "add", self.bridge_ns)
        self.namespaces.append(self.bridge_ns)
        sh("ip", "-n", self.bridge_ns, "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "-n", self.bridge_ns, "link", "set", BRIDGE, "up")
        sh("ip", "-n", self.bridge_ns, "link", "set", "lo", "up")
        self.bridge_ready = True

    def add_pod_network(self, pod):
        """A namespace with eth0 on the bridge; returns (namespace, IP)."""
        ns = self.ns_name(pod)
        ip = f"{SUBNET}.{self.next_ip}"
        veth = f"v{self.tag}{self.next_ip}"
        self.next_ip += 1
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        sh("ip", "-n", self.bridge_ns, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "-n", self.bridge_ns, "link", "set", veth, "master", BRIDGE, "up")
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "route", "add", "default", "dev", "eth0")
        return ns, ip

    def remove_namespace(self, ns):
        sh("ip", "netns", "del", ns, check=False, stderr=subprocess.DEVNULL)
        if ns in self.namespaces:
            self.namespaces.remove(ns)

    def close(self):
        for fault in reversed(self.faults):
            fault.close()
        self.faults.clear()
        for name, p in list(self.procs.items()):
            if p.poll() is None:
                p.kill()
                p.wait()
        for ns in list(reversed(self.namespaces)):
            self.remove_namespace(ns)
        # Every mount was made in a pod's private mount namespace, gone with its processes.
        shutil.rmtree(self.work, ignore_errors=True)


def render(workers, work, env=None, min_workers=None):
    """overlays/cpu with N workers (--workers N, or MIN:N with `min_workers`) and
    configs/test-tiny.toml as the job config; `env` adds variables to a Job's container
    ({job name: {name: value}}), as a user's overlay would."""
    overlay = os.path.join(work, "overlay")
    os.makedirs(overlay)
    with open(os.path.join(REPO, "configs", "test-tiny.toml")) as f:
        config = f.read()
    # Checkpoints every 3 steps, so that a killed pod's group resumes mid-epoch.
    with open(os.path.join(overlay, "job.toml"), "w") as f:
        f.write(config + "\n[checkpoint]\nevery_steps = 3\nevery_seconds = 0\n")
    shutil.copy(os.path.join(DEPLOY, "overlays", "cpu", "world-size.yaml"), overlay)
    cpu = os.path.relpath(os.path.join(DEPLOY, "overlays", "cpu"), overlay)
    with open(os.path.join(overlay, "kustomization.yaml"), "w") as f:
        f.write(
            f"""apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - {cpu}
configMapGenerator:
  - name: imdb-ddp-config
    behavior: replace
    files:
      - job.toml
patches:
  - target:
      kind: Job
      name: imdb-ddp-workers
    patch: |-
      - op: replace
        path: /spec/completions
        value: {workers}
      - op: replace
        path: /spec/successPolicy/rules/0/succeededCount
        value: {min_workers or workers}
{env_patches(env or {})}replacements:
  - path: world-size.yaml
"""
        )
    out = sh("kubectl", "kustomize", overlay, capture_output=True, text=True)
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    with open(os.path.join(work, "rendered.yaml"), "w") as f:
        f.write(out.stdout)
    return docs


def env_patches(env):
    text = ""
    for job, variables in env.items():
        ops = "".join(
            f"""
      - op: add
        path: /spec/template/spec/containers/0/env/-
        value: {{name: {name}, value: "{value}"}}"""
            for name, value in variables.items()
        )
        text += f"""  - target:
      kind: Job
      name: {job}
    patch: |-{ops}
"""
    return text


def quantity(value, divisor="1"):
    """A resource quantity over a divisor, rounded up, as resourceFieldRef gives it."""

    def parse(q):
        q = str(q)
        units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}
        for u, f in sorted(units.items(), key=lambda kv: -len(kv[0])):
            if q.endswith(u):
                return float(q[: -len(u)]) * f
        return float(q)

    return str(max(1, math.ceil(parse(value) / parse(divisor))))


def expand(text, env):
    """Kubernetes' $(VAR) expansion: $$ escapes, unknown references stay as written."""
    return re.sub(
        r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
        lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
        text,
    )


class Pod:
    def __init__(self, job, index, docs, secrets):
        self.job = job
        self.index = index
        self.spec = job["spec"]["template"]["spec"]
        self.container = self.spec["containers"][0]
        self.hostname = f"{job['metadata']['name']}-{index}"
        self.name = f"{self.hostname}-{os.urandom(3).hex()}"
        self.configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
        self.secrets = secrets
        self.annotations = {"batch.kubernetes.io/job-completion-index": str(index)}

    def environment(self, ip):
        """The container's environment, as the kubelet builds it."""
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOSTNAME": self.hostname,
            # Set by the Job controller in every pod of an Indexed Job.
            "JOB_COMPLETION_INDEX": str(self.index),
        }
        for e in self.container.get("env", []):
            if "value" in e:
                env[e["name"]] = expand(e["value"], env)
                continue
            src = e["valueFrom"]
            if "fieldRef" in src:
                path = src["fieldRef"]["fieldPath"]
                m = re.fullmatch(r"metadata\.annotations\['(.+)'\]", path)
                value = {
                    "status.podIP": ip,
                    "metadata.name": self.name,
                    "metadata.namespace": NAMESPACE,
                    "spec.nodeName": "node-0",
                }.get(path)
                if m:
                    value = self.annotations.get(m.group(1), "")
                if value is None:
                    raise SystemExit(f"pods: unsupported fieldRef {path}")
            elif "secretKeyRef" in src:
                ref = src["secretKeyRef"]
                value = self.secrets[ref["name"]][ref["key"]]
            elif "configMapKeyRef" in src:
                ref = src["configMapKeyRef"]
                value = self.configmaps[ref["name"]]["data"][ref["key"]]
            elif "resourceFieldRef" in src:
                ref = src["resourceFieldRef"]
                kind, res = ref["resource"].split(".", 1)
                value = quantity(self.container["resources"][kind][res], ref.get("divisor", "1"))
            else:
                raise SystemExit(f"pods: unsupported env source {src}")
            env[e["name"]] = value
        return env

    def command(self, env):
        return [expand(a, env) for a in self.container.get("command", []) + self.container.get("args", [])]


def prepare_root(cluster, pod, ns, ip, hosts, binaries, corpus, image=None):
    """The files and a shell script that builds the pod's mount namespace and runs it."""
    d = os.path.join(cluster.work, pod.name)
    os.makedirs(d)
    sc = pod.spec.get("securityContext", {})
    uid, gid = sc.get("runAsUser", 0), sc.get("runAsGroup", 0)
    fs_group = sc.get("fsGroup")
    with open(os.path.join(d, "hosts"), "w") as f:
        f.write(f"127.0.0.1 localhost\n{hosts}")
    with open(os.path.join(d, "resolv.conf"), "w") as f:
        f.write(f"search {NAMESPACE}.svc.{CLUSTER_DOMAIN} svc.{CLUSTER_DOMAIN} {CLUSTER_DOMAIN}\noptions ndots:5 attempts:1 timeout:1\n")
    # Volumes: ConfigMap and Secret files (read-only), emptyDirs (writable, fsGroup).
    binds = []  # (host path, path in the pod, read-only)
    volumes = {v["name"]: v for v in pod.spec.get("volumes", [])}
    for m in pod.container.get("volumeMounts", []):
        v = volumes[m["name"]]
        src = os.path.join(d, "volumes", m["name"])
        os.makedirs(src, exist_ok=True)
        if "configMap" in v:
            for k, text in pod.configmaps[v["configMap"]["name"]]["data"].items():
                with open(os.path.join(src, k), "w") as f:
                    f.write(text)
        elif "secret" in v:
            mode = v["secret"].get("defaultMode", 0o644)
            for k, value in pod.secrets[v["secret"]["secretName"]].items():
                path = os.path.join(src, k)
                with open(path, "w") as f:
                    f.write(value)
                os.chown(path, 0, fs_group if fs_group is not None else 0)
                os.chmod(path, mode)
        elif "emptyDir" in v:
            os.chown(src, uid, fs_group if fs_group is not None else gid)
            os.chmod(src, 0o2775)
        else:
            raise SystemExit(f"pods: unsupported volume {v}")
        os.chmod(os.path.join(d, "volumes"), 0o755)
        binds.append((src, m["mountPath"], bool(m.get("readOnly")) or "configMap" in v or "secret" in v))
    os.chmod(d, 0o755)
    if image is None:
        for image_path, host_path in binaries.items():
            binds.append((host_path, image_path, True))
        libtorch = os.path.realpath(os.path.join(REPO, ".libtorch"))
        # The binaries' RUNPATH names <repo>/.libtorch/torch/lib (the image puts libtorch at
        # the path its binaries name, too). A worktree whose .libtorch (and target) link to
        # another checkout runs that checkout's binaries, whose RUNPATH names the link's
        # target: libtorch goes at both paths.
        for at in sorted({os.path.join(REPO, ".libtorch"), libtorch}):
            binds.append((libtorch, at, True))
    if corpus:
        binds.append((corpus, corpus_mount(corpus), True))
    binds.append((os.path.join(d, "hosts"), "/etc/hosts", True))
    binds.append((os.path.join(d, "resolv.conf"), "/etc/resolv.conf", True))

    root = os.path.join(d, "root")
    os.makedirs(root)
    lines = [
        "set -eu",
        "mount --make-rprivate /",
        f"hostname {pod.hostname}",
        f"mount -t tmpfs -o mode=755 rootfs {root}",
    ]
    # The image's folders (an unpacked OCI bundle), else the host's system folders, read-only.
    base = image["rootfs"] if image else "/"
    entries = sorted(os.listdir(base)) if image else ["usr", "bin", "sbin", "lib", "lib64", "etc"]
    for entry in entries:
        src = os.path.join(base, entry)
        if entry in ("proc", "dev", "sys", "tmp"):
            continue
        if os.path.islink(src):
            lines.append(f"ln -s {os.readlink(src)} {root}/{entry}")
        elif os.path.isdir(src):
            lines += [f"mkdir -p {root}/{entry}", f"mount --rbind -o ro=recursive {src} {root}/{entry}"]
    lines += [
        f"mkdir -p {root}/proc {root}/dev {root}/sys {root}/tmp",
        f"mount -t proc proc {root}/proc",
        f"mount --rbind /dev {root}/dev",
        f"mount --rbind -o ro=recursive /sys {root}/sys",
    ]
    for src, dst, ro in binds:
        if image:
            # Inside the image's (read-only) folders: /var/run is a link to /run, say. Resolve
            # links within the image and make the mount point in the unpacked copy, as a
            # runtime makes it in the container's layer.
            dst = resolve_in_root(image["rootfs"], dst)
            host_target = image["rootfs"] + dst
            if os.path.isdir(src):
                os.makedirs(host_target, exist_ok=True)
            elif not os.path.exists(host_target):
                os.makedirs(os.path.dirname(host_target), exist_ok=True)
                open(host_target, "a").close()
        target = root + dst
        if os.path.isdir(src):
            lines.append(f"mkdir -p {target}")
        else:
            lines.append(f"mkdir -p {os.path.dirname(target)} && touch {target}")
        lines.append(f"mount --bind {src} {target}")
        if ro:
            lines.append(f"mount -o remount,bind,ro {target}")
    # The root itself read-only, after every mount point exists.
    lines.append(f"mount -o remount,ro {root}")
    groups = ",".join(str(g) for g in sorted({gid, fs_group} - {None}))
    env = pod.environment(ip)
    if image:
        # The runtime starts from the image's environment; the pod's entries override it.
        env = {**image["env"], **env}
    if corpus and pod.container["name"] == "coordinator":
        env["IMDB_DATA"] = corpus_mount(corpus)
    cmd = pod.command(env)
    envargs = " ".join(shlex(f"{k}={v}") for k, v in env.items())
    lines.append(
        f"exec chroot {root} setpriv --reuid={uid} --regid={gid} --groups={groups} --no-new-privs "
        f"--inh-caps=-all --bounding-set=-all --reset-env env -i {envargs} {' '.join(shlex(a) for a in cmd)}"
    )
    script = os.path.join(d, "start.sh")
    with open(script, "w") as f:
        f.write("\n".join(lines) + "\n")
    return script


def resolve_in_root(rootfs, path):
    """`path` inside `rootfs` with every symbolic link followed within it."""
    parts = [p for p in path.split("/") if p]
    out = []
    for _ in range(40):
        if not parts:
            return "/" + "/".join(out)
        part = parts.pop(0)
        candidate = os.path.join(rootfs, *out, part)
        if os.path.islink(candidate):
            link = os.readlink(candidate)
            if link.startswith("/"):
                out = []
            parts = [p for p in link.split("/") if p] + parts
        elif part == "..":
            out = out[:-1]
        elif part != ".":
            out.append(part)
    raise SystemExit(f"pods: too many links in {path}")


def shlex(s):
    import shlex as _shlex

    return _shlex.quote(s)


def start_pod(cluster, pod, hosts, binaries, corpus, ns, ip):
    script = prepare_root(cluster, pod, ns, ip, hosts, binaries, corpus, IMAGE)
    logf = open(os.path.join(cluster.work, pod.name + ".log"), "w")
    p = subprocess.Popen(
        ["ip", "netns", "exec", ns, "unshare", "--mount", "--uts", "--propagation", "private", "sh", script],
        stdout=logf,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    cluster.procs[pod.name] = p
    log(f"pod {pod.name} ({pod.hostname}, {ip}) started: {' '.join(pod.command(pod.environment(ip)))}")
    return p


def check_isolation(pod, pid, ip):
    """What the pod's process really runs as: its user, no privileges, a read-only root,
    its own network namespace and IP, and its host name."""
    with open(f"/proc/{pid}/status") as f:
        status = dict(line.split(":", 1) for line in f if ":" in line)
    uid = pod.spec["securityContext"]["runAsUser"]
    problems = []
    if status["Uid"].split()[0] != str(uid):
        problems.append(f"uid {status['Uid'].split()}")
    if status.get("NoNewPrivs", "").strip() != "1":
        problems.append("no_new_privs is off")
    if int(status["CapEff"], 16) != 0 or int(status["CapBnd"], 16) != 0:
        problems.append(f"capabilities {status['CapEff'].strip()}/{status['CapBnd'].strip()}")
    with open(f"/proc/{pid}/mountinfo") as f:
        root = [line.split() for line in f if line.split()[4] == "/"]
    if not root or "ro" not in root[0][5].split(","):
        problems.append(f"root mount {root}")
    if os.readlink(f"/proc/{pid}/ns/net") == os.readlink("/proc/self/ns/net"):
        problems.append("runs in the host's network namespace")
    with open(f"/proc/{pid}/net/fib_trie") as f:
        if ip not in f.read():
            problems.append(f"has no {ip}")
    if problems:
        raise SystemExit(f"FAIL: pod {pod.name} (pid {pid}): {'; '.join(problems)}")
    log(f"ok: pod {pod.name}: uid {uid}, no privileges, read-only root, its own network with {ip}")


def read_log(cluster, pod):
    with open(os.path.join(cluster.work, pod.name + ".log")) as f:
        return f.read()


def load_image(bundle):
    """An unpacked OCI image (`umoci unpack`): its root folder and its environment."""
    with open(os.path.join(bundle, "config.json")) as f:
        config = json.load(f)
    env = dict(e.split("=", 1) for e in config["process"].get("env", []))
    return {"rootfs": os.path.join(bundle, config["root"]["path"]), "env": env}
