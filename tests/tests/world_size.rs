//! Training that does not depend on the world size (issue 22): with `train.global_batch_size`
//! fixed, a run at 2 workers and a run at 3 make the same optimizer steps up to the order of
//! float sums, and a checkpoint written at one world size resumes at another on the same
//! sequence of global batches. Real coordinator and worker processes on 127.0.0.1.
//!
//! Dropout is off in these jobs: its masks are drawn per rank (README, "Global batch").

mod common;

use std::time::Duration;

use common::*;

#[test]
fn one_global_batch_trains_the_same_at_two_and_three_workers() {
    let Some(data) = imdb_data() else { return };
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), GLOBAL_BATCH_JOB);
    let marker = format!("world-size-{}", std::process::id());
    let mut runs = Vec::new();
    for workers in [2usize, 3] {
        let out = dir.path().join(format!("w{workers}"));
        run_ok(coordinator(workers, &config, &out, &data, &marker).args(FAST_FAILURE));
        let s = summary(&out);
        assert_eq!(s["world_size"], workers as u64);
        runs.push((step_records(&out), s));
    }
    let ((two, s2), (three, s3)) = (&runs[0], &runs[1]);
    assert_eq!(two.len(), 42, "21 steps per epoch at any world size: {two:?}");
    assert_eq!(two.iter().map(|s| s.0).collect::<Vec<_>>(), three.iter().map(|s| s.0).collect::<Vec<_>>());
    // The bound: 1e-3 relative over the first 20 steps (here every step of both epochs).
    assert_eq!(assert_same_steps(two, three, 1e-3, "2 vs 3 workers"), 42);
    // Not bitwise: the ring sums in another order at another world size.
    let epochs = |s: &serde_json::Value| s["epochs"].as_u64();
    assert_eq!(epochs(s2), epochs(s3));
    let gap = (s2["test_accuracy"].as_f64().unwrap() - s3["test_accuracy"].as_f64().unwrap()).abs();
    assert!(gap <= 0.01, "test accuracy {} vs {}", s2["test_accuracy"], s3["test_accuracy"]);
    assert_none_left(&marker);
}

#[test]
fn a_checkpoint_of_four_workers_resumes_with_two_on_the_same_steps() {
    let Some(data) = imdb_data() else { return };
    let dir = tempfile::tempdir().unwrap();
    let marker = format!("resize-resume-{}", std::process::id());
    // The per-rank meaning: no global_batch_size, so 4 workers x 4 = 16 per step; resumed
    // with 2 workers, the job keeps 16 (8 each), not 2 x 4.
    let job = GLOBAL_BATCH_JOB.replace("global_batch_size = 15", "batch_size = 4");
    let config = write_config(dir.path(), &job);
    let whole = dir.path().join("whole");
    run_ok(coordinator(4, &config, &whole, &data, &marker).args(FAST_FAILURE));
    let reference = step_records(&whole);

    let out = dir.path().join("resized");
    let mut first = Job::start_with(4, &config, &out, &data, &marker, &[]);
    first.wait_for("a checkpoint in epoch 2", |l| {
        l.contains("checkpoint committed") && l.contains("epoch 2, step")
    });
    send_signal(first.child.id(), libc::SIGTERM);
    let (status, log) = first.finish(Duration::from_secs(40));
    assert_eq!(status.code(), Some(75), "{log}");

    // Another global batch is another job, named.
    let other = dir.path().join("other.toml");
    std::fs::write(&other, job.replace("batch_size = 4", "batch_size = 4\nglobal_batch_size = 12")).unwrap();
    let refused = run(coordinator(2, &other, &out, &data, &marker).arg("--resume"));
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    assert!(stderr(&refused).contains("train.global_batch_size: 12 vs 16"), "{}", stderr(&refused));

    let resumed = run_ok(coordinator(2, &config, &out, &data, &marker).args(FAST_FAILURE).arg("--resume"));
    let log = stderr(&resumed);
    assert!(log.contains("resuming at another world size"), "{log}");
    assert!(workers_restored_a_checkpoint(&log, 20), "the workers did not resume\n{log}");
    let s = summary(&out);
    assert_eq!(s["world_size"], 2);
    assert_eq!(s["epochs"], 2);
    let after = step_records(&out);
    // Every step was logged once, by the 4 workers or the 2 (a step after the checkpoint
    // that the 4 logged before SIGTERM is logged again by the 2), and both epochs' steps agree
    // with the uninterrupted 4-worker run.
    assert_eq!(after.last().map(|s| s.0), reference.last().map(|s| s.0));
    let compared = assert_same_steps(&reference, &after, 1e-3, "4 workers vs 4 then 2");
    assert_eq!(reference.len(), 40, "20 steps of 16 per epoch");
    assert!(compared >= reference.len(), "only {compared} steps compared");
    assert_none_left(&marker);
}
