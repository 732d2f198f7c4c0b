"""Reads a run folder's tb/ with TensorBoard's own event reader and checks it against the
run's metrics.jsonl and summary.json.

usage: check_tensorboard.py RUN_DIR coordinator|worker
Exits 77 when the tensorboard package is not installed (the Rust test then prints a skip line).
"""
import json
import math
import os
import sys

try:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
except ImportError:
    print("skipped: the Python package tensorboard is not installed (pip install tensorboard)")
    sys.exit(77)


def close(a, b):
    # Event files hold float32.
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)


def main():
    run, kind = sys.argv[1], sys.argv[2]
    acc = EventAccumulator(os.path.join(run, "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = {t: {e.step: e.value for e in acc.Scalars(t)} for t in tags["scalars"]}
    config = acc.Tensors("config")[0].tensor_proto.string_val[0].decode()
    assert "[train]" in config, config
    with open(os.path.join(run, "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    with open(os.path.join(run, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    for tag in ["train/loss", "train/accuracy", "train/learning_rate", "train/grad_norm",
                "train/tokens_per_second", "val/accuracy", "val/loss"]:
        assert scalars.get(tag), f"{tag} missing; have {sorted(scalars)}"
    checked = 0
    if kind == "coordinator":
        epochs = [r for r in records if "train_loss" in r]
        steps = epochs[0]["steps"]
        for r in epochs:
            at = r["epoch"] * steps
            for tag, key in [("val/accuracy", "val_accuracy"), ("val/loss", "val_loss"),
                             ("epoch/train_loss", "train_loss"), ("epoch/tokens_per_second", "tokens_per_second"),
                             ("epoch/communication_share", "comm_share")]:
                assert close(scalars[tag][at], r[key]), (tag, at, scalars[tag][at], r[key])
                checked += 1
        last = summary["epochs"] * steps
        # test/* is the last epoch's model, test_best/* the kept one (summary's test_accuracy).
        assert close(scalars["test/accuracy"][last], summary["last_epoch_test_accuracy"])
        assert close(scalars["test/loss"][last], summary["last_epoch_test_loss"])
        assert close(scalars["test_best/accuracy"][last], summary["test_accuracy"])
        assert close(scalars["test_best/loss"][last], summary["test_loss"])
        # One point per log_every steps of every epoch, at optimizer steps.
        assert max(scalars["train/loss"]) == last, max(scalars["train/loss"])
        checked += 4
        # Per-step records, once the coordinator writes them (issue 9), must agree too.
        for r in records:
            if r.get("type") == "step" and "loss" in r and "global_step" in r:
                assert close(scalars["train/loss"][r["global_step"]], r["loss"]), r
                checked += 1
    else:
        for r in records:
            if r.get("type") == "step":
                for tag, key in [("train/loss", "loss"), ("train/accuracy", "accuracy"),
                                 ("train/learning_rate", "lr"), ("train/grad_norm", "grad_norm"),
                                 ("train/tokens_per_second", "tokens_per_second")]:
                    assert close(scalars[tag][r["global_step"]], r[key]), (tag, r)
                    checked += 1
    # Evaluation records (worker train's, and the coordinator's test results) in their charts.
    for r in records:
        if r.get("type") == "eval":
            prefix = r["split"] + ("_best" if r["model"] == "best" else "")
            values = list(scalars[f"{prefix}/accuracy"].values())
            assert any(close(v, r["accuracy"]) for v in values), (prefix, r, values)
            checked += 1
    assert close(list(scalars["test_best/accuracy"].values())[-1], summary["test_accuracy"])
    print(f"tensorboard ok: {len(scalars)} scalar tags, {checked} values checked against metrics.jsonl")


main()
