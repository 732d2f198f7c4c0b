//! Elastic world size (`--workers MIN:MAX`, issue 22) with real processes on 127.0.0.1: a
//! local worker killed with no replacement (the job ends at 2 of 3), the last worker above
//! MIN killed (exit 75 naming the cause), and external workers that start below MAX and
//! grow when a worker joins later. Dropout is off, so that the steps after a resize can be
//! compared with an uninterrupted run at another world size (tests/tests/world_size.rs).

mod common;

use std::sync::Mutex;
use std::time::Duration;

use common::*;

/// The world-size tests' job, for 3 epochs (63 steps).
fn job() -> String {
    GLOBAL_BATCH_JOB.replace("epochs = 2", "epochs = 3")
}

const SECRET: &str = "elastic-test-secret-5d1e";

/// One of these jobs at a time: each runs 3 or 4 processes, and side by side on 2 cores their
/// steps and joins took minutes.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

/// A `--workers 2:3` coordinator for external workers (a synthetic corpus, 12 epochs of the
/// external tests' job, 3 s heartbeats) with `args`; its folder and its address.
fn external_elastic(args: &[&str]) -> (tempfile::TempDir, trainer_tests::ExternalCoordinator, String) {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &external_job(12));
    let config = config.to_str().unwrap().to_string();
    let mut all = vec!["--config", &config, "--heartbeat-timeout", "3"];
    all.extend_from_slice(args);
    let coord = trainer_tests::ExternalCoordinator::start_elastic(
        &bin("coordinator"),
        "2:3",
        SECRET,
        (200, 20),
        &all,
    );
    let addr = coord.addr().to_string();
    (dir, coord, addr)
}

/// An external job ended with `world` workers after `resizes` and `restarts`, with the
/// world sizes `sizes` in turn, equal replicas, and every worker exited 0.
fn assert_external_end(
    out: &std::path::Path,
    log: &str,
    (world, resizes, restarts): (u64, u64, u64),
    sizes: &[u64],
    workers: &mut [std::process::Child],
) {
    let s = summary(out);
    let counts = (s["world_size"].as_u64(), s["resizes"].as_u64(), s["restarts"].as_u64());
    assert_eq!(counts, (Some(world), Some(resizes), Some(restarts)), "{log}");
    let history: Vec<u64> = s["world_sizes"]
        .as_array()
        .expect("world_sizes")
        .iter()
        .map(|w| w["world_size"].as_u64().unwrap())
        .collect();
    assert_eq!(history, sizes, "{log}");
    let sums = s["replica_checksums"].as_array().expect("replica_checksums");
    assert!(sums.len() == world as usize && sums.iter().all(|c| c == &sums[0]), "{sums:?}");
    for worker in workers {
        let status = wait_exit(worker, Duration::from_secs(20));
        assert!(status.success(), "a worker {status}\n{log}");
    }
}

fn committed(line: &str) -> bool {
    line.contains("checkpoint committed")
}

#[test]
fn a_local_worker_lost_without_replacement_leaves_the_job_at_two_of_three() {
    let _one = one_at_a_time();
    let Some(data) = imdb_data() else { return };
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &job());
    let marker = format!("elastic-shrink-{}", std::process::id());
    // The reference: the same global batches at a fixed 2 workers.
    let whole = dir.path().join("whole");
    run_ok(coordinator(2, &config, &whole, &data, &marker).args(FAST_FAILURE));
    let reference = step_records(&whole);

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
    let after = step_records(&out);
    assert_eq!(after.last().map(|s| s.0), Some(63));
    let compared = assert_same_steps(&reference, &after, 1e-3, "2:3 resized vs 2 fixed");
    assert!(compared >= 63, "only {compared} steps compared");
    assert_none_left(&marker);
}

#[test]
fn the_last_worker_above_min_lost_ends_the_job_with_exit_75_and_the_cause() {
    let _one = one_at_a_time();
    let Some(data) = imdb_data() else { return };
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &GLOBAL_BATCH_JOB.replace("epochs = 2", "epochs = 20"));
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
    let _one = one_at_a_time();
    let (_dir, mut coord, addr) = external_elastic(&["--rendezvous-wait", "2"]);
    let marker = format!("elastic-join-{}", std::process::id());
    let join = |addr: &str| join_worker(addr, SECRET, &marker);
    let mut workers = vec![join(&addr), join(&addr)];
    wait_for_log(&coord, "checkpoint committed");
    workers.push(join(&addr));
    let (status, _) = coord.wait(Duration::from_secs(300));
    let log = coord.stderr();
    assert!(status.success(), "{status}\n{log}");
    assert!(log.contains("2 of 3 workers registered within 2 s (--rendezvous-wait)"), "{log}");
    assert!(log.contains("asks to join"), "{log}");
    assert_external_end(&coord.out, &log, (3, 2, 0), &[2, 3], &mut workers);
    assert_none_left(&marker);
}

/// External workers at 3 of `2:3`: one is killed and none replaces it within
/// --rejoin-timeout, so the group goes on with 2; a new worker then joins and the group is 3
/// again from the next checkpoint (3 -> 2 -> 3).
#[test]
fn external_workers_shrink_after_a_loss_and_grow_back_when_a_worker_joins() {
    let _one = one_at_a_time();
    let (_dir, mut coord, addr) = external_elastic(&["--rejoin-timeout", "4"]);
    let marker = format!("elastic-back-{}", std::process::id());
    let join = |addr: &str| join_worker(addr, SECRET, &marker);
    let mut workers = vec![join(&addr), join(&addr)];
    let mut victim = join(&addr);
    wait_for_log(&coord, "checkpoint committed");
    victim.kill().expect("kill a worker");
    let _ = victim.wait();
    wait_for_log(&coord, "resize 1/10: 3 -> 2 workers");
    workers.push(join(&addr));
    let (status, _) = coord.wait(Duration::from_secs(300));
    let log = coord.stderr();
    assert!(status.success(), "{status}\n{log}");
    assert!(log.contains("2 of 3 workers registered within 4 s (--rejoin-timeout)"), "{log}");
    assert!(log.contains("resize 2/10: 2 -> 3 workers"), "{log}");
    assert_external_end(&coord.out, &log, (3, 2, 1), &[3, 2, 3], &mut workers);
    assert_none_left(&marker);
}
