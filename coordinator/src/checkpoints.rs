//! The job's checkpoints in the run folder.
//!
//! Rank 0 uploads each checkpoint under a name of its own (`checkpoint-<step>-<end|mid>.safetensors`,
//! written to a temporary name and renamed). The driver then commits it by writing
//! `checkpoint.json` atomically: which file is current, where it was taken, what job wrote it
//! (config, corpus, vocabulary, world size) and the coordinator's own state at that point
//! (epoch records, early stopping, restarts). `checkpoint.json` is the commit point: a crash
//! before it leaves the previous checkpoint current. The current and the previous file are
//! kept; older ones are deleted.
//!
//! Nothing here assumes the world size of the run that wrote it beyond the same-job check:
//! the shard plan is a pure function of (seed, epoch, world size), so a smaller group could
//! resume from the same global step once the step-to-sample mapping is made world-size
//! independent (elastic resizing, not built yet).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use trainer_core::JobConfig;

use crate::run_dir::EpochRecord;

pub const POINTER_FILE: &str = "checkpoint.json";
pub const FORMAT: &str = "imdb-ddp-job-checkpoint/1";

/// The file name of the checkpoint taken after `global_step` optimizer steps.
pub fn file_name(global_step: u64, epoch_end: bool) -> String {
    format!("checkpoint-{global_step:09}-{}.safetensors", if epoch_end { "end" } else { "mid" })
}

/// What makes two runs the same job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobIdentity {
    pub config: JobConfig,
    /// The corpus checksum (sha256 of the source), from the data pipeline.
    pub corpus: String,
    pub vocab_fingerprint: String,
    pub world_size: usize,
}

impl JobIdentity {
    /// Why `theirs` (a checkpoint's) is another job than this one; empty when it is the same.
    pub fn differences(&self, theirs: &JobIdentity) -> Vec<String> {
        let mut out = self.config.job_differences(&theirs.config);
        if self.corpus != theirs.corpus {
            out.push(format!("corpus checksum: {} vs {}", self.corpus, theirs.corpus));
        }
        if self.vocab_fingerprint != theirs.vocab_fingerprint {
            out.push(format!("vocabulary: {} vs {}", self.vocab_fingerprint, theirs.vocab_fingerprint));
        }
        if self.world_size != theirs.world_size {
            out.push(format!(
                "world size: {} vs {} (resuming with another number of workers is not supported yet)",
                self.world_size, theirs.world_size
            ));
        }
        out
    }
}

/// The coordinator's state that a checkpoint carries: everything the summary and the epoch
/// loop need to go on as if nothing happened.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct JobProgress {
    pub records: Vec<EpochRecord>,
    /// (best validation accuracy, its epoch, 1-based).
    pub best: Option<(f64, usize)>,
    pub epochs_without_gain: usize,
    pub stopped_early: bool,
    pub train_seconds: f64,
    pub tokens: u64,
    pub step_seconds: f64,
    pub comm_seconds: f64,
    /// Replica checksums after the last finished epoch, in rank order.
    pub checksums: Vec<u64>,
    pub restarts: u32,
    pub steps_lost: u64,
}

/// `checkpoint.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobCheckpoint {
    pub format: String,
    /// The current checkpoint, a file name in the run folder.
    pub file: String,
    /// The one before, kept until the next commit.
    pub previous_file: Option<String>,
    /// Taken after `step_in_epoch` steps of epoch `epoch` (0-based), or at its end.
    pub epoch: u64,
    pub step_in_epoch: u64,
    pub epoch_end: bool,
    pub global_step: u64,
    pub job: JobIdentity,
    pub progress: JobProgress,
}

impl JobCheckpoint {
    /// Where training goes on: (epoch, first step of it).
    pub fn resume_point(&self) -> (u64, u64) {
        if self.epoch_end {
            (self.epoch + 1, 0)
        } else {
            (self.epoch, self.step_in_epoch)
        }
    }

    pub fn describe(&self) -> String {
        if self.epoch_end {
            format!("end of epoch {} (step {})", self.epoch + 1, self.global_step)
        } else {
            format!(
                "epoch {}, step {} of it (step {} in all)",
                self.epoch + 1,
                self.step_in_epoch,
                self.global_step
            )
        }
    }
}

