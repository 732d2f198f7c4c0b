//! Data-parallel training with real processes on 127.0.0.1: `coordinator --workers N`
//! starting real `worker join` processes that all-reduce over the TCP ring.
//!
//! Every test uses a tiny model on a subset of the shared corpus (IMDB_DATA), and a private
//! marker in the coordinator's environment (inherited by its workers) to find every process
//! it started and check that none is left behind.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A tiny, deterministic job: dropout 0 so that one process and two can be compared.
const TINY: &str = r#"
[data]
max_vocab = 2000
max_len = 64
val_fraction = 0.2
train_subset = 640
test_subset = 200

[model]
embed_dim = 8
hidden = 8
layers = 1
dropout = 0.0

[train]
batch_size = 16
epochs = 1
lr = 0.01
batch_order = "unsorted"
bptt = 0
seed = 11
device = "cpu"
log_every = 1
eval_batch_size = 100
"#;

/// Parameters by name from a run folder's model.safetensors.
fn parameters(out: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(out.join("model.safetensors")).expect("model.safetensors");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let mut out: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
            let values =
                view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            (name, values)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The `{"type": "step"}` lines of a run folder's metrics.jsonl: (lr, grad_norm) per step.
fn step_metrics(out: &Path) -> Vec<(f64, f64)> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).expect("metrics.jsonl");
    text.lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).expect("a JSON line"))
        .filter(|v| v["type"] == "step")
        .map(|v| (v["lr"].as_f64().expect("lr"), v["grad_norm"].as_f64().expect("grad_norm")))
        .collect()
}

