//! The job's checkpoints in the run folder.
//!
//! Rank 0 uploads each checkpoint under a name of its own (`checkpoint-<step>-<end|mid>.safetensors`,
//! written to a temporary name, synced and renamed). The driver then commits it by writing
//! `checkpoint.json` atomically: which file is current, its length and SHA-256, where it was
//! taken, what job wrote it (config, corpus, vocabulary, world size) and the coordinator's
//! own state at that point (epoch records, early stopping, restarts), and the same record of
//! the checkpoint before it. `checkpoint.json` is the commit point: a crash before it leaves
//! the previous checkpoint current. The current and the previous file are kept; older ones
//! are deleted.
//!
//! Nothing is restored unchecked: [`verified`] reads the current file, compares its length
//! and SHA-256 with the record and checks that it is a whole safetensors file; one that fails
//! is renamed to `<name>.corrupt` (never deleted) with a warning, and the previous checkpoint
//! takes its place. When neither is intact the job stops with exit 6, naming each file and
//! what was wrong with it. Records written before digests existed (format /1) are checked
//! for their structure only.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use serde::{Deserialize, Serialize};
use trainer_core::exit::CorruptCheckpoint;
use trainer_core::integrity::{self, FileDigest};
use trainer_core::JobConfig;

use crate::run_dir::{EpochRecord, WorldSpan};

pub const POINTER_FILE: &str = "checkpoint.json";
pub const FORMAT: &str = "imdb-ddp-job-checkpoint/2";
/// Records of this format carry no digests; they still resume (checked for structure).
const FORMAT_WITHOUT_DIGESTS: &str = "imdb-ddp-job-checkpoint/1";

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
        // The sequence of steps is decided by the global batch, not by how many ranks share
        // it: a checkpoint resumes at any world size with the same global batch.
        let steps = |id: &JobIdentity| {
            let mut config = id.config.clone();
            config.train.global_batch_size = config.train.global_batch(id.world_size);
            config.train.batch_size = 0;
            config
        };
        let mut out = steps(self).job_differences(&steps(theirs));
        if self.corpus != theirs.corpus {
            out.push(format!("corpus checksum: {} vs {}", self.corpus, theirs.corpus));
        }
        if self.vocab_fingerprint != theirs.vocab_fingerprint {
            out.push(format!("vocabulary: {} vs {}", self.vocab_fingerprint, theirs.vocab_fingerprint));
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
    /// Changes of the world size (`--workers MIN:MAX`).
    #[serde(default)]
    pub resizes: u32,
    /// The world size from each optimizer step on: the job's history of resizes.
    #[serde(default)]
    pub world_sizes: Vec<WorldSpan>,
}

/// `checkpoint.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobCheckpoint {
    pub format: String,
    /// The current checkpoint, a file name in the run folder.
    pub file: String,
    /// The current file's length and SHA-256 (None in records of format /1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<FileDigest>,
    /// The one before, kept until the next commit.
    pub previous_file: Option<String>,
    /// The record of the checkpoint before (its file is `previous_file`), so that the job
    /// can fall back to it when the current one is damaged. Its own `previous` is None.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<Box<JobCheckpoint>>,
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

/// Reads `checkpoint.json` of `dir`; `None` when there is none. The files it names are
/// checked by [`verified`], not here.
pub fn read(dir: &Path) -> anyhow::Result<Option<JobCheckpoint>> {
    let path = dir.join(POINTER_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let pointer: JobCheckpoint = serde_json::from_str(&text).map_err(|e| {
        anyhow!(CorruptCheckpoint(format!(
            "{} is not a checkpoint record of this trainer ({e}); set it aside (rename it) to \
             start afresh in this folder",
            path.display()
        )))
    })?;
    if pointer.format != FORMAT && pointer.format != FORMAT_WITHOUT_DIGESTS {
        bail!(
            "{}: checkpoint format {:?}; this coordinator reads {FORMAT:?} and {FORMAT_WITHOUT_DIGESTS:?}",
            path.display(),
            pointer.format
        );
    }
    Ok(Some(pointer))
}

/// Why the file of `pointer` (in `dir`) cannot be restored; None when it is intact: the
/// length and SHA-256 recorded, and a whole safetensors file.
pub fn check_file(dir: &Path, pointer: &JobCheckpoint) -> Option<String> {
    let path = dir.join(&pointer.file);
    let bytes = match &pointer.digest {
        Some(digest) => match digest.read_checked(&path) {
            Ok(bytes) => bytes,
            Err(e) => return Some(e.to_string()),
        },
        None => match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Some("missing".into()),
            Err(e) => return Some(format!("cannot read: {e}")),
        },
    };
    safetensors::SafeTensors::deserialize(&bytes).err().map(|e| format!("not a whole safetensors file: {e}"))
}

