//! A job run to the end as the reference, a job run with its log at hand, and the check
//! that a run which survived something ends bitwise equal to the reference.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use super::*;

/// Heartbeats and the ring give up after 3 s, so that failures are seen quickly.
pub const FAST_FAILURE: [&str; 4] = ["--heartbeat-timeout", "3", "--register-timeout", "60"];

/// What an uninterrupted run of a job ends with.
pub struct Reference {
    pub final_checksum: String,
    pub test_accuracy: f64,
    pub kept_epoch: u64,
    pub epochs: u64,
    /// model.safetensors (the kept model) and model-last.safetensors.
    pub model: Vec<u8>,
    pub last_model: Vec<u8>,
}

/// An uninterrupted run of `job`.
pub fn reference(dir: &Path, data: &Path, job: &str) -> Reference {
    let config = write_config(dir, job);
    let out = dir.join("reference");
    let marker = format!("ref-{}", std::process::id());
    run_ok(coordinator(2, &config, &out, data, &marker).args(FAST_FAILURE));
    let s = summary(&out);
    assert_eq!(s["restarts"], 0);
    Reference {
        final_checksum: s["final_parameter_checksum"].as_str().expect("checksum").to_string(),
        test_accuracy: s["test_accuracy"].as_f64().unwrap(),
        kept_epoch: s["kept_epoch"].as_u64().expect("kept_epoch"),
        epochs: s["epochs"].as_u64().expect("epochs"),
        model: std::fs::read(out.join("model.safetensors")).expect("model.safetensors"),
        last_model: std::fs::read(out.join("model-last.safetensors")).expect("model-last.safetensors"),
    }
}

/// A running coordinator and its stderr lines.
pub struct Job {
    pub child: Child,
    pub log: LogLines,
}

impl Job {
    pub fn start(config: &Path, out: &Path, data: &Path, marker: &str, extra: &[&str]) -> Job {
        Self::start_with(2, config, out, data, marker, extra)
    }

    /// [`Job::start`] with `workers` local workers.
    pub fn start_with(
        workers: usize,
        config: &Path,
        out: &Path,
        data: &Path,
        marker: &str,
        extra: &[&str],
    ) -> Job {
        Self::start_range(&workers.to_string(), config, out, data, marker, extra)
    }

    /// [`Job::start`] with `--workers` as given (`N` or `MIN:MAX`).
    pub fn start_range(
        workers: &str,
        config: &Path,
        out: &Path,
        data: &Path,
        marker: &str,
        extra: &[&str],
    ) -> Job {
        let mut child = coordinator_range(workers, config, out, data, marker)
            .args(FAST_FAILURE)
            .args(extra)
            .env("WORKER_RING_TIMEOUT", "3")
            // The service's debug lines say when an upload starts.
            .env("RUST_LOG", "info,coordinator::service=debug")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn coordinator");
        let log = LogLines::of(&mut child, Duration::from_secs(90));
        Job { child, log }
    }

    pub fn wait_for(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        self.log.wait_for(what, pred)
    }

    /// The pid of `rank` from the "worker registered" line of the attempt under way.
    pub fn wait_for_rank_pid(&mut self, rank: usize) -> u32 {
        let line = self.wait_for("registration", |l| {
            l.contains("worker registered") && l.contains(&format!(" rank={rank} "))
        });
        field(&line, "pid=").and_then(|p| p.parse().ok()).expect("pid in the registration line")
    }

    pub fn finish(mut self, within: Duration) -> (std::process::ExitStatus, String) {
        let status = wait_exit(&mut self.child, within);
        (status, self.log.drain())
    }
}

/// Workers logged that they restored the job's checkpoint of a step after `after`: a
/// restart from scratch would end equal too, so this tells them apart.
pub fn workers_restored_a_checkpoint(log: &str, after: u32) -> bool {
    log.lines()
        .filter(|l| l.contains("resuming from the job's checkpoint"))
        .filter_map(|l| field(l, "global_step=").and_then(|v| v.parse::<u32>().ok()))
        .any(|step| step > after)
}

/// The run in `out` ended as the reference did: checksums, accuracy, kept epoch and both
/// model files, byte for byte.
pub fn assert_same_result(out: &Path, expected: &Reference, log: &str) {
    let s = summary(out);
    let checksum = expected.final_checksum.as_str();
    assert_eq!(s["final_parameter_checksum"].as_str(), Some(checksum), "not bitwise equal\n{log}");
    assert_eq!(s["test_accuracy"].as_f64(), Some(expected.test_accuracy), "{log}");
    let sums = s["replica_checksums"].as_array().expect("replica_checksums");
    assert!(sums.iter().all(|c| c.as_str() == Some(checksum)), "{sums:?}");
    assert_eq!(s["kept_epoch"].as_u64(), Some(expected.kept_epoch), "{log}");
    let model = std::fs::read(out.join("model.safetensors")).expect("model.safetensors");
    assert!(model == expected.model, "the kept models (model.safetensors) differ\n{log}");
    let last = std::fs::read(out.join("model-last.safetensors")).expect("model-last.safetensors");
    assert!(last == expected.last_model, "the last models (model-last.safetensors) differ\n{log}");
}