/// Two workers with batch B and one process with batch 2B see the same samples at every
/// step (the shard plan gives rank r the r-th slice of each global batch of 2B, and
/// `worker train` takes the same global batches whole), average the same gradients, and
/// so take the same steps, up to float summation order.
///
/// That is what is checked, under plain SGD (dropout 0, no clipping, no weight decay), where
/// float-order noise stays as small in the parameters as in the gradients. Under Adam it
/// does not: Adam divides by sqrt(v), so a parameter whose gradient is tiny carries the
/// gradient's relative error into its update, and no per-element tolerance holds on every
/// CPU (issue 9).
#[test]
fn two_workers_with_batch_b_equal_one_process_with_batch_2b() {
    let Some(data) = imdb_data() else { return };
    let dir = tempfile::tempdir().unwrap();
    let steps = 6;
    // SGD's usual learning rates are larger than Adam's: 0.5 moves the parameters far
    // enough (M below) that the bound is dominated by the movement, not by rounding.
    let config = TINY.replace("[train]\n", "[train]\noptimizer = \"sgd\"\n").replace("lr = 0.01", "lr = 0.5");
    assert!(config.contains("log_every = 1") && config.contains("dropout = 0.0"));
    let two_config = write_config(dir.path(), &config);
    let two_out = dir.path().join("two");
    let marker = format!("equiv-{}", std::process::id());
    let max_steps = ["--max-steps-per-epoch", &steps.to_string()];
    run_ok(coordinator(2, &two_config, &two_out, &data, &marker).args(max_steps));
    assert_none_left(&marker);

    let one_out = dir.path().join("one");
    let mut one = scrubbed(Command::new(bin("worker")), &marker);
    one.arg("train")
        .arg("--config")
        .arg(&two_config)
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&one_out)
        .args(["--batch-size", "32"])
        .args(max_steps);
    run_ok(&mut one);
    assert_eq!(summary(&two_out)["world_size"], 2);

    // a) The all-reduced gradient of every step has the one-process gradient's norm. Float
    // order moves a norm by ~1e-7 to 1e-6 relative (f32 sums of ~2,000 terms per element,
    // and the parameters the step starts from differ by as little; 1e-7 measured); other
    // samples in a step, a sum instead of a mean or one rank's gradient alone move it by
    // percents or more (66% and 100% at the first step for a broken plan and a sum).
    let (two_steps, one_steps) = (step_metrics(&two_out), step_metrics(&one_out));
    assert_eq!(two_steps.len(), steps, "{two_steps:?}");
    assert_eq!(one_steps.len(), steps, "{one_steps:?}");
    const NORM_RTOL: f64 = 1e-4;
    eprintln!("gradient norms: two workers {two_steps:?}, one process {one_steps:?}");
    for (t, ((lr_a, norm_a), (lr_b, norm_b))) in two_steps.iter().zip(&one_steps).enumerate() {
        assert_eq!(lr_a, lr_b, "step {}: learning rates differ", t + 1);
        let rel = (norm_a - norm_b).abs() / norm_b;
        assert!(
            rel <= NORM_RTOL,
            "step {}: gradient norm {norm_a} with two workers vs {norm_b} in one process \
             (relative difference {rel:.2e} > {NORM_RTOL:.0e})",
            t + 1
        );
    }

    // b) The final parameters. SGD moves them by sum_t lr_t g_t, so a run can move at most
    // M = sum_t lr_t ||g_t|| away from the common start. Two runs whose gradients differ only
    // by float order differ by (i) the gradients' rounding differences, a relative ~1e-6 of
    // each step (at most ~1e-4, n u for n ~ 2,000 terms with u = 6e-8 and no cancellation),
    // carried through six short steps of a smooth model; that is at most MOVE_RTOL = 1e-3
    // of M; plus (ii) the updates' own roundings, which can land one ulp apart per element
    // and step: at most steps * eps_f32 * ||theta||. A wrong plan (other samples in a step)
    // or wrong averaging (a sum, or one rank's gradient) changes the gradient by a sizeable
    // fraction of itself at every step, so the runs end O(0.1 M) to O(M) apart: hundreds of
    // times the bound. (Measured: 1e-7 apart against a bound of 5e-4 with M = 0.43; 0.15
    // apart with a broken plan, 0.12 with a sum instead of a mean.)
    const MOVE_RTOL: f64 = 1e-3;
    let moved: f64 = one_steps.iter().map(|(lr, norm)| lr * norm).sum();
    let (a, b) = (parameters(&two_out), parameters(&one_out));
    assert_eq!(a.len(), b.len());
    let (mut diff_sq, mut norm_sq) = (0.0f64, 0.0f64);
    let mut worst = (String::new(), 0.0f64);
    for ((name_a, va), (name_b, vb)) in a.iter().zip(&b) {
        assert_eq!(name_a, name_b);
        assert_eq!(va.len(), vb.len(), "{name_a}");
        let d: f64 = va.iter().zip(vb).map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2)).sum();
        diff_sq += d;
        norm_sq += vb.iter().map(|y| f64::from(*y).powi(2)).sum::<f64>();
        if d.sqrt() > worst.1 {
            worst = (name_a.clone(), d.sqrt());
        }
    }
    let (diff, norm) = (diff_sq.sqrt(), norm_sq.sqrt());
    assert!(moved > 0.0 && norm > 0.0, "nothing moved or all parameters are zero");
    let bound = MOVE_RTOL * moved + steps as f64 * f64::from(f32::EPSILON) * norm;
    assert!(bound < 0.01 * moved, "the bound {bound:.3e} could not tell a wrong plan (M = {moved:.3e})");
    eprintln!(
        "||two - one|| = {diff:.3e}, bound {bound:.3e} (moved at most {moved:.3e}, ||theta|| {norm:.3e}); \
         worst tensor {} {:.3e}",
        worst.0, worst.1
    );
    assert!(
        diff <= bound,
        "two workers vs one process: parameters {diff:.3e} apart (most in {}: {:.3e}), more than \
         the float-order bound {bound:.3e} (SGD moved them at most {moved:.3e})",
        worst.0,
        worst.1
    );
}