/// Reads `checkpoint.json` of `dir`; `None` when there is none.
pub fn read(dir: &Path) -> anyhow::Result<Option<JobCheckpoint>> {
    let path = dir.join(POINTER_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let pointer: JobCheckpoint = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a checkpoint record of this trainer", path.display()))?;
    if pointer.format != FORMAT {
        bail!(
            "{}: checkpoint format {:?}; this coordinator reads {FORMAT:?}",
            path.display(),
            pointer.format
        );
    }
    let file = dir.join(&pointer.file);
    if !file.is_file() {
        bail!("{} names {}, which is missing", path.display(), file.display());
    }
    Ok(Some(pointer))
}

/// Commits `pointer` (its file is already in `dir`) and deletes older checkpoint files
/// other than the previous one. Newer files stay: rank 0 may already have uploaded the next
/// checkpoint while this one's commit was on its way (fast steps), and that one is committed
/// next.
pub fn commit(dir: &Path, pointer: &JobCheckpoint) -> anyhow::Result<()> {
    let json = serde_json::to_vec_pretty(pointer)?;
    trainer_core::write_atomically(&dir.join(POINTER_FILE), &json)?;
    let keep: Vec<&str> =
        std::iter::once(pointer.file.as_str()).chain(pointer.previous_file.as_deref()).collect();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        // Names hold the zero-padded global step, so they sort by step.
        let older = name.as_str() < pointer.file.as_str();
        if name.starts_with("checkpoint-")
            && name.ends_with(".safetensors")
            && older
            && !keep.contains(&name.as_str())
        {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(())
}

/// The checkpoint an attempt resumes from, which the service streams to every rank.
#[derive(Debug, Clone)]
pub struct ResumeFrom {
    pub file: PathBuf,
    pub global_step: u64,
}

/// What the workers of an attempt restore: the current file of `pointer`, in `dir`.
pub fn resume_from(dir: &Path, pointer: &JobCheckpoint) -> ResumeFrom {
    ResumeFrom { file: dir.join(&pointer.file), global_step: pointer.global_step }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pointer(file: &str, previous: Option<&str>) -> JobCheckpoint {
        JobCheckpoint {
            format: FORMAT.into(),
            file: file.into(),
            previous_file: previous.map(Into::into),
            epoch: 1,
            step_in_epoch: 3,
            epoch_end: false,
            global_step: 13,
            job: JobIdentity {
                config: JobConfig::default(),
                corpus: "c".into(),
                vocab_fingerprint: "v".into(),
                world_size: 2,
            },
            progress: JobProgress::default(),
        }
    }

    #[test]
    fn commit_keeps_the_current_and_previous_files() {
        let dir = tempfile::tempdir().unwrap();
        // 20: rank 0's next checkpoint, uploaded before 13 was committed.
        for step in [5u64, 10, 13, 20] {
            std::fs::write(dir.path().join(file_name(step, step == 10)), b"x").unwrap();
        }
        let p = pointer(&file_name(13, false), Some(&file_name(10, true)));
        commit(dir.path(), &p).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            vec![
                "checkpoint-000000010-end.safetensors",
                "checkpoint-000000013-mid.safetensors",
                "checkpoint-000000020-mid.safetensors",
                "checkpoint.json"
            ]
        );
        let back = read(dir.path()).unwrap().unwrap();
        assert_eq!((back.global_step, back.resume_point()), (13, (1, 3)));
        // Committing 20 then drops 10 (older than the previous one, 13).
        commit(dir.path(), &pointer(&file_name(20, false), Some(&file_name(13, false)))).unwrap();
        assert!(
            !dir.path().join(file_name(10, true)).exists() && dir.path().join(file_name(13, false)).exists()
        );
        let back = read(dir.path()).unwrap().unwrap();
        std::fs::remove_file(dir.path().join(&back.file)).unwrap();
        assert!(read(dir.path()).unwrap_err().to_string().contains("missing"));
    }

    #[test]
    fn another_job_is_named_field_by_field() {
        let a = pointer("f", None).job;
        let mut b = a.clone();
        assert!(a.differences(&b).is_empty());
        b.config.train.seed = 9;
        b.world_size = 3;
        let d = a.differences(&b).join("; ");
        assert!(d.contains("train.seed: 0 vs 9") && d.contains("world size: 2 vs 3"), "{d}");
    }
}
