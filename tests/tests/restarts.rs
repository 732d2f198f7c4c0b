//! Failures that the job survives, with real processes on 127.0.0.1: a worker killed
//! mid-epoch, a worker that stalls (SIGSTOP) until the collective times out, the
//! coordinator killed (SIGKILL) or terminated (SIGTERM) and then resumed with `--resume`.
//!
//! On the CPU the ring is deterministic and the shard plan, the dropout masks and the
//! learning rate are functions of (seed, epoch, step), so a run that restarts from a
//! checkpoint must end *bitwise* equal to an uninterrupted run of the same config: the same
//! final parameter checksum, the same kept model (the best by validation, which the
//! checkpoints carry) and last model, byte for byte, and the same test accuracy. Every test
//! holds it to that.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// A mid-epoch checkpoint of epoch 2 was committed.
fn epoch_two_checkpoint(line: &str) -> bool {
    line.contains("checkpoint committed") && line.contains("epoch 2, step")
}

#[test]
fn a_killed_or_stalled_worker_costs_a_restart_and_the_run_ends_bitwise_equal() {
    let Some(data) = imdb_data() else { return };
    let dir = tempfile::tempdir().unwrap();
    let expected = reference(dir.path(), &data, RESTARTABLE_JOB);
    let config = write_config(dir.path(), RESTARTABLE_JOB);

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
        assert!(workers_restored_a_checkpoint(&log, 25), "{name}: the new workers did not resume\n{log}");
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

/// The best model by validation survives a restart: a worker killed in the epoch after the
/// best one (the best model is then only in the replicas' memory and the checkpoints), and
/// the job still exports that model, bitwise equal to the uninterrupted run's. The run is
/// deterministic on one machine, so the reference says which epoch is the best.
#[test]
fn a_worker_killed_after_the_best_epoch_still_exports_the_best_model() {
    let Some(data) = imdb_data() else { return };
    let dir = tempfile::tempdir().unwrap();
    let expected = reference(dir.path(), &data, OVERFITTING_JOB);
    // OVERFITTING_JOB stops early, so the best epoch is never the last (see there).
    assert!(
        expected.kept_epoch < expected.epochs,
        "best epoch {} of {}",
        expected.kept_epoch,
        expected.epochs
    );
    let config = write_config(dir.path(), OVERFITTING_JOB);
    let out = dir.path().join("killed");
    let marker = format!("after-best-{}", std::process::id());
    let mut job = Job::start(&config, &out, &data, &marker, &[]);
    let victim = job.wait_for_rank_pid(1);
    let after_best = format!("epoch {}, step", expected.kept_epoch + 1);
    job.wait_for("a checkpoint in the epoch after the best", |l| {
        l.contains("checkpoint committed") && l.contains(&after_best)
    });
    send_signal(victim, libc::SIGKILL);
    let (status, log) = job.finish(Duration::from_secs(120));
    assert!(status.success(), "{status}\n{log}");
    assert_none_left(&marker);
    assert_eq!(summary(&out)["restarts"], 1, "{log}");
    // 50 steps per epoch: the new workers restored a checkpoint taken after the best epoch.
    assert!(workers_restored_a_checkpoint(&log, 50 * expected.kept_epoch as u32), "no resume\n{log}");
    assert_same_result(&out, &expected, &log);
}

#[test]
fn a_dead_or_terminated_coordinator_resumes_bitwise_equal() {
    let Some(data) = imdb_data() else { return };
    let dir = tempfile::tempdir().unwrap();
    let expected = reference(dir.path(), &data, RESTARTABLE_JOB);
    let config = write_config(dir.path(), RESTARTABLE_JOB);

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
        std::fs::write(&other, RESTARTABLE_JOB.replace("seed = 5", "seed = 6")).unwrap();
        let refused = run(coordinator(2, &other, &out, &data, &marker).args(["--resume"]));
        assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
        assert!(stderr(&refused).contains("train.seed: 6 vs 5"), "{}", stderr(&refused));

        let mut job = Job::start(&config, &out, &data, &marker, &["--resume=auto"]);
        job.wait_for("the resume", |l| l.contains("resuming the job from its checkpoint"));
        let (status, log) = job.finish(Duration::from_secs(120));
        assert!(status.success(), "{name}: {status}\n{log}");
        assert!(workers_restored_a_checkpoint(&log, 25), "{name}: the workers did not resume\n{log}");
        assert_none_left(&marker);
        assert_same_result(&out, &expected, &log);
    }
}

#[test]
fn restarts_used_up_end_the_job_with_the_last_cause() {
    let Some(data) = imdb_data() else { return };
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &RESTARTABLE_JOB.replace("epochs = 3", "epochs = 30"));
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