#[test]
fn replicas_agree_and_the_same_seed_gives_the_same_parameters() {
    let Some(data) = imdb_data() else { return };
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &TINY.replace("epochs = 1", "epochs = 2").replace("dropout = 0.0", "dropout = 0.3"),
    );
    let marker = format!("repro-{}", std::process::id());
    let runs: Vec<PathBuf> = (0..2).map(|i| dir.path().join(format!("run{i}"))).collect();
    for out in &runs {
        run_ok(coordinator(2, &config, out, &data, &marker).args(["--max-steps-per-epoch", "5"]));
        let s = summary(out);
        let sums = s["replica_checksums"].as_array().expect("replica_checksums");
        assert_eq!(sums.len(), 2);
        assert_eq!(sums[0], sums[1], "replicas drifted: {sums:?}");
    }
    assert_none_left(&marker);
    assert_eq!(parameters(&runs[0]), parameters(&runs[1]), "same seed, different parameters");
    assert_eq!(summary(&runs[0])["replica_checksums"], summary(&runs[1])["replica_checksums"]);
}

#[test]
fn four_workers_learn_above_chance() {
    let Some(data) = imdb_data() else { return };
    let dir = tempfile::tempdir().unwrap();
    // The demo recipe, on a subset small enough for a test.
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/cpu-demo.toml");
    let out = dir.path().join("run");
    let marker = format!("four-{}", std::process::id());
    let run = run_ok(coordinator(4, &config, &out, &data, &marker).args([
        "--train-subset",
        "4000",
        "--test-subset",
        "600",
        "--batch-size",
        "16",
        "--max-vocab",
        "5000",
        "--max-len",
        "200",
    ]));
    assert_none_left(&marker);
    let s = summary(&out);
    assert_eq!(s["world_size"], 4);
    let sums = s["replica_checksums"].as_array().expect("replica_checksums");
    assert!(sums.len() == 4 && sums.iter().all(|c| c == &sums[0]), "replicas drifted: {sums:?}");
    let acc = s["test_accuracy"].as_f64().expect("test_accuracy");
    assert!(acc > 0.6, "test accuracy {acc} is not above chance\n{}", stderr(&run));
    for file in ["model.safetensors", "vocab.txt", "config.toml", "metrics.jsonl", "summary.json"] {
        assert!(out.join(file).exists(), "{file} missing");
    }
}

/// Starts a job long enough to be interrupted, and returns it once every worker has
/// registered, with the (rank, pid) pairs the coordinator logged.
fn start_long_job(
    dir: &Path,
    data: &Path,
    marker: &str,
    extra: &[&str],
) -> (Child, Vec<(usize, u32)>, std::sync::mpsc::Receiver<String>) {
    let config = write_config(
        dir,
        &TINY.replace("train_subset = 640", "train_subset = 4000").replace("epochs = 1", "epochs = 50"),
    );
    let mut child = coordinator(2, &config, &dir.join("run"), data, marker)
        .args(["--heartbeat-timeout", "3"])
        .args(extra)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn coordinator");
    let rx = lines_of(&mut child);
    let mut ranks = Vec::new();
    let mut steps_seen = false;
    let deadline = Instant::now() + Duration::from_secs(60);
    while (ranks.len() < 2 || !steps_seen) && Instant::now() < deadline {
        let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) else { continue };
        if line.contains("worker registered") {
            let number = |key: &str| field(&line, key).and_then(|v| v.parse::<u64>().ok());
            if let (Some(rank), Some(pid)) = (number("rank="), number("pid=")) {
                ranks.push((rank as usize, pid as u32));
            }
        }
        // Wait until the first epoch has really started.
        if line.contains("epoch") && line.contains("step") {
            steps_seen = true;
        }
    }
    assert_eq!(ranks.len(), 2, "workers did not register");
    (child, ranks, rx)
}

