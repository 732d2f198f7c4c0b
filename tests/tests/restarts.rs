//! Failures that the job survives, with real processes on 127.0.0.1: a worker killed
//! mid-epoch, a worker that stalls (SIGSTOP) until the collective times out, the
//! coordinator killed (SIGKILL) or terminated (SIGTERM) and then resumed with `--resume`.
//!
//! On the CPU the ring is deterministic and the shard plan, the dropout masks and the
//! learning rate are functions of (seed, epoch, step), so a run that restarts from a
//! checkpoint must end *bitwise* equal to an uninterrupted run of the same config: the same
//! final parameter checksum and the same test accuracy. Every test holds it to that.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use common::*;

/// Three epochs of 25 steps per rank (2 ranks, batch 16), a checkpoint every 10 steps, and
/// dropout on, so that a resumed run must also replay the dropout masks exactly.
const JOB: &str = r#"
[data]
max_vocab = 2000
max_len = 64
val_fraction = 0.2
train_subset = 1000
test_subset = 200

[model]
embed_dim = 8
hidden = 8
layers = 1
dropout = 0.3

[train]
batch_size = 16
epochs = 3
lr = 0.01
batch_order = "bucketed"
bucket_pool = 4
bptt = 16
seed = 5
device = "cpu"
log_every = 5
eval_batch_size = 100

[checkpoint]
every_steps = 10
every_seconds = 0
"#;

/// Heartbeats and the ring give up after 3 s, so that failures are seen quickly.
const FAST_FAILURE: [&str; 4] = ["--heartbeat-timeout", "3", "--register-timeout", "60"];

/// (final parameter checksum, test accuracy) of an uninterrupted run of `JOB`.
fn reference(dir: &Path, data: &Path) -> (String, f64) {
    let config = write_config(dir, JOB);
    let out = dir.join("reference");
    let marker = format!("ref-{}", std::process::id());
    run_ok(coordinator(2, &config, &out, data, &marker).args(FAST_FAILURE));
    let s = summary(&out);
    assert_eq!(s["restarts"], 0);
    (
        s["final_parameter_checksum"].as_str().expect("checksum").to_string(),
        s["test_accuracy"].as_f64().unwrap(),
    )
}

/// A running coordinator and its stderr lines.
struct Job {
    child: Child,
    lines: Receiver<String>,
    log: Vec<String>,
}

impl Job {
    fn start(config: &Path, out: &Path, data: &Path, marker: &str, extra: &[&str]) -> Job {
        let mut child = coordinator(2, config, out, data, marker)
            .args(FAST_FAILURE)
            .args(extra)
            .env("WORKER_RING_TIMEOUT", "3")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn coordinator");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Job { child, lines, log: Vec::new() }
    }

    /// Waits for a log line that `pred` accepts and returns it.
    fn wait_for(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(90);
        while Instant::now() < deadline {
            if let Ok(line) = self.lines.recv_timeout(Duration::from_millis(100)) {
                self.log.push(line.clone());
                if pred(&line) {
                    return line;
                }
            }
        }
        panic!("no {what} within 90 s:\n{}", self.log.join("\n"));
    }

    /// The pid of `rank` from the "worker registered" line of the attempt under way.
    fn wait_for_rank_pid(&mut self, rank: usize) -> u32 {
        let line = self.wait_for("registration", |l| {
            l.contains("worker registered") && l.contains(&format!(" rank={rank} "))
        });
        field(&line, "pid=").expect("pid in the registration line")
    }

    fn finish(mut self, within: Duration) -> (std::process::ExitStatus, String) {
        let status = wait_exit(&mut self.child, within);
        self.log.extend(self.lines.try_iter());
        (status, self.log.join("\n"))
    }
}

fn field(line: &str, key: &str) -> Option<u32> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key)).and_then(|v| v.parse().ok())
}

/// A mid-epoch checkpoint of epoch 2 was committed.
fn epoch_two_checkpoint(line: &str) -> bool {
    line.contains("checkpoint committed") && line.contains("epoch 2, step")
}

/// Workers logged that they restored the job's checkpoint of a step in epoch 2 or later
/// (25 steps per epoch): a restart from scratch would end equal too, so this tells them apart.
fn workers_restored_a_checkpoint(log: &str) -> bool {
    log.lines()
        .filter(|l| l.contains("resuming from the job's checkpoint"))
        .filter_map(|l| field(l, "global_step="))
        .any(|step| step > 25)
}

fn assert_same_result(out: &Path, expected: &(String, f64), log: &str) {
    let s = summary(out);
    assert_eq!(s["final_parameter_checksum"].as_str(), Some(expected.0.as_str()), "not bitwise equal\n{log}");
    assert_eq!(s["test_accuracy"].as_f64(), Some(expected.1), "{log}");
    let sums = s["replica_checksums"].as_array().expect("replica_checksums");
    assert!(sums.iter().all(|c| c.as_str() == Some(expected.0.as_str())), "{sums:?}");
}