/// The checkpoint to restore: `pointer`'s file when it is intact, else the previous one
/// when that is (then `checkpoint.json` is rewritten to name it). A file that fails its
/// check is set aside as `<name>.corrupt` with a warning. None intact: an error (exit 6)
/// naming every file and what was wrong.
pub fn verified(dir: &Path, pointer: &JobCheckpoint) -> anyhow::Result<JobCheckpoint> {
    let mut problems = Vec::new();
    let candidates = std::iter::once(pointer.clone()).chain(pointer.previous.as_deref().cloned());
    for (i, candidate) in candidates.enumerate() {
        let Some(problem) = check_file(dir, &candidate) else {
            if i == 0 {
                return Ok(candidate);
            }
            let fallback = pointer_without_previous(candidate);
            write_pointer(dir, &fallback)?;
            tracing::warn!(file = %fallback.file, at = %fallback.describe(), "resuming from the previous checkpoint");
            return Ok(fallback);
        };
        let path = dir.join(&candidate.file);
        let aside = match path.exists().then(|| integrity::set_aside(&path)) {
            Some(Ok(to)) => format!("; set aside as {}", to.display()),
            Some(Err(e)) => format!("; could not set it aside: {e}"),
            None => String::new(),
        };
        tracing::warn!(
            "checkpoint {} ({}) cannot be restored: {problem}{aside}",
            path.display(),
            candidate.describe()
        );
        problems.push(format!("{}: {problem}{aside}", path.display()));
    }
    if pointer.previous.is_none() && pointer.previous_file.is_some() {
        problems.push(format!(
            "{}: not recorded in {POINTER_FILE} (written by an older coordinator), so not tried",
            dir.join(pointer.previous_file.as_deref().unwrap_or_default()).display()
        ));
    }
    Err(anyhow!(CorruptCheckpoint(format!(
        "no intact checkpoint to resume from in {}: {}. Move the folder aside and start afresh, \
         or restore the files from a backup",
        dir.display(),
        problems.join("; ")
    ))))
}

fn pointer_without_previous(mut pointer: JobCheckpoint) -> JobCheckpoint {
    pointer.previous = None;
    pointer.previous_file = None;
    pointer
}

fn write_pointer(dir: &Path, pointer: &JobCheckpoint) -> anyhow::Result<()> {
    let json = serde_json::to_vec_pretty(pointer)?;
    trainer_core::write_atomically(&dir.join(POINTER_FILE), &json)?;
    Ok(())
}

/// Commits `pointer` (its file is already in `dir`) and deletes older checkpoint files
/// other than the previous one. Newer files stay: rank 0 may already have uploaded the next
/// checkpoint while this one's commit was on its way (fast steps), and that one is committed
/// next.
pub fn commit(dir: &Path, pointer: &JobCheckpoint) -> anyhow::Result<()> {
    write_pointer(dir, pointer)?;
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
    /// What the file must hash to (None for records without digests).
    pub digest: Option<FileDigest>,
}

