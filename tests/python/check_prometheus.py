"""Checks two scrapes of a running job's /metrics with the prometheus_client parser.

usage: check_prometheus.py FIRST SECOND WORLD_SIZE
Exits 77 when prometheus_client is not installed (the Rust test then prints a skip line).
"""
import sys

try:
    from prometheus_client.openmetrics.parser import text_string_to_metric_families
except ImportError:
    print("skipped: the Python package prometheus_client is not installed (pip install prometheus_client)")
    sys.exit(77)


def parse(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    # The strict OpenMetrics parser: it rejects a malformed exposition (names, types, # EOF).
    families = {f.name: f for f in text_string_to_metric_families(text)}
    return families


def samples(families, family, sample=None):
    fam = families[family]
    return [s for s in fam.samples if sample is None or s.name == sample]


def per_rank(families, family, sample):
    return {s.labels["rank"]: s.value for s in samples(families, family, sample)}


def main():
    first, second, world = parse(sys.argv[1]), parse(sys.argv[2]), int(sys.argv[3])
    ranks = {str(r) for r in range(world)}
    expected = {
        "trainer_steps": "counter",
        "trainer_tokens": "counter",
        "trainer_examples": "counter",
        "trainer_step_seconds": "histogram",
        "trainer_allreduce_seconds": "histogram",
        "trainer_communication_share": "gauge",
        "trainer_loss": "gauge",
        "trainer_learning_rate": "gauge",
        "trainer_grad_norm": "gauge",
        "trainer_eval_accuracy": "gauge",
        "trainer_workers_registered": "gauge",
        "trainer_worker_last_heartbeat_age_seconds": "gauge",
        "trainer_restarts": "counter",
        "trainer_checkpoint_seconds": "histogram",
        "trainer_epoch": "gauge",
        "trainer_job_state": "gauge",
    }
    for name, kind in expected.items():
        assert name in second, f"{name} missing; have {sorted(second)}"
        assert second[name].type == kind, f"{name} is a {second[name].type}, not a {kind}"
    # Per-rank families carry exactly the job's ranks.
    for family, sample in [
        ("trainer_steps", "trainer_steps_total"),
        ("trainer_tokens", "trainer_tokens_total"),
        ("trainer_examples", "trainer_examples_total"),
        ("trainer_step_seconds", "trainer_step_seconds_count"),
        ("trainer_allreduce_seconds", "trainer_allreduce_seconds_count"),
        ("trainer_loss", "trainer_loss"),
        ("trainer_worker_last_heartbeat_age_seconds", "trainer_worker_last_heartbeat_age_seconds"),
    ]:
        got = set(per_rank(second, family, sample))
        assert got == ranks, f"{sample}: ranks {sorted(got)}, expected {sorted(ranks)}"
    # Counters grow while the job trains.
    for family, sample in [("trainer_steps", "trainer_steps_total"), ("trainer_tokens", "trainer_tokens_total"),
                           ("trainer_examples", "trainer_examples_total")]:
        a, b = per_rank(first, family, sample), per_rank(second, family, sample)
        for r in ranks:
            assert b[r] > a.get(r, 0), f"{sample}{{rank={r}}} did not grow: {a.get(r)} -> {b[r]}"
    # Histogram counts equal the step counter.
    steps = per_rank(second, "trainer_steps", "trainer_steps_total")
    counts = per_rank(second, "trainer_step_seconds", "trainer_step_seconds_count")
    assert steps == counts, f"step counter {steps} vs histogram counts {counts}"
    ages = per_rank(second, "trainer_worker_last_heartbeat_age_seconds", "trainer_worker_last_heartbeat_age_seconds")
    assert all(0 <= a < 10 for a in ages.values()), ages
    registered = samples(second, "trainer_workers_registered")[0].value
    assert registered == world, f"workers registered {registered}"
    states = {s.labels["state"]: s.value for s in samples(second, "trainer_job_state")}
    assert sum(states.values()) == 1, states
    assert 0 < samples(second, "trainer_learning_rate")[0].value < 1
    assert samples(second, "trainer_epoch")[0].value >= 1
    val = [s.value for s in samples(second, "trainer_eval_accuracy") if s.labels == {"split": "validation"}]
    assert len(val) == 1 and 0 <= val[0] <= 1, val
    print(f"prometheus ok: {len(second)} families, steps {steps}")


main()
