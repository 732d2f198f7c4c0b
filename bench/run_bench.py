#!/usr/bin/env python3
"""Side-by-side benchmark: our Rust trainer against the PyTorch reference (bench/reference/).

    scripts/bench_env.sh && cargo build --release --bins
    python3 bench/run_bench.py                          # every section, 3 repetitions, medians
    python3 bench/run_bench.py --sections pipeline,train1 --reps 1
    python3 bench/run_bench.py --device cuda            # on a GPU host (BENCH_TORCH=full venv)

Each measurement runs ours and the reference ALTERNATELY on the same settings (the order
flips every repetition so that drift in the machine's load does not favour one side), then
prints one markdown table per section with the medians and the ratio ours / reference,
the machine, the date and the exact commands, and rewrites that section of
bench/RESULTS.md (sections not run are kept as they were). Nothing in RESULTS.md is
written by hand. A section whose side is missing (a binary not built, a CLI without the
needed flag, no torch venv) becomes a row "not available: <why>", never a failure.

Sections:
  pipeline   load + tokenize + vocab + encode of the full corpus (no cache), both sides
  train1     training tokens/s, one process, the same small model and batch:
             ours as configured vs the tutorial as written, and like for like
  train2     the same with 2 processes: ours (coordinator, TCP ring) vs torchrun + DDP (gloo)
  tta        time to a target accuracy, each side with its own best settings (stated)
  allreduce  our ring vs gloo: all-reduce of the 51 MB buffer among 2 and 4 processes

Only the standard library is needed here; the reference runs in .venv-bench (its python is
--python). Run logs go to runs/bench/<date>/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "bench" / "reference"
RESULTS = ROOT / "bench" / "RESULTS.md"
SECTIONS = ("pipeline", "train1", "train2", "tta", "allreduce")
ALLREDUCE_NUMEL = 100_684 * 128  # the full vocab's embedding gradient: 12,887,552 f32, 51.55 MB

# The small configuration of the throughput sections: small enough for a 2-core CPU, the
# same on both sides. Reviews are cut to their first max_len tokens.
SMALL = {
    "embed_dim": 64, "hidden": 128, "layers": 1, "dropout": 0.5, "batch_size": 32,
    "max_len": 256, "lr": 1e-3, "train_subset": 8000, "val_fraction": 0.05, "test_subset": 256,
    "min_freq": 1, "seed": 0,
}

# The seed's (the tutorial's) model and batch on whole reviews: the GPU comparison's setting.
SEED = dict(SMALL, embed_dim=128, hidden=256, layers=2, max_len=0, train_subset=0, val_fraction=0.05,
            test_subset=256)


# ---------------------------------------------------------------------------------------
# Running commands
# ---------------------------------------------------------------------------------------


@dataclass
class Run:
    cmd: list[str]
    rc: int | None  # None: timed out
    stdout: str
    stderr: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.rc == 0

    def why(self) -> str:
        if self.rc is None:
            return f"timed out after {self.seconds:.0f} s"
        tail = [l for l in self.stderr.strip().splitlines() if l.strip()][-1:] or ["(no stderr)"]
        return f"exit {self.rc}: {tail[0][:200]}"


class Runner:
    def __init__(self, log_dir: Path, data: str, env: dict, verbose: bool):
        self.log_dir, self.data, self.env, self.verbose = log_dir, data, env, verbose
        log_dir.mkdir(parents=True, exist_ok=True)
        self.count = 0

    def show(self, cmd: list[str]) -> str:
        """The command as a person would type it: repo-relative paths, $IMDB_DATA."""
        text = shlex.join(cmd).replace(self.data, "$IMDB_DATA")
        return text.replace(str(ROOT) + "/", "")

    def run(self, label: str, cmd: list[str], timeout: float, env: dict | None = None) -> Run:
        self.count += 1
        stem = self.log_dir / f"{self.count:03d}-{label}"
        print(f"  $ {self.show(cmd)}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        with open(f"{stem}.out", "w") as out, open(f"{stem}.err", "w") as err:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, env={**self.env, **(env or {})},
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                # Our own child's process group (torchrun's and the coordinator's children too).
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                rc = None
        seconds = time.perf_counter() - start
        result = Run(cmd, rc, Path(f"{stem}.out").read_text(errors="replace"),
                     Path(f"{stem}.err").read_text(errors="replace"), seconds)
        status = "ok" if result.ok else result.why()
        print(f"    {status} ({seconds:.1f} s; logs {stem.relative_to(ROOT)}.*)", file=sys.stderr, flush=True)
        return result


def json_lines(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def last_json(text: str) -> dict | None:
    """The last JSON object printed: one line, or a pretty-printed object at the end."""
    lines = json_lines(text)
    if lines:
        return lines[-1]
    start = text.rfind("\n{")
    for candidate in (text[start + 1:] if start >= 0 else None, text.strip()):
        if candidate and candidate.strip().startswith("{"):
            try:
                return json.loads(candidate)
            except json.JSONDecodeError:
                pass
    return None


# ---------------------------------------------------------------------------------------
# Results: rows, sections, tables
# ---------------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    unit: str  # "s" (lower is better) or "tokens/s" (higher is better)
    ours: list[float] = field(default_factory=list)
    ref: list[float] = field(default_factory=list)
    target: str = ""  # e.g. ">= 2" on the speed-up
    target_speedup: float | None = None
    missing: str = ""  # "not available: ..." or "failed: ..."
    note: str = ""

    def median(self, values: list[float]) -> float | None:
        return statistics.median(values) if values else None

    def cells(self) -> list[str]:
        o, r = self.median(self.ours), self.median(self.ref)
        fmt = {"tokens/s": lambda v: f"{v:,.0f}", "%": lambda v: f"{v:.1f}"}.get(self.unit, lambda v: f"{v:.3f}")
        ours = f"{fmt(o)} {self.unit}" if o is not None else "–"
        ref = f"{fmt(r)} {self.unit}" if r is not None else "–"
        ratio = speed = met = ""
        if o is not None and r is not None and o > 0 and r > 0:
            ratio = f"{o / r:.2f}"
            if self.unit != "%":
                speedup = r / o if self.unit == "s" else o / r
                speed = f"{speedup:.2f}× faster" if speedup >= 1 else f"{speedup:.2f}× (slower)"
                if self.target_speedup is not None:
                    met = "yes" if speedup >= self.target_speedup else f"no ({speedup / self.target_speedup:.0%} of target)"
        if self.missing:
            met = self.missing
        runs = "; ".join(
            f"{side}: " + ", ".join(fmt(v) for v in vals)
            for side, vals in (("ours", self.ours), ("ref", self.ref)) if vals
        )
        return [self.name, ours, ref, ratio, speed, self.target, met, runs]


@dataclass
class Section:
    key: str
    title: str
    rows: list[Row] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    settings: str = ""
    files: dict[str, str] = field(default_factory=dict)  # file shown in full -> its text

    def command(self, text: str) -> None:
        if text not in self.commands:
            self.commands.append(text)

    def markdown(self, header: str) -> str:
        lines = [f"## {self.title}", "", header, ""]
        if self.settings:
            lines += [self.settings, ""]
        cols = ["Measurement", "Ours (median)", "Reference (median)", "Ours / reference", "Ours is",
                "Target (ours is)", "Met", "Runs"]
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "|".join("---" for _ in cols) + "|")
        for row in self.rows:
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row.cells()) + " |")
        if self.notes:
            lines.append("")
            lines += [f"- {n}" for n in self.notes]
        if self.commands:
            lines += ["", "Commands (one repetition; ours and the reference alternate):", "", "```"]
            lines += self.commands
            lines.append("```")
        for name, text in self.files.items():
            lines += ["", f"`{name}`:", "", "```toml", text.rstrip("\n"), "```"]
        return "\n".join(lines) + "\n"


def alternate(reps: int, ours, ref) -> None:
    """Calls ours(rep) and ref(rep) alternately, flipping the order every repetition."""
    for rep in range(reps):
        pair = (ours, ref) if rep % 2 == 0 else (ref, ours)
        for fn in pair:
            fn(rep)


# ---------------------------------------------------------------------------------------
# What is available
# ---------------------------------------------------------------------------------------


def help_text(cmd: list[str]) -> str | None:
    try:
        p = subprocess.run(cmd + ["--help"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout + p.stderr if p.returncode == 0 else None


class Sides:
    """Checks, once, which of our binaries and the reference venv can run."""

    def __init__(self, args):
        self.args = args
        rel = ROOT / "target" / "release"
        self.pipeline_bench = rel / "pipeline_bench"
        self.worker = rel / "worker"
        self.coordinator = rel / "coordinator"
        self.ring_bench = rel / "ring_bench" if (rel / "ring_bench").is_file() else None
        self._cache: dict[str, str] = {}

    def _check(self, key: str, fn) -> str:
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    def reference(self) -> str:
        def check() -> str:
            py = self.args.python
            if not Path(py).exists() and not shutil.which(py):
                return f"not available: {py} missing (run scripts/bench_env.sh)"
            p = subprocess.run([py, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True)
            if p.returncode != 0:
                return f"not available: torch does not import in {py} (run scripts/bench_env.sh)"
            self.torch_version = p.stdout.strip()
            if self.args.device == "cuda":
                p = subprocess.run([py, "-c", "import torch; assert torch.cuda.is_available()"], capture_output=True)
                if p.returncode != 0:
                    return "not available: torch in the venv sees no CUDA device (BENCH_TORCH=full scripts/bench_env.sh)"
            return ""
        return self._check("reference", check)

    def ours_pipeline(self) -> str:
        def check() -> str:
            h = help_text([str(self.pipeline_bench)])
            if h is None:
                return "not available: target/release/pipeline_bench not built (cargo build --release -p trainer-bench)"
            return "" if "--json" in h else "not available: pipeline_bench has no --json flag"
        return self._check("pipeline", check)

    def ours_worker(self) -> str:
        def check() -> str:
            h = help_text([str(self.worker), "train"])
            if h is None:
                return "not available: target/release/worker (with `train`) not built (cargo build --release --bins)"
            missing = [f for f in ("--config", "--out", "--data") if f not in h]
            return f"not available: `worker train` lacks {', '.join(missing)}" if missing else ""
        return self._check("worker", check)

    def ours_coordinator(self) -> str:
        def check() -> str:
            h = help_text([str(self.coordinator)])
            if h is None:
                return "not available: target/release/coordinator not built (cargo build --release --bins)"
            if "--workers" not in h:
                return "not available: coordinator has no --workers (the distributed trainer is not in yet)"
            # The coordinator starts its local workers as `worker join`.
            w = help_text([str(self.worker)])
            if w is None or not re.search(r"^\s+join\b", w, re.M):
                return "not available: target/release/worker has no `join` subcommand (needed by the coordinator's workers)"
            return self.ours_worker()
        return self._check("coordinator", check)

    def ours_ring(self) -> str:
        def check() -> str:
            if self.ring_bench is None:
                return "not available: target/release/ring_bench not built (cargo build --release --bins)"
            return "" if help_text([str(self.ring_bench)]) is not None else f"not available: {self.ring_bench.name} --help fails"
        return self._check("ring", check)


# ---------------------------------------------------------------------------------------
# Command builders
# ---------------------------------------------------------------------------------------


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    return repr(v)


def write_ours_config(path: Path, s: dict, *, batch_order: str, steps: int, epochs: int = 1,
                      device: str = "cpu", bptt: int = 0) -> Path:
    """A job config (core/src/config.rs: [data] [model] [train]) with the settings `s`."""
    sections = {
        "data": {"min_freq": s["min_freq"], "max_len": s["max_len"], "val_fraction": s["val_fraction"],
                 "train_subset": s["train_subset"], "test_subset": s["test_subset"]},
        "model": {"embed_dim": s["embed_dim"], "hidden": s["hidden"], "layers": s["layers"],
                  "dropout": s["dropout"]},
        "train": {"batch_size": s["batch_size"], "epochs": epochs, "lr": s["lr"], "batch_order": batch_order,
                  "bptt": bptt, "seed": s["seed"], "device": device, "max_steps_per_epoch": steps},
    }
    text = "# written by bench/run_bench.py\n" + "".join(
        f"\n[{name}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items())
        for name, values in sections.items())
    path.write_text(text)
    return path


def reference_args(s: dict, *, bucketed: bool, steps: int, threads: int, device: str, epochs: int = 1) -> list[str]:
    args = ["--embed-dim", s["embed_dim"], "--hidden", s["hidden"], "--layers", s["layers"],
            "--dropout", s["dropout"], "--batch-size", s["batch_size"], "--lr", s["lr"], "--epochs", epochs,
            "--max-len", s["max_len"], "--train-subset", s["train_subset"], "--test-subset", s["test_subset"],
            "--val-fraction", s["val_fraction"], "--min-freq", s["min_freq"], "--seed", s["seed"],
            "--threads", threads, "--device", device]
    if steps:
        args += ["--max-steps", steps, "--no-eval"]
    if bucketed:
        args.append("--bucketed")
    return [str(a) for a in args]


# ---------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------


def section_pipeline(a, sides: Sides, runner: Runner) -> Section:
    sec = Section("pipeline", "Data pipeline: load + tokenize + vocab + encode, full corpus")
    sec.settings = ("50,000 reviews from the tarball, min-freq 1, no cache on either side. Ours: "
                    "`pipeline_bench` cold_seconds (read + tokenize + vocab + encode, one run per call); "
                    "reference: plain Python (tarfile, torchtext's basic_english regexes, Counter, dict lookups).")
    cold = Row("cold pipeline", "s", target="≥ 8× faster", target_speedup=8.0)
    warm = Row("warm: ours' encoded-cache hit vs the reference's pickle of the encoded corpus", "s")
    sec.rows += [cold, warm]
    missing = "; ".join(m.replace("not available:", f"{side} not available:", 1) for side, m in
                        (("ours", sides.ours_pipeline()), ("reference", sides.reference())) if m)
    cold.missing = warm.missing = missing
    ours_cmd = [str(sides.pipeline_bench), "--data", a.data, "--json", "--runs", "1"]
    ref_cmd = [a.python, str(REFERENCE / "data_pipeline.py"), "--data", a.data]

    def ours(rep: int) -> None:
        if sides.ours_pipeline():
            return
        sec.command(runner.show(ours_cmd))
        r = runner.run("pipeline-ours", ours_cmd, a.timeout)
        out = last_json(r.stdout) if r.ok else None
        if out and "cold_seconds" in out:
            cold.ours.append(out["cold_seconds"])
            if out.get("warm_seconds") is not None:
                warm.ours.append(out["warm_seconds"])
        else:
            cold.missing = f"failed (ours): {r.why() if not r.ok else 'no cold_seconds in output'}"

    def ref(rep: int) -> None:
        if sides.reference():
            return
        sec.command(runner.show(ref_cmd))
        r = runner.run("pipeline-ref", ref_cmd, a.timeout)
        out = last_json(r.stdout) if r.ok else None
        if out and "seconds" in out:
            cold.ref.append(out["seconds"])
            if out.get("warm_seconds") is not None:
                warm.ref.append(out["warm_seconds"])
        else:
            cold.missing = f"failed (reference): {r.why()}"

    alternate(a.reps, ours, ref)
    return sec


def throughput_rows(sec: Section, label: str, target_as_written: float | None, target_lfl: float | None):
    as_written = Row(f"{label}: ours as configured (bucketed) vs the tutorial as written (unsorted, packed)",
                     "tokens/s", target=f"≥ {target_as_written:g}× faster" if target_as_written else "",
                     target_speedup=target_as_written)
    lfl = Row(f"{label}: like for like, both bucketed (sorted pools of 100 batches)", "tokens/s",
              target=f"≥ {target_lfl:g}×" if target_lfl else "", target_speedup=target_lfl)
    unsorted = Row(f"{label}: like for like, both unsorted (the tutorial's batches)", "tokens/s")
    sec.rows += [as_written, lfl, unsorted]
    return as_written, lfl, unsorted


def section_train(a, sides: Sides, runner: Runner, world: int) -> Section:
    model = a.model or ("seed" if a.device == "cuda" else "small")
    s = dict(SEED if model == "seed" else SMALL, batch_size=a.batch_size)
    cpus = os.cpu_count() or 1
    threads = a.threads or (cpus if world == 1 else max(1, cpus // world))
    key = "train1" if world == 1 else "train2"
    title = ("Training throughput, one process" if world == 1
             else f"Training throughput, {world} processes: ours (coordinator, TCP ring) vs torchrun + DDP (gloo)")
    sec = Section(key, title)
    sec.settings = (
        f"Model: Embedding({s['embed_dim']}) → LSTM({s['hidden']}, {s['layers']} layer(s)) → Dropout({s['dropout']}) → "
        f"Linear(2); batch {s['batch_size']} per process; "
        + (f"reviews cut to their first {s['max_len']} tokens; " if s["max_len"] else "whole reviews; ")
        + f"{a.steps} training steps per run from "
        + (f"a label-balanced subset of {s['train_subset']} train reviews; " if s["train_subset"] else "the train split; ")
        + f"Adam {s['lr']:g}; {threads} compute thread(s) per process; device {a.device}. tokens/s = non-pad "
        f"training tokens (summed over processes) per second of training (evaluation and loading excluded).")
    if world == 1:
        rows = throughput_rows(sec, "1 process", 3.0 if a.device == "cuda" else 2.0, 1.0)
    else:
        rows = throughput_rows(sec, f"{world} processes", None if a.device == "cuda" else 1.5, None)
        if a.device != "cuda":
            rows[0].target, rows[0].target_speedup = "≥ 1.5× faster", 1.5
    as_written, lfl, unsorted = rows
    # Each side runs when it can: a reference figure alone is still worth recording.
    missing_ours = sides.ours_worker() if world == 1 else sides.ours_coordinator()
    missing_ref = sides.reference()
    for row in rows:
        row.missing = "; ".join(m.replace("not available:", f"{side} not available:", 1)
                                for side, m in (("ours", missing_ours), ("reference", missing_ref)) if m)
    work = runner.log_dir / key
    work.mkdir(exist_ok=True)

    def ours_cmd(order: str, rep: int) -> tuple[list[str], Path]:
        cfg = write_ours_config(work / f"ours-{order}.toml", s, batch_order=order, steps=a.steps, device=a.device,
                                bptt=a.ours_bptt)
        sec.files[runner.show([str(cfg)])] = cfg.read_text()
        out = work / f"ours-{order}-r{rep}"
        shutil.rmtree(out, ignore_errors=True)
        if world == 1:
            cmd = [str(sides.worker), "--threads", str(threads), "train", "--config", str(cfg),
                   "--data", a.data, "--out", str(out)]
        else:
            cmd = [str(sides.coordinator), "--workers", str(world), "--worker-threads", str(threads),
                   "--config", str(cfg), "--data", a.data, "--out", str(out)]
        return cmd, out

    def ref_cmd(bucketed: bool) -> list[str]:
        extra = reference_args(s, bucketed=bucketed, steps=a.steps, threads=threads, device=a.device)
        if world == 1:
            return [a.python, str(REFERENCE / "tutorial.py"), "--data", a.data] + extra
        torchrun = str(Path(a.python).parent / "torchrun")
        return [torchrun, "--standalone", "--nproc-per-node", str(world), str(REFERENCE / "ddp.py"),
                "--data", a.data] + extra

    def run_ours(row: Row, order: str, rep: int) -> None:
        if missing_ours:
            return
        cmd, out = ours_cmd(order, rep)
        sec.command(runner.show(cmd))
        r = runner.run(f"{key}-ours-{order}", cmd, a.timeout)
        summary = out / "summary.json"
        if r.ok and summary.is_file():
            data = json.loads(summary.read_text())
            value = data.get("tokens_per_second")
            if data.get("comm_share") is not None:
                comm_shares.setdefault(order, []).append(float(data["comm_share"]))
            if value:
                row.ours.append(float(value))
                return
        row.missing = f"failed (ours): {r.why() if not r.ok else 'no tokens_per_second in summary.json'}"

    def run_ref(row: Row, bucketed: bool, rep: int) -> None:
        if missing_ref:
            return
        cmd = ref_cmd(bucketed)
        sec.command(runner.show(cmd))
        r = runner.run(f"{key}-ref-{'bucketed' if bucketed else 'unsorted'}", cmd, a.timeout)
        out = last_json(r.stdout) if r.ok else None
        if out and out.get("tokens_per_second"):
            row.ref.append(float(out["tokens_per_second"]))
        else:
            row.missing = f"failed (reference): {r.why()}"

    # One ours-bucketed run serves as "as configured" and "like for like"; one reference
    # unsorted run serves as "as written" and "unsorted like for like".
    def ours(rep: int) -> None:
        run_ours(as_written, "bucketed", rep)
        if as_written.ours and len(lfl.ours) < len(as_written.ours):
            lfl.ours.append(as_written.ours[-1])
        if not a.skip_unsorted_ours:
            run_ours(unsorted, "unsorted", rep)

    def ref(rep: int) -> None:
        run_ref(as_written, False, rep)
        if as_written.ref and len(unsorted.ref) < len(as_written.ref):
            unsorted.ref.append(as_written.ref[-1])
        run_ref(lfl, True, rep)

    comm_shares: dict[str, list[float]] = {}
    alternate(a.reps, ours, ref)
    for order, shares in comm_shares.items():
        sec.notes.append(f"ours ({order}): share of training time in the gradient all-reduce "
                         f"(summary.json comm_share), median {statistics.median(shares):.0%}")
    if a.skip_unsorted_ours and not unsorted.missing:
        unsorted.missing = "ours not run (--skip-unsorted-ours)"
    if a.load_note:
        sec.notes.append(a.load_note)
    return sec


def first_reaching(evals: list[dict], metric: str, target: float) -> float | None:
    hit = next((e for e in evals if e.get(metric) is not None and e[metric] >= target), None)
    return None if hit is None else hit["train_seconds"]


def best_of(evals: list[dict]) -> str:
    return f"best {max(e['acc'] for e in evals):.3f}" if evals else "no evaluation finished"


def section_tta(a, sides: Sides, runner: Runner) -> Section:
    metric = a.tta_metric or ("test" if a.device == "cuda" else "val")
    target = a.tta_target or (0.88 if a.device == "cuda" else 0.80)
    ours_cfg = Path(a.tta_ours_config or ("configs/gpu-fast.toml" if a.device == "cuda" else "configs/cpu-demo.toml"))
    sec = Section("tta", f"Time to {target:.0%} {metric} accuracy, each side with its own best settings ({a.device})")
    row = Row(f"training seconds to {target:.0%} {metric} accuracy", "s")
    best = Row(f"best {metric} accuracy in the run", "%")
    sec.rows += [row, best]
    cfg_path = ROOT / ours_cfg
    ours_missing = sides.ours_worker() or ("" if cfg_path.is_file() else f"not available: {ours_cfg} does not exist yet")
    ref_missing = sides.reference()
    if a.tta_ours_workers > 1 and not ours_missing:
        ours_missing = sides.ours_coordinator()
    # Both sides are needed (and the reference's CPU settings come from our config).
    missing = "; ".join(m.replace("not available:", f"{side} not available:", 1)
                        for side, m in (("ours", ours_missing), ("reference", ref_missing)) if m)
    if a.device == "cuda" and not missing:
        # GPU target: ours to 88% test accuracy in at most a fifth of the reference's time to its best.
        row.target, row.target_speedup = "≥ 5× faster (vs the reference's time to its best)", 5.0
    settings = {}
    if not missing:
        try:
            import tomllib
            settings = tomllib.loads(cfg_path.read_text())
        except Exception as e:  # noqa: BLE001 - a broken config is reported, not fatal
            missing = f"not available: cannot read {ours_cfg}: {e}"
    row.missing = best.missing = missing
    d, m, t = settings.get("data", {}), settings.get("model", {}), settings.get("train", {})
    if a.tta_ref_args:
        ref_extra = shlex.split(a.tta_ref_args)
        ref_desc = "reference: " + a.tta_ref_args
    elif a.device == "cuda":
        ref_extra = ["--device", "cuda"]
        ref_desc = "reference: the tutorial as written (embed 128, LSTM 256×2, batch 32, unsorted packed, 5 epochs) on the GPU"
    else:
        # The reference's best on CPU with the same recipe: our config's model, data and
        # optimizer settings, with its fastest batching (--bucketed) and a validation every
        # 100 steps (finer than ours, which evaluates at epoch ends: in the reference's favour).
        ref_extra = [str(x) for x in (
            "--embed-dim", m.get("embed_dim", 128), "--hidden", m.get("hidden", 256), "--layers", m.get("layers", 2),
            "--dropout", m.get("dropout", 0.5), "--batch-size", t.get("batch_size", 32), "--lr", t.get("lr", 1e-3),
            "--epochs", t.get("epochs", 5), "--max-len", d.get("max_len", 0),
            "--truncation", d.get("truncation", "head"), "--bucket-pool", t.get("bucket_pool", 100),
            "--min-freq", d.get("min_freq", 1),
            "--max-vocab", d.get("max_vocab", 0), "--train-subset", d.get("train_subset", 0),
            "--test-subset", d.get("test_subset", 0), "--val-fraction", d.get("val_fraction", 0.1),
            "--bucketed", "--eval-every-steps", "100", "--threads", t.get("threads", 0) or os.cpu_count() or 1)]
        ref_desc = ("reference: the tutorial's model (last-state head, full BPTT, plain Adam) with our config's "
                    "sizes, vocab, truncation, batch, lr and epochs, length-bucketed batches, validation every "
                    "100 steps (ours evaluates at epoch ends)")
    if metric == "test":
        ref_extra.append("--test-each-eval")
    if a.device != "cuda":
        ref_extra += ["--target-val-accuracy", str(target)] if metric == "val" else []
    launch = (f"`coordinator --workers {a.tta_ours_workers}`" if a.tta_ours_workers > 1
              else "one `worker train` process")
    if settings:
        launch += (f": embed {m.get('embed_dim', 128)}, LSTM {m.get('hidden', 256)}×{m.get('layers', 2)}, "
                   f"batch {t.get('batch_size', 32)} {t.get('batch_order', 'unsorted')}, bptt {t.get('bptt', 0)}, "
                   f"max-len {d.get('max_len', 0)}, lr {t.get('lr', 1e-3)}, {t.get('epochs', 5)} epochs, "
                   f"train subset {d.get('train_subset', 0) or 'all'}, threads {t.get('threads', 0) or 'default'}")
    sec.settings = (f"Ours: `{ours_cfg}` (its own settings, {launch}); {ref_desc}. "
                    f"Time = training seconds (evaluation excluded) at the first evaluation reaching the target; "
                    f"each run is capped at {a.tta_budget:.0f} s.")
    out = runner.log_dir / "tta-ours"

    def ours(rep: int) -> None:
        if missing:
            return
        shutil.rmtree(out, ignore_errors=True)
        if a.tta_ours_workers > 1:
            cmd = [str(sides.coordinator), "--workers", str(a.tta_ours_workers), "--config", str(cfg_path),
                   "--data", a.data, "--out", str(out)]
        else:
            cmd = [str(sides.worker), "train", "--config", str(cfg_path), "--data", a.data, "--out", str(out)]
            if metric == "test":
                cmd.append("--eval-test-each-epoch")
        sec.command(runner.show(cmd))
        sec.files[runner.show([str(cfg_path)])] = cfg_path.read_text()
        r = runner.run("tta-ours", cmd, a.tta_budget)
        metrics = out / "metrics.jsonl"
        evals = [e for e in json_lines(metrics.read_text()) if e.get("type") == "eval" and e.get("split") == metric] \
            if metrics.is_file() else []
        evals = [{"acc": e["accuracy"], "train_seconds": e["train_seconds"]} for e in evals]
        reached = first_reaching(evals, "acc", target)
        if reached is not None:
            row.ours.append(reached)
        elif not r.ok and r.rc is not None:
            row.missing = f"failed (ours): {r.why()}"
        else:
            sec.notes.append(f"ours did not reach {target:.0%} within the run ({best_of(evals)}; "
                             f"{r.why() if not r.ok else 'finished'})")
        if evals:
            best.ours.append(100 * max(e["acc"] for e in evals))

    def ref(rep: int) -> None:
        if missing:
            return
        cmd = [a.python, str(REFERENCE / "tutorial.py"), "--data", a.data] + ref_extra
        sec.command(runner.show(cmd))
        r = runner.run("tta-ref", cmd, a.tta_budget)
        evals = [e for e in json_lines(r.stdout) if e.get("type") == "eval"]
        key = "val_accuracy" if metric == "val" else "test_accuracy"
        evals = [{"acc": e[key], "train_seconds": e["train_seconds"]} for e in evals if e.get(key) is not None]
        if a.device == "cuda":
            # The GPU target compares with the reference's time to its best accuracy.
            if evals:
                top = max(evals, key=lambda e: e["acc"])
                row.ref.append(top["train_seconds"])
                sec.notes.append(f"reference's best {metric} accuracy {top['acc']:.3f} after {top['train_seconds']:.0f} s")
        else:
            reached = first_reaching(evals, "acc", target)
            if reached is not None:
                row.ref.append(reached)
            else:
                sec.notes.append(f"reference did not reach {target:.0%} within the run ({best_of(evals)}; "
                                 f"{r.why() if not r.ok else 'finished'})")
        if evals:
            best.ref.append(100 * max(e["acc"] for e in evals))
        if not r.ok and r.rc is not None and not evals:
            row.missing = f"failed (reference): {r.why()}"

    alternate(a.tta_reps, ours, ref)
    if a.load_note:
        sec.notes.append(a.load_note)
    return sec


def section_allreduce(a, sides: Sides, runner: Runner) -> Section:
    sec = Section("allreduce", "All-reduce of the 51 MB gradient buffer on 127.0.0.1: our TCP ring vs gloo")
    sec.settings = (f"{ALLREDUCE_NUMEL:,} f32 ({ALLREDUCE_NUMEL * 4 / 1e6:.2f} MB, the full vocab's embedding "
                    f"gradient), sum, {a.allreduce_iters} timed calls after 2 warm-up calls; seconds per call = the slowest "
                    "rank's median (both sides); one process per rank.")
    ref_missing = sides.reference()
    ours_missing = sides.ours_ring()
    rows = {}
    copy = Row("plain copy of the buffer, for scale (ours: Rust copy; reference: torch copy_)", "s")
    for world in a.allreduce_worlds:
        rows[world] = Row(f"{world} processes: seconds per all-reduce", "s")
        sec.rows.append(rows[world])
        rows[world].missing = "; ".join(m.replace("not available:", f"{side} not available:", 1) for side, m in
                                        (("ours", ours_missing), ("reference", ref_missing)) if m)
    sec.rows.append(copy)

    def ours(rep: int) -> None:
        if ours_missing:
            return
        for world in a.allreduce_worlds:
            # worker/src/bin/ring_bench.rs: prints "RESULT world=.. allreduce_ms=.. memcpy_ms=.." (the
            # slowest rank's median per call, and a copy of the same buffer).
            cmd = [str(sides.ring_bench), "--world", str(world), "--elems", str(ALLREDUCE_NUMEL),
                   "--iters", str(a.allreduce_iters), "--warmup", "2"]
            sec.command(runner.show(cmd))
            r = runner.run(f"allreduce-ours-{world}", cmd, a.timeout)
            m = re.search(r"^RESULT .*\ballreduce_ms=([0-9.]+).*\bmemcpy_ms=([0-9.]+)", r.stdout + r.stderr, re.M)
            if r.ok and m:
                rows[world].ours.append(float(m.group(1)) / 1e3)
                copy.ours.append(float(m.group(2)) / 1e3)
            else:
                rows[world].missing = f"failed (ours): {r.why() if not r.ok else 'no RESULT line in output'}"

    def ref(rep: int) -> None:
        if ref_missing:
            return
        for world in a.allreduce_worlds:
            cmd = [a.python, str(REFERENCE / "allreduce_gloo.py"), "--world", str(world), "--numel",
                   str(ALLREDUCE_NUMEL), "--iters", str(a.allreduce_iters)]
            sec.command(runner.show(cmd))
            r = runner.run(f"allreduce-gloo-{world}", cmd, a.timeout)
            out = last_json(r.stdout) if r.ok else None
            if out and "seconds_median" in out:
                rows[world].ref.append(float(out["seconds_median"]))
                copy.ref.append(float(out["copy_seconds_median"]))
                if not out.get("correct", True):
                    sec.notes.append(f"gloo's result was wrong at {world} processes")
            else:
                rows[world].missing = f"failed (reference): {r.why()}"

    alternate(a.reps, ours, ref)
    if a.load_note:
        sec.notes.append(a.load_note)
    return sec


# ---------------------------------------------------------------------------------------
# Machine, RESULTS.md
# ---------------------------------------------------------------------------------------


def machine_line(a, sides: Sides) -> str:
    model = ""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        m = re.search(r"^Model name:\s*(.+)$", lscpu, re.M)
        model = m.group(1).strip() if m else ""
    except OSError:
        pass
    mem = ""
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        mem = f", {kb / 1024 / 1024:.0f} GiB"
    except (OSError, AttributeError):
        pass
    gpu = ""
    if shutil.which("nvidia-smi"):
        p = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
        if p.returncode == 0 and p.stdout.strip():
            gpu = ", GPU: " + "; ".join(p.stdout.strip().splitlines())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    torch = getattr(sides, "torch_version", "?")
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"Measured {date} on {model or platform.processor() or 'unknown CPU'} ({os.cpu_count()} cores{mem}{gpu}), "
            f"{platform.system()} {platform.release()}; commit {commit}{' (with uncommitted changes)' if dirty else ''}; "
            f"reference torch {torch}; medians of {a.reps} repetition(s) unless stated.")


RESULTS_HEAD = """# Benchmark results