/// What the workers of an attempt restore: the current file of `pointer`, in `dir`.
pub fn resume_from(dir: &Path, pointer: &JobCheckpoint) -> ResumeFrom {
    ResumeFrom {
        file: dir.join(&pointer.file),
        global_step: pointer.global_step,
        digest: pointer.digest.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pointer(file: &str, previous: Option<&str>) -> JobCheckpoint {
        JobCheckpoint {
            format: FORMAT.into(),
            file: file.into(),
            digest: None,
            previous_file: previous.map(Into::into),
            previous: None,
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
    }

    /// A real safetensors file of one tensor, distinct per `seed`.
    fn safetensors_bytes(seed: u8) -> Vec<u8> {
        let data: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(seed)).collect();
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![16], &data).unwrap();
        safetensors::tensor::serialize([("w", view)], None).unwrap()
    }

    /// Two committed checkpoints (steps 10 and 13, with digests), as a run leaves them.
    fn two_checkpoints(dir: &Path) -> JobCheckpoint {
        let mut previous = pointer(&file_name(10, true), None);
        previous.global_step = 10;
        let mut current = pointer(&file_name(13, false), Some(&file_name(10, true)));
        for (p, seed) in [(&mut previous, 3u8), (&mut current, 5)] {
            let bytes = safetensors_bytes(seed);
            std::fs::write(dir.join(&p.file), &bytes).unwrap();
            p.digest = Some(FileDigest::of_bytes(&bytes));
        }
        current.previous = Some(Box::new(previous));
        commit(dir, &current).unwrap();
        current
    }

    #[test]
    fn an_intact_checkpoint_is_restored_as_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let current = two_checkpoints(dir.path());
        let back = read(dir.path()).unwrap().unwrap();
        assert_eq!(back.digest, current.digest);
        assert_eq!(back.previous.as_ref().map(|p| p.global_step), Some(10));
        assert_eq!(verified(dir.path(), &back).unwrap().global_step, 13);
    }

    #[test]
    fn a_flipped_bit_falls_back_to_the_previous_checkpoint_and_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let current = two_checkpoints(dir.path());
        let path = dir.path().join(&current.file);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 3;
        bytes[last] ^= 0x04; // inside a tensor: the file still parses
        std::fs::write(&path, &bytes).unwrap();
        assert!(safetensors::SafeTensors::deserialize(&bytes).is_ok());
        let restored = verified(dir.path(), &read(dir.path()).unwrap().unwrap()).unwrap();
        assert_eq!((restored.global_step, restored.previous.is_none()), (10, true));
        assert!(!path.exists() && dir.path().join(format!("{}.corrupt", current.file)).exists());
        // checkpoint.json now names the intact one, so a second restore needs no fallback.
        assert_eq!(read(dir.path()).unwrap().unwrap().file, file_name(10, true));
    }

    #[test]
    fn when_no_checkpoint_is_intact_every_file_is_named_with_its_fault() {
        let dir = tempfile::tempdir().unwrap();
        let current = two_checkpoints(dir.path());
        let path = dir.path().join(&current.file);
        let half = std::fs::read(&path).unwrap().len() / 2;
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(half as u64).unwrap();
        std::fs::remove_file(dir.path().join(file_name(10, true))).unwrap();
        let e = verified(dir.path(), &current).unwrap_err();
        assert_eq!(trainer_core::exit::code_for(e.chain()), trainer_core::exit::CORRUPT_CHECKPOINT);
        let text = format!("{e:#}");
        assert!(text.contains(&current.file) && text.contains("truncated"), "{text}");
        assert!(text.contains(&file_name(10, true)) && text.contains("missing"), "{text}");
    }

    #[test]
    fn a_record_without_digests_is_checked_for_structure() {
        let dir = tempfile::tempdir().unwrap();
        let mut old = two_checkpoints(dir.path());
        old.format = FORMAT_WITHOUT_DIGESTS.into();
        old.digest = None;
        old.previous = None;
        assert_eq!(verified(dir.path(), &old).unwrap().global_step, 13);
        let path = dir.path().join(&old.file);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
        let e = format!("{:#}", verified(dir.path(), &old).unwrap_err());
        assert!(e.contains("not a whole safetensors file") && e.contains("not tried"), "{e}");
    }

    #[test]
    fn another_job_is_named_field_by_field() {
        let a = pointer("f", None).job;
        let mut b = a.clone();
        assert!(a.differences(&b).is_empty());
        b.config.train.seed = 9;
        b.world_size = 3;
        let d = a.differences(&b).join("; ");
        // 2 x 32 against 3 x 32: another global batch, so another sequence of steps.
        assert!(d.contains("train.seed: 0 vs 9") && d.contains("train.global_batch_size: 64 vs 96"), "{d}");
        // Another world size with the same global batch is the same job.
        let mut c = a.clone();
        c.world_size = 4;
        c.config.train.global_batch_size = 64;
        assert!(a.differences(&c).is_empty(), "{:?}", a.differences(&c));
        c.config.train.batch_size = 16;
        c.config.train.global_batch_size = 0;
        assert!(a.differences(&c).is_empty(), "4 x 16 is 2 x 32: {:?}", a.differences(&c));
    }
}