/// Workers started elsewhere (`--external-workers`, as on Kubernetes): when one dies, the
/// coordinator tells the survivor to join again (it re-executes itself) and waits for a
/// replacement, which a supervisor would start; the job then finishes from its checkpoint.
#[test]
fn external_workers_rejoin_and_a_replacement_registers_as_a_new_worker() {
    const SECRET: &str = "restart-test-secret-1b7c";
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &external_job(2));
    let mut coord = trainer_tests::ExternalCoordinator::start(
        &bin("coordinator"),
        2,
        SECRET,
        (200, 20),
        &["--config", config.to_str().unwrap(), "--heartbeat-timeout", "3", "--rejoin-timeout", "60"],
    );
    let marker = format!("external-{}", std::process::id());
    let join = |addr: &str| join_worker(addr, SECRET, &marker);
    let addr = coord.addr().to_string();
    let mut survivor = join(&addr);
    let mut victim = join(&addr);
    wait_for_log(&coord, "checkpoint committed");
    victim.kill().expect("kill a worker");
    let _ = victim.wait();
    // The supervisor's part: a new worker in place of the dead one.
    let mut replacement = join(&addr);
    let (status, _) = coord.wait(Duration::from_secs(120));
    let log = coord.stderr();
    assert!(status.success(), "{status}\n{log}");
    assert!(log.contains("restart 1/3"), "{log}");
    if std::env::var_os("SHOW_LOG").is_some() {
        eprintln!("{}", log.lines().filter(|l| !l.contains("DEBUG")).collect::<Vec<_>>().join("\n"));
    }
    let s = summary(&coord.out);
    assert_eq!((s["restarts"].as_u64(), s["world_size"].as_u64()), (Some(1), Some(2)), "{log}");
    let sums = s["replica_checksums"].as_array().expect("replica_checksums");
    assert_eq!(sums[0], sums[1], "{log}");
    // The survivor re-executed itself into the new group and finished with it.
    for (name, worker) in [("survivor", &mut survivor), ("replacement", &mut replacement)] {
        let status = wait_exit(worker, Duration::from_secs(20));
        assert!(status.success(), "{name} {status}\n{log}");
    }
    assert_none_left(&marker);
}

/// Rank 0 killed while it streams a checkpoint: the partial upload is discarded, the last
/// committed checkpoint stays current, and the restarted run still ends bitwise equal.
#[test]
fn a_worker_killed_during_a_checkpoint_upload_leaves_the_last_checkpoint_current() {
    let Some(data) = imdb_data() else { return };
    // A bigger embedding (20,000 x 96 with Adam's two moments: a 23 MB checkpoint) takes
    // long enough to stream that a kill at its first chunk lands inside it.
    let job = RESTARTABLE_JOB
        .replace("max_vocab = 2000", "max_vocab = 20000")
        .replace("embed_dim = 8", "embed_dim = 96");
    let dir = tempfile::tempdir().unwrap();
    let expected = reference(dir.path(), &data, &job);
    let config = write_config(dir.path(), &job);
    // The kill races the stream: try a few runs until one breaks an upload off.
    for try_number in 0..3 {
        let out = dir.path().join(format!("upload-{try_number}"));
        let marker = format!("upload-{try_number}-{}", std::process::id());
        let mut job = Job::start(&config, &out, &data, &marker, &[]);
        let rank0 = job.wait_for_rank_pid(0);
        job.wait_for("a checkpoint upload after the first one", |l| {
            l.contains("upload started") && l.contains("-mid.safetensors") && !l.contains("000000010-")
        });
        send_signal(rank0, libc::SIGKILL);
        let (status, log) = job.finish(Duration::from_secs(120));
        assert!(status.success(), "{status}\n{log}");
        assert_none_left(&marker);
        if !log.contains("upload broke off") {
            eprintln!("try {try_number}: the upload finished before the kill; trying again");
            continue;
        }
        assert_eq!(summary(&out)["restarts"], 1, "{log}");
        // The kill lands at the second or a later checkpoint (step 20 or later).
        assert!(workers_restored_a_checkpoint(&log, 0), "the workers did not resume\n{log}");
        assert_same_result(&out, &expected, &log);
        // No partial upload is left beside the committed checkpoints.
        let stray: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(stray.is_empty(), "temporary files left: {stray:?}");
        return;
    }
    panic!("in 3 runs, no kill landed inside a checkpoint upload");
}

/// `--resume` with nothing to resume, and a damaged `checkpoint.json`, are refused with a
/// message that names the file, before any worker starts.
#[test]
fn resume_refuses_an_empty_folder_and_a_damaged_record() {
    let dir = tempfile::tempdir().unwrap();
    let data = trainer_tests::write_synthetic_corpus(dir.path(), 20, 5);
    let config = write_config(
        dir.path(),
        "[model]\nembed_dim = 8\nhidden = 8\nlayers = 1\n\n[train]\nbatch_size = 4\n",
    );
    let out = dir.path().join("run");
    let marker = format!("resume-flags-{}", std::process::id());
    let start =
        |extra: &[&str]| run(coordinator(2, &config, &out, &data, &marker).arg("--no-cache").args(extra));

    let empty = start(&["--resume"]);
    assert_eq!(empty.status.code(), Some(2), "{}", stderr(&empty));
    assert!(stderr(&empty).contains("holds no checkpoint of a job"), "{}", stderr(&empty));

    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("checkpoint.json"), b"{ not json").unwrap();
    let damaged = start(&["--resume=auto"]);
    assert_eq!(damaged.status.code(), Some(6), "{}", stderr(&damaged));
    assert!(
        stderr(&damaged).contains("checkpoint.json is not a checkpoint record of this trainer"),
        "{}",
        stderr(&damaged)
    );
    assert_none_left(&marker);
}
