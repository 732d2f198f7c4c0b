"""The JobSet and PyTorchJob custom resources checked against their CRDs' schemas, kept in
schemas/ (each file's $comment names the repository, tag and path it was taken from; the
pod and job templates are left out there, since check_manifests.py validates those as Jobs
with kubernetes-validate). Unknown fields are refused, as the API server's strict field
validation refuses them (`kubectl apply --validate=strict`): a CRD's structural schema would
otherwise drop a misspelled field without a word.
"""

import json
import os

SCHEMAS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "schemas")
# Custom resources: kind -> their CRD's schema in schemas/.
CRD_SCHEMAS = {
    "JobSet": "jobset-jobset.x-k8s.io-v1alpha2-jobset-v0.8.0.json",
    "PyTorchJob": "pytorchjob-kubeflow.org-v1-training-operator-v1.9.0.json",
}


def strict(schema):
    """A CRD schema that refuses unknown fields, as the API server's strict field validation
    (`kubectl apply --validate=strict`) does; a structural schema would prune them silently."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema and not schema.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [strict(v) for v in schema]
    return schema


def validate_crds(name, docs, failures, skip):
    """Each JobSet and PyTorchJob against its CRD's schema (jsonschema); `skip(message)`
    where jsonschema is missing."""
    try:
        import jsonschema
    except ImportError:
        skip(f"{name}: jsonschema not found: the custom resources' schemas not checked (pip install jsonschema)")
        return
    for d in docs:
        if d.get("kind") not in CRD_SCHEMAS:
            continue
        with open(os.path.join(SCHEMAS, CRD_SCHEMAS[d["kind"]])) as f:
            schema = strict(json.load(f))
        errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(d), key=lambda e: list(e.absolute_path))
        text = "; ".join(f"{'.'.join(str(p) for p in e.absolute_path) or '(top)'}: {e.message}" for e in errors[:5])
        if failures.check(not errors, f"{name}: the {d['kind']} against {CRD_SCHEMAS[d['kind']]}: {text}"):
            print(f"ok: {name}: the {d['kind']} validates against its CRD's schema ({CRD_SCHEMAS[d['kind']]}, unknown fields refused)")
