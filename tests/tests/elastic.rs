//! Elastic world size (`--workers MIN:MAX`, issue 22) with real processes on 127.0.0.1: a
//! local worker killed with no replacement (the job ends at 2 of 3), the last worker above
//! MIN killed (exit 75 naming the cause), and external workers that start below MAX and
//! grow when a worker joins later. Dropout is off, so that the steps after a resize can be
//! compared with an uninterrupted run at another world size (tests/tests/world_size.rs).

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

/// 320 training reviews in global batches of 15 (21 steps per epoch), a checkpoint every 3.
const JOB: &str = r#"
[data]
min_freq = 1
max_vocab = 2000
max_len = 100
truncation = "head"
val_fraction = 0.2
train_subset = 400
test_subset = 200

[model]
embed_dim = 12
hidden = 12
layers = 1
dropout = 0.0
head = "last"

[train]
global_batch_size = 15
epochs = 3
lr = 5e-3
clip_norm = 1.0
bptt = 32
batch_order = "bucketed"
bucket_pool = 4
seed = 7
device = "cpu"
log_every = 1
eval_batch_size = 64
threads = 1

[checkpoint]
every_steps = 3
every_seconds = 0
"#;

/// (global step, loss) of every step record.
fn step_losses(out: &std::path::Path) -> Vec<(u64, f64)> {
    metrics_records(out, |v| v["type"] == "step")
        .iter()
        .map(|v| (v["global_step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

fn committed(line: &str) -> bool {
    line.contains("checkpoint committed")
}

#[test]
fn a_local_worker_lost_without_replacement_leaves_the_job_at_two_of_three() {
    let Some(data) = imdb_data() else { return };
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), JOB);
    let marker = format!("elastic-shrink-{}", std::process::id());
    // The reference: the same global batches at a fixed 2 workers.
    let whole = dir.path().join("whole");
    run_ok(coordinator(2, &config, &whole, &data, &marker).args(FAST_FAILURE));
    let reference = step_losses(&whole);

    let out = dir.path().join("elastic");
    let mut job = Job::start_range("2:3", &config, &out, &data, &marker, &[]);
    let victim = job.wait_for_rank_pid(2);
    job.wait_for("a checkpoint", committed);
    send_signal(victim, libc::SIGKILL);
    let (status, log) = job.finish(Duration::from_secs(120));
    assert!(status.success(), "{status}\n{log}");
    assert!(log.contains("resize 1/10: 3 -> 2 workers"), "{log}");
    let s = summary(&out);
    assert_eq!(
        (s["world_size"].as_u64(), s["resizes"].as_u64(), s["restarts"].as_u64()),
        (Some(2), Some(1), Some(0))
    );
    let spans = s["world_sizes"].as_array().expect("world_sizes");
    assert_eq!(spans.len(), 2, "{spans:?}");
    assert_eq!((spans[0]["world_size"].as_u64(), spans[1]["world_size"].as_u64()), (Some(3), Some(2)));
    let resized_at = spans[1]["from_global_step"].as_u64().unwrap();
    assert!(resized_at > 0 && resized_at.is_multiple_of(3), "resumed from a checkpoint: {spans:?}");
    let resize = metrics_records(&out, |v| v["type"] == "resize");
    assert_eq!(resize.len(), 1);
    assert_eq!(
        (resize[0]["world_size_before"].as_u64(), resize[0]["world_size_after"].as_u64()),
        (Some(3), Some(2))
    );
    assert!(resize[0]["cause"].as_str().unwrap().contains("rank 2"), "{resize:?}");
    // Every step of the job, at 3 workers and then at 2, is the fixed 2-worker run's step.
    let after = step_losses(&out);
    assert_eq!(after.last().map(|s| s.0), Some(63));
    for (step, loss) in after {
        let (_, expected) = reference.iter().find(|r| r.0 == step).expect("a reference step");
        assert!((loss - expected).abs() <= 1e-3 * expected.abs(), "step {step}: {loss} vs {expected}");
    }
    assert_none_left(&marker);
}

#[test]
fn the_last_worker_above_min_lost_ends_the_job_with_exit_75_and_the_cause() {
    let Some(data) = imdb_data() else { return };
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &JOB.replace("epochs = 3", "epochs = 20"));
    let marker = format!("elastic-min-{}", std::process::id());
    let out = dir.path().join("run");
    let mut job = Job::start_range("2:3", &config, &out, &data, &marker, &[]);
    let first = job.wait_for_rank_pid(2);
    job.wait_for("a checkpoint", committed);
    send_signal(first, libc::SIGKILL);
    job.wait_for("the resize", |l| l.contains("resize 1/10: 3 -> 2 workers"));
    let second = job.wait_for_rank_pid(1);
    job.wait_for("a checkpoint of the 2 workers", committed);
    send_signal(second, libc::SIGKILL);
    let (status, log) = job.finish(Duration::from_secs(60));
    assert_eq!(status.code(), Some(75), "{log}");
    assert!(log.contains("1 worker(s) left, fewer than the 2 that --workers 2:3 needs"), "{log}");
    assert!(log.contains("rank 1"), "the cause names the lost rank:\n{log}");
    assert_none_left(&marker);
}

/// External workers: 2 of up to 3 come, the job starts with them after --rendezvous-wait;
/// a third that comes later is admitted at the next checkpoint, and the job ends at 3.
#[test]
fn external_workers_start_below_max_and_a_late_one_joins_at_a_checkpoint() {
    const SECRET: &str = "elastic-test-secret-5d1e";
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "[model]\nembed_dim = 8\nhidden = 8\nlayers = 1\ndropout = 0.0\n\n\
         [train]\nbatch_size = 4\nepochs = 12\nseed = 3\ndevice = \"cpu\"\nlog_every = 5\nthreads = 1\n\n\
         [checkpoint]\nevery_steps = 5\nevery_seconds = 0\n",
    );
    let mut coord = trainer_tests::ExternalCoordinator::start_elastic(
        &bin("coordinator"),
        "2:3",
        SECRET,
        (200, 20),
        &["--config", config.to_str().unwrap(), "--heartbeat-timeout", "3", "--rendezvous-wait", "2"],
    );
    let marker = format!("elastic-join-{}", std::process::id());
    let join = |addr: &str| {
        scrubbed(std::process::Command::new(bin("worker")), &marker)
            .arg("join")
            .env("COORDINATOR_ADDR", addr)
            .env("TRAINER_JOB_SECRET", SECRET)
            .env("WORKER_RING_TIMEOUT", "3")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start a worker")
    };
    let addr = coord.addr().to_string();
    let mut workers = vec![join(&addr), join(&addr)];
    let deadline = Instant::now() + Duration::from_secs(60);
    while !coord.stderr().contains("checkpoint committed") {
        assert!(Instant::now() < deadline, "no checkpoint:\n{}", coord.stderr());
        std::thread::sleep(Duration::from_millis(50));
    }
    workers.push(join(&addr));
    let (status, _) = coord.wait(Duration::from_secs(180));
    let log = coord.stderr();
    assert!(status.success(), "{status}\n{log}");
    assert!(log.contains("2 of 3 workers registered within 2 s (--rendezvous-wait)"), "{log}");
    assert!(log.contains("asks to join"), "{log}");
    let s = summary(&coord.out);
    assert_eq!(
        (s["world_size"].as_u64(), s["resizes"].as_u64(), s["restarts"].as_u64()),
        (Some(3), Some(2), Some(0)),
        "{log}"
    );
    let sizes: Vec<u64> = s["world_sizes"]
        .as_array()
        .expect("world_sizes")
        .iter()
        .map(|w| w["world_size"].as_u64().unwrap())
        .collect();
    assert_eq!(sizes, [2, 3], "{log}");
    let sums = s["replica_checksums"].as_array().expect("replica_checksums");
    assert!(sums.len() == 3 && sums.iter().all(|c| c == &sums[0]), "{sums:?}");
    for worker in &mut workers {
        let status = wait_exit(worker, Duration::from_secs(20));
        assert!(status.success(), "a worker {status}\n{log}");
    }
    assert_none_left(&marker);
}