#[test]
fn a_killed_or_stalled_worker_costs_a_restart_and_the_run_ends_bitwise_equal() {
    let Some(data) = imdb_data() else { return };
    let dir = tempfile::tempdir().unwrap();
    let expected = reference(dir.path(), &data);
    let config = write_config(dir.path(), JOB);

    for (signal, name) in [(libc::SIGKILL, "killed"), (libc::SIGSTOP, "stalled")] {
        let out = dir.path().join(name);
        let marker = format!("{name}-{}", std::process::id());
        let mut job = Job::start(&config, &out, &data, &marker, &[]);
        let victim = job.wait_for_rank_pid(1);
        job.wait_for("a checkpoint in epoch 2", epoch_two_checkpoint);
        send_signal(victim, signal);
        let (status, log) = job.finish(Duration::from_secs(120));
        assert!(status.success(), "{name}: {status}\n{log}");
        assert_none_left(&marker);
        let s = summary(&out);
        assert_eq!(s["restarts"], 1, "{name}\n{log}");
        assert!(log.contains("restart 1/3"), "{name}: no restart line\n{log}");
        assert!(workers_restored_a_checkpoint(&log), "{name}: the new workers did not resume\n{log}");
        assert_same_result(&out, &expected, &log);
        // The restart is in the metrics, with what it cost.
        let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        let restart: serde_json::Value = metrics
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["type"] == "restart")
            .expect("a restart record in metrics.jsonl");
        assert!(restart["resumed_from_global_step"].as_u64().unwrap() >= 30, "{restart}");
        assert!(restart["cause"].as_str().unwrap().contains("rank"), "{restart}");
        assert_eq!(restart["steps_lost"], s["steps_lost"]);
    }
}

#[test]
fn a_dead_or_terminated_coordinator_resumes_bitwise_equal() {
    let Some(data) = imdb_data() else { return };
    let dir = tempfile::tempdir().unwrap();
    let expected = reference(dir.path(), &data);
    let config = write_config(dir.path(), JOB);

    for (signal, name) in [(libc::SIGKILL, "sigkill"), (libc::SIGTERM, "sigterm")] {
        let out = dir.path().join(name);
        let marker = format!("{name}-{}", std::process::id());
        let mut job = Job::start(&config, &out, &data, &marker, &[]);
        job.wait_for("a checkpoint in epoch 2", epoch_two_checkpoint);
        send_signal(job.child.id(), signal);
        let (status, log) = job.finish(Duration::from_secs(40));
        if signal == libc::SIGTERM {
            // A checkpoint at the next step, then exit 75 for the supervisor to retry.
            assert_eq!(status.code(), Some(75), "{log}");
            assert!(log.contains("terminated by SIGTERM; checkpointed at"), "{log}");
        }
        // The workers notice (stop message or heartbeat timeout) and exit.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !marked_processes(&marker).is_empty() {
            assert!(Instant::now() < deadline, "workers outlived the coordinator");
            std::thread::sleep(Duration::from_millis(100));
        }

        // The same folder without --resume is refused, naming the way out.
        let refused = run(coordinator(2, &config, &out, &data, &marker).args(FAST_FAILURE));
        assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
        assert!(stderr(&refused).contains("pass --resume"), "{}", stderr(&refused));
        // Another job's config is refused with the difference named.
        let other = dir.path().join("other.toml");
        std::fs::write(&other, JOB.replace("seed = 5", "seed = 6")).unwrap();
        let refused = run(coordinator(2, &other, &out, &data, &marker).args(["--resume"]));
        assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
        assert!(stderr(&refused).contains("train.seed: 6 vs 5"), "{}", stderr(&refused));

        let mut job = Job::start(&config, &out, &data, &marker, &["--resume=auto"]);
        job.wait_for("the resume", |l| l.contains("resuming the job from its checkpoint"));
        let (status, log) = job.finish(Duration::from_secs(120));
        assert!(status.success(), "{name}: {status}\n{log}");
        assert!(workers_restored_a_checkpoint(&log), "{name}: the workers did not resume\n{log}");
        assert_none_left(&marker);
        assert_same_result(&out, &expected, &log);
    }
}

#[test]
fn restarts_used_up_end_the_job_with_the_last_cause() {
    let Some(data) = imdb_data() else { return };
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &JOB.replace("epochs = 3", "epochs = 30"));
    let out = dir.path().join("run");
    let marker = format!("used-up-{}", std::process::id());
    let mut job = Job::start(&config, &out, &data, &marker, &["--max-restarts", "1"]);
    for attempt in 0..2 {
        let victim = job.wait_for_rank_pid(0);
        job.wait_for("a step", |l| l.contains("training") || l.contains("checkpoint committed"));
        send_signal(victim, libc::SIGKILL);
        if attempt == 0 {
            job.wait_for("the restart", |l| l.contains("restart 1/1"));
        }
    }
    let (status, log) = job.finish(Duration::from_secs(30));
    assert_eq!(status.code(), Some(75), "{log}");
    let error = log.lines().rev().find(|l| l.starts_with("error:")).unwrap_or_default();
    assert!(error.contains("after 1 restart(s)") && error.contains("rank 0"), "{error}\n{log}");
    assert_none_left(&marker);
}
