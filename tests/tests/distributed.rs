//! Data-parallel training with real processes on 127.0.0.1: `coordinator --workers N`
//! starting real `worker join` processes that all-reduce over the TCP ring.
//!
//! Every test uses a tiny model on a subset of the shared corpus (IMDB_DATA), and a private
//! marker in the coordinator's environment (inherited by its workers) to find every process
//! it started and check that none is left behind.

mod common;

use std::io::{BufRead, BufReader};
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

/// Two workers with batch B and one process with batch 2B see the same samples at every
/// step (the shard plan gives rank r the r-th slice of each global batch of 2B, and
/// `worker train` takes the same global batches whole), average the same gradients, and
/// so end with the same parameters, up to float summation order.
#[test]
fn two_workers_with_batch_b_equal_one_process_with_batch_2b() {
    let Some(data) = imdb_data() else { return };
    let dir = tempfile::tempdir().unwrap();
    let steps = "6";
    let two_config = write_config(dir.path(), TINY);
    let two_out = dir.path().join("two");
    let marker = format!("equiv-{}", std::process::id());
    run_ok(coordinator(2, &two_config, &two_out, &data, &marker).args(["--max-steps-per-epoch", steps]));
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
        .args(["--batch-size", "32", "--max-steps-per-epoch", steps]);
    run_ok(&mut one);

    let (a, b) = (parameters(&two_out), parameters(&one_out));
    assert_eq!(a.len(), b.len());
    let mut changed = false;
    for ((name_a, va), (name_b, vb)) in a.iter().zip(&b) {
        assert_eq!(name_a, name_b);
        assert_eq!(va.len(), vb.len(), "{name_a}");
        for (i, (x, y)) in va.iter().zip(vb).enumerate() {
            let tol = 1e-5 * x.abs().max(y.abs()) + 1e-7;
            assert!((x - y).abs() <= tol, "{name_a}[{i}]: two workers {x} vs one process {y}");
        }
        changed |= va.iter().any(|v| *v != 0.0);
    }
    assert!(changed, "parameters are all zero");
    let s = summary(&two_out);
    assert_eq!(s["world_size"], 2);
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
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut ranks = Vec::new();
    let mut steps_seen = false;
    let deadline = Instant::now() + Duration::from_secs(60);
    while (ranks.len() < 2 || !steps_seen) && Instant::now() < deadline {
        let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) else { continue };
        if line.contains("worker registered") {
            let field = |key: &str| -> Option<u64> {
                line.split_whitespace().find_map(|w| w.strip_prefix(key)).and_then(|v| v.parse().ok())
            };
            if let (Some(rank), Some(pid)) = (field("rank="), field("pid=")) {
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