/// External workers at 3 of `2:3`: one is killed and none replaces it within
/// --rejoin-timeout, so the group goes on with 2; a new worker then joins and the group is 3
/// again from the next checkpoint (3 -> 2 -> 3).
#[test]
fn external_workers_shrink_after_a_loss_and_grow_back_when_a_worker_joins() {
    const SECRET: &str = "elastic-test-secret-8a2f";
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "[model]\nembed_dim = 8\nhidden = 8\nlayers = 1\ndropout = 0.0\n\n\
         [train]\nbatch_size = 4\nepochs = 12\nseed = 3\ndevice = \"cpu\"\nlog_every = 5\nthreads = 1\n\n\
         [checkpoint]\nevery_steps = 5\nevery_seconds = 0\n",
    );
    let mut coord = trainer_tests::ExternalCoordinator::start_elastic(
        &bin("coordinator"),
        "2:3",
        SECRET,
        (200, 20),
        &["--config", config.to_str().unwrap(), "--heartbeat-timeout", "3", "--rejoin-timeout", "4"],
    );
    let marker = format!("elastic-back-{}", std::process::id());
    let join = |addr: &str| {
        scrubbed(std::process::Command::new(bin("worker")), &marker)
            .arg("join")
            .env("COORDINATOR_ADDR", addr)
            .env("TRAINER_JOB_SECRET", SECRET)
            .env("WORKER_RING_TIMEOUT", "3")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start a worker")
    };
    let addr = coord.addr().to_string();
    let mut workers = vec![join(&addr), join(&addr)];
    let mut victim = join(&addr);
    let wait_for = |coord: &trainer_tests::ExternalCoordinator, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(90);
        while !coord.stderr().contains(what) {
            assert!(Instant::now() < deadline, "no {what:?}:\n{}", coord.stderr());
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_for(&coord, "checkpoint committed");
    victim.kill().expect("kill a worker");
    let _ = victim.wait();
    wait_for(&coord, "resize 1/10: 3 -> 2 workers");
    workers.push(join(&addr));
    let (status, _) = coord.wait(Duration::from_secs(180));
    let log = coord.stderr();
    assert!(status.success(), "{status}\n{log}");
    assert!(log.contains("2 of 3 workers registered within 4 s (--rejoin-timeout)"), "{log}");
    assert!(log.contains("resize 2/10: 2 -> 3 workers"), "{log}");
    let s = summary(&coord.out);
    assert_eq!(
        (s["world_size"].as_u64(), s["resizes"].as_u64(), s["restarts"].as_u64()),
        (Some(3), Some(2), Some(1)),
        "{log}"
    );
    let sizes: Vec<u64> = s["world_sizes"]
        .as_array()
        .expect("world_sizes")
        .iter()
        .map(|w| w["world_size"].as_u64().unwrap())
        .collect();
    assert_eq!(sizes, [3, 2, 3], "{log}");
    let sums = s["replica_checksums"].as_array().expect("replica_checksums");
    assert!(sums.len() == 3 && sums.iter().all(|c| c == &sums[0]), "{sums:?}");
    for worker in &mut workers {
        let status = wait_exit(worker, Duration::from_secs(20));
        assert!(status.success(), "a worker {status}\n{log}");
    }
    assert_none_left(&marker);
}