#[test]
fn a_killed_worker_stops_the_job_naming_its_rank() {
    let Some(data) = imdb_data() else { return };
    let dir = tempfile::tempdir().unwrap();
    let marker = format!("kill-{}", std::process::id());
    // No restarts allowed: the first loss ends the job, with the retryable exit code.
    let (mut child, ranks, rx) = start_long_job(dir.path(), &data, &marker, &["--max-restarts", "0"]);
    let (victim_rank, victim_pid) = ranks[1];
    let killed_at = Instant::now();
    send_signal(victim_pid, libc::SIGKILL);
    let status = wait_exit(&mut child, Duration::from_secs(20));
    let took = killed_at.elapsed();
    assert_eq!(status.code(), Some(75), "a lost worker is exit code 75");
    let log: Vec<String> = rx.try_iter().collect();
    let error = log.iter().rev().find(|l| l.contains("error")).cloned().unwrap_or_default();
    assert!(
        error.contains(&format!("rank {victim_rank}")),
        "error does not name rank {victim_rank}: {error}\n{}",
        log.join("\n")
    );
    assert!(error.contains("after 0 restart(s)"), "{error}");
    assert!(took < Duration::from_secs(10), "detected after {took:?}");
    assert_none_left(&marker);
}

#[test]
fn a_dead_coordinator_makes_workers_exit_and_ctrl_c_stops_cleanly() {
    let Some(data) = imdb_data() else { return };
    // SIGKILL: the coordinator cannot clean up; the workers must notice on their own.
    let dir = tempfile::tempdir().unwrap();
    let marker = format!("orphan-{}", std::process::id());
    let (mut child, _ranks, _rx) = start_long_job(dir.path(), &data, &marker, &[]);
    child.kill().expect("kill coordinator");
    let _ = child.wait();
    let deadline = Instant::now() + Duration::from_secs(3 + 5);
    while !marked_processes(&marker).is_empty() {
        assert!(
            Instant::now() < deadline,
            "workers outlived the coordinator: {:?}",
            marked_processes(&marker)
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // SIGINT (Ctrl-C) once a checkpoint exists: workers stopped, exit code 130, and the
    // checkpoint is still a complete file.
    let dir = tempfile::tempdir().unwrap();
    let marker = format!("sigint-{}", std::process::id());
    let (mut child, _ranks, rx) = start_long_job(dir.path(), &data, &marker, &[]);
    let run = dir.path().join("run");
    let deadline = Instant::now() + Duration::from_secs(60);
    while trainer_tests::current_checkpoint(&run).is_none() {
        assert!(Instant::now() < deadline, "no checkpoint after 60 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Interrupt in the middle of a later epoch.
    std::thread::sleep(Duration::from_millis(700));
    send_signal(child.id(), libc::SIGINT);
    let status = wait_exit(&mut child, Duration::from_secs(20));
    assert_eq!(status.code(), Some(130), "{}", rx.try_iter().collect::<Vec<_>>().join("\n"));
    assert_none_left(&marker);
    let checkpoint = trainer_tests::current_checkpoint(&run).expect("checkpoint.json kept");
    let bytes = std::fs::read(&checkpoint).expect("checkpoint kept");
    let tensors =
        safetensors::SafeTensors::deserialize(&bytes).expect("the checkpoint is a whole safetensors file");
    assert!(tensors.names().iter().any(|n| n.contains("embedding")), "{:?}", tensors.names());
}

/// The model kept is the best by validation, as `worker train` keeps it: model.safetensors
/// holds exactly the parameters of the epoch with the highest validation accuracy (the
/// first of a tie), model-last.safetensors the last epoch's, and summary.json,
/// metrics.jsonl and the printed report give both models' test results. Without a
/// validation split the last epoch's model is the one kept.
#[test]
fn the_kept_model_is_the_best_by_validation_and_the_last_is_exported_beside_it() {
    let Some(data) = imdb_data() else { return };
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), OVERFITTING_JOB);
    let out = dir.path().join("run");
    let marker = format!("kept-{}", std::process::id());
    let run = run_ok(&mut coordinator(2, &config, &out, &data, &marker));
    assert_none_left(&marker);
    let s = summary(&out);
    let epochs = epoch_records(&out);
    assert_eq!(Some(epochs.len() as u64), s["epochs"].as_u64());
    let val: Vec<f64> = epochs.iter().map(|r| r["val_accuracy"].as_f64().expect("val_accuracy")).collect();
    // The first epoch of the highest validation accuracy (a later tie does not replace it).
    let best = (0..val.len()).fold(0, |b, i| if val[i] > val[b] { i } else { b });
    let last = epochs.len() - 1;
    eprintln!("validation accuracy by epoch {val:?}: best epoch {}, last {}", best + 1, last + 1);
    assert_eq!(s["kept_model"], "best", "{s}");
    assert_eq!(s["kept_epoch"].as_u64(), Some(best as u64 + 1), "{s}");
    assert_eq!(s["best_epoch"], s["kept_epoch"]);
    // OVERFITTING_JOB stops early, so its last epoch is never the best (see there).
    assert_eq!(s["stopped_early"], true, "{s}");
    assert!(best < last, "best epoch {} is the last", best + 1);

    // The files hold exactly those epochs' parameters.
    let kept = model_checksum(&out.join("model.safetensors"));
    let last_model = model_checksum(&out.join("model-last.safetensors"));
    assert_eq!(kept, epochs[best]["parameter_checksum"].as_str().unwrap(), "model.safetensors");
    assert_eq!(last_model, epochs[last]["parameter_checksum"].as_str().unwrap(), "model-last.safetensors");
    assert_eq!(s["final_parameter_checksum"].as_str(), Some(last_model.as_str()));
    assert_ne!(kept, last_model);

    // Both test results: metrics.jsonl (worker train's records) and summary.json agree.
    let tests = metrics_records(&out, |v| v["type"] == "eval");
    let models: Vec<&str> = tests.iter().map(|t| t["model"].as_str().unwrap()).collect();
    assert_eq!(models, ["last", "best"], "{tests:?}");
    assert!(tests.iter().all(|t| t["split"] == "test" && t["examples"] == s["test_samples"]), "{tests:?}");
    assert_eq!(tests[0]["accuracy"], s["last_epoch_test_accuracy"]);
    assert_eq!(tests[0]["loss"], s["last_epoch_test_loss"]);
    assert_eq!(tests[1]["accuracy"], s["test_accuracy"]);
    assert_eq!(tests[1]["loss"], s["test_loss"]);
    let report = stdout(&run);
    let kept_line = format!("with the kept model, the best by validation (epoch {})", best + 1);
    let last_line = format!(
        "last epoch's model (epoch {}): test accuracy {:.4}",
        last + 1,
        s["last_epoch_test_accuracy"].as_f64().unwrap()
    );
    assert!(report.contains(&kept_line) && report.contains(&last_line), "{report}");

    // No validation split: the last epoch's model is kept, and both files hold it.
    let out = dir.path().join("no-val");
    run_ok(coordinator(2, &config, &out, &data, &marker).args(["--val-fraction", "0", "--epochs", "2"]));
    assert_none_left(&marker);
    let s = summary(&out);
    let epochs = epoch_records(&out);
    assert_eq!((s["kept_model"].as_str(), s["kept_epoch"].as_u64()), (Some("last"), Some(2)), "{s}");
    assert!(s["best_epoch"].is_null(), "{s}");
    assert_eq!(s["test_accuracy"], s["last_epoch_test_accuracy"]);
    let last = epochs[1]["parameter_checksum"].as_str().unwrap();
    assert_eq!(model_checksum(&out.join("model.safetensors")), last);
    assert_eq!(model_checksum(&out.join("model-last.safetensors")), last);
}