Written by `bench/run_bench.py` from the numbers it measured; never edited by hand. Each
section says when, on which machine and with which commands it was measured; a rerun of one
section replaces only that section. Ratios are ours / reference on the same machine in the
same run; "Ours is" turns them into faster/slower (for seconds, reference / ours).
"""


def update_results(path: Path, sections: list[tuple[Section, str]]) -> None:
    text = path.read_text() if path.is_file() else RESULTS_HEAD
    if not text.startswith("# Benchmark results"):
        text = RESULTS_HEAD
    for sec, body in sections:
        block = f"<!-- section:{sec.key} -->\n{body}<!-- /section:{sec.key} -->\n"
        pattern = re.compile(rf"<!-- section:{sec.key} -->\n.*?<!-- /section:{sec.key} -->\n", re.S)
        if pattern.search(text):
            text = pattern.sub(lambda _m: block, text)
        else:
            # Keep the sections in their canonical order.
            order = SECTIONS.index(sec.key)
            later = [k for k in SECTIONS[order + 1:] if f"<!-- section:{k} -->" in text]
            if later:
                at = text.index(f"<!-- section:{later[0]} -->")
                text = text[:at] + block + "\n" + text[at:]
            else:
                text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    env = os.environ.get
    p.add_argument("--data", default=env("IMDB_DATA"), help="the IMDB tarball (default: $IMDB_DATA)")
    p.add_argument("--python", default=env("BENCH_PYTHON", str(ROOT / ".venv-bench" / "bin" / "python")),
                   help="the reference's python (default: .venv-bench/bin/python)")
    p.add_argument("--sections", default=env("BENCH_SECTIONS", ",".join(SECTIONS)),
                   help=f"comma-separated, from {', '.join(SECTIONS)}")
    p.add_argument("--reps", type=int, default=int(env("BENCH_REPS", "3")), help="repetitions (medians)")
    p.add_argument("--device", default=env("BENCH_DEVICE", "cpu"), choices=["cpu", "cuda"])
    p.add_argument("--steps", type=int, default=int(env("BENCH_STEPS", "200")), help="training steps per throughput run")
    p.add_argument("--batch-size", type=int, default=int(env("BENCH_BATCH_SIZE", "32")), help="per process")
    p.add_argument("--model", choices=["small", "seed"],
                   help="throughput sections' model: small (embed 64, LSTM 128x1, max-len 256; the CPU default) "
                        "or seed (the tutorial's 128, 256x2, whole reviews; the GPU default)")
    p.add_argument("--threads", type=int, default=0,
                   help="compute threads per process (0: the cores, divided by the processes)")
    p.add_argument("--ours-bptt", type=int, default=0, help="ours' truncated-BPTT window in the throughput runs")
    p.add_argument("--skip-unsorted-ours", action="store_true", help="skip ours' unsorted like-for-like runs")
    p.add_argument("--tta-ours-config", help="ours' config for time-to-accuracy "
                   "(default: configs/cpu-demo.toml, configs/gpu-fast.toml with --device cuda)")
    p.add_argument("--tta-ours-workers", type=int, default=1,
                   help="ours' time-to-accuracy run: 1 = worker train, N > 1 = coordinator --workers N")
    p.add_argument("--tta-ref-args", help="the reference's arguments for time-to-accuracy (default: see the section)")
    p.add_argument("--tta-target", type=float, help="target accuracy (default 0.80 on CPU, 0.88 on GPU)")
    p.add_argument("--tta-metric", choices=["val", "test"], help="default val on CPU, test on GPU")
    p.add_argument("--tta-budget", type=float, default=1800, help="seconds each time-to-accuracy run may take")
    p.add_argument("--tta-reps", type=int, default=1)
    p.add_argument("--allreduce-worlds", default="2,4")
    p.add_argument("--allreduce-iters", type=int, default=10)
    p.add_argument("--timeout", type=float, default=1200, help="seconds any other single run may take")
    p.add_argument("--results", default=str(RESULTS), help="the results file to update")
    p.add_argument("--no-write", action="store_true", help="print the tables, leave RESULTS.md alone")
    p.add_argument("--note", default="", help="a line added to every section (e.g. the machine's load)")
    a = p.parse_args()
    if not a.data:
        # The official tarball where our binaries download it (core's default_cache_dir).
        cache = env("IMDB_CACHE_DIR") or str(Path(env("XDG_CACHE_HOME") or Path.home() / ".cache") / "imdb-ddp")
        downloaded = Path(cache) / "aclImdb_v1.tar.gz"
        if downloaded.is_file():
            a.data = str(downloaded)
    if not a.data or not Path(a.data).exists():
        p.error("--data (or $IMDB_DATA) must name the IMDB tarball; without one, "
                "`target/release/coordinator data` downloads it into the cache first")
    a.data = str(Path(a.data).resolve())
    sections = [s.strip() for s in a.sections.split(",") if s.strip()]
    if sections == ["all"]:
        sections = list(SECTIONS)
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        p.error(f"unknown section(s) {', '.join(bad)}; choose from {', '.join(SECTIONS)}")
    if a.reps < 1 or a.steps < 1 or a.tta_reps < 1:
        p.error("--reps, --steps and --tta-reps must be at least 1")
    a.allreduce_worlds = [int(w) for w in a.allreduce_worlds.split(",")]
    a.load_note = a.note

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    runner = Runner(ROOT / "runs" / "bench" / stamp, a.data,
                    {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn"), "PYTHONUNBUFFERED": "1"},
                    verbose=True)
    sides = Sides(a)
    sides.reference()  # fills torch_version for the header
    done: list[tuple[Section, str]] = []
    builders = {"pipeline": section_pipeline, "train1": lambda *x: section_train(*x, world=1),
                "train2": lambda *x: section_train(*x, world=2), "tta": section_tta, "allreduce": section_allreduce}
    for key in sections:
        print(f"== {key}", file=sys.stderr, flush=True)
        sec = builders[key](a, sides, runner)
        body = sec.markdown(machine_line(a, sides))
        print("\n" + body, flush=True)
        done.append((sec, body))
    if not a.no_write:
        update_results(Path(a.results), done)
        print(f"updated {Path(a.results).relative_to(ROOT) if Path(a.results).is_relative_to(ROOT) else a.results}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
