"""Broken variants of the renders that a user could make, each with the message that
check_manifests.py must refuse it with: the checks themselves are tested. A variant is a
kustomization over a render (`base`) with JSON patches, and with the render's replacements
run again where `replacements` names them, as a user's edit of its numbers would run them.
"""

import json


def json_patch(kind, name, *ops):
    """A kustomization patch entry of JSON-patch `ops` (op, path, value)."""
    lines = "".join(f"      - {{op: {op}, path: {path}, value: {json.dumps(value)}}}\n" for op, path, value in ops)
    return f"  - target:\n      kind: {kind}\n      name: {name}\n    patch: |-\n{lines}"


WORKERS_JOB = ("Job", "imdb-ddp-workers")
COORD_ENV0 = "/spec/template/spec/containers/0/env/0/value"  # TRAINER_WORKERS comes first
JOBSET_WORKERS = "/spec/replicatedJobs/1/template/spec"
MASTER_ENV0 = "/spec/pytorchReplicaSpecs/Master/template/spec/containers/0/env/0/value"
# Broken variants that a user could make, and the message each must be refused with.
VARIANTS = {
    "overlays/cpu with MIN > MAX": dict(
        base="overlays/cpu", replacements="overlays/cpu/world-size.yaml",
        patches=json_patch(*WORKERS_JOB, ("replace", "/spec/successPolicy/rules/0/succeededCount", 3)),
        expect="TRAINER_WORKERS 3:2: MIN (3) must be at least 1 and at most MAX (2)"),
    "overlays/cpu with --workers that disagrees with completions": dict(
        base="overlays/cpu",
        patches=json_patch("Job", "imdb-ddp-coordinator", ("replace", COORD_ENV0, "2:4")),
        expect="MAX: completions 2 and parallelism 2, but the coordinator's TRAINER_WORKERS says MAX = 4"),
    "overlays/cpu elastic without a successPolicy": dict(
        base="overlays/cpu",
        patches=json_patch(*WORKERS_JOB, ("remove", "/spec/successPolicy", None))
        + json_patch("Job", "imdb-ddp-coordinator", ("replace", COORD_ENV0, "1:2")),
        expect="an elastic job (MIN 1 < MAX 2) needs one successPolicy rule"),
    "jobset with MIN > MAX": dict(
        base="jobset", replacements="jobset/world-size.yaml",
        patches=json_patch("JobSet", "imdb-ddp", ("replace", JOBSET_WORKERS + "/successPolicy/rules/0/succeededCount", 4)),
        expect="TRAINER_WORKERS 4:3: MIN (4) must be at least 1 and at most MAX (3)"),
    "jobset whose workers' Job cannot replace a pod": dict(
        base="jobset",
        patches=json_patch("JobSet", "imdb-ddp", ("replace", JOBSET_WORKERS + "/backoffLimit", 0)),
        expect="jobset whose workers' Job cannot replace a pod/workers: backoffLimit > 0"),
    "pytorchjob with minReplicas > maxReplicas": dict(
        base="pytorchjob", replacements="pytorchjob/world-size.yaml",
        patches=json_patch("PyTorchJob", "imdb-ddp", ("replace", "/spec/elasticPolicy/minReplicas", 5)),
        expect="elasticPolicy minReplicas 5 and maxReplicas 3: need 1 <= minReplicas <= maxReplicas"),
    "pytorchjob with --workers that disagrees with elasticPolicy": dict(
        base="pytorchjob",
        patches=json_patch("PyTorchJob", "imdb-ddp", ("replace", MASTER_ENV0, "2:4")),
        expect="elasticPolicy 2:3 (PET_NNODES) but the coordinator's TRAINER_WORKERS is 2:4"),
    "pytorchjob with a misspelled elasticPolicy field": dict(
        base="pytorchjob",
        patches=json_patch("PyTorchJob", "imdb-ddp", ("add", "/spec/elasticPolicy/minReplica", 2)),
        expect="Additional properties are not allowed ('minReplica' was unexpected)", needs="jsonschema"),
}
