//! The run folder, the same as `worker train` writes: model.safetensors (the kept model: the
//! best by validation), model-last.safetensors (the last epoch's), vocab.txt, config.toml,
//! metrics.jsonl, summary.json (plus world_size and replica_checksums), and the last
//! checkpoint. Every file is written to a temporary name and renamed, so that an
//! interrupted run never leaves a half-written file behind.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use trainer_core::encode::EncodedCorpus;
use trainer_core::integrity::{self, FileDigest, HashingWriter};
use trainer_core::JobConfig;

pub const MODEL_FILE: &str = "model.safetensors";
pub const LAST_MODEL_FILE: &str = "model-last.safetensors";
pub const CONFIG_FILE: &str = "config.toml";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const SUMMARY_FILE: &str = "summary.json";

/// Writes one uploaded artifact: a temporary file in the run folder, hashed as it is
/// written, synced and renamed on commit (then the folder is synced too).
pub struct ArtifactWriter {
    tmp: tempfile::NamedTempFile,
    target: PathBuf,
    digest: HashingWriter,
}

impl ArtifactWriter {
    pub fn create(dir: &Path, name: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .tempfile_in(dir)
            .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
        Ok(Self { tmp, target: dir.join(name), digest: HashingWriter::default() })
    }

    pub fn write(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.digest.update(bytes);
        self.tmp.write_all(bytes).with_context(|| format!("cannot write {}", self.target.display()))
    }

    /// Makes the file durable under its name; its digest. When the sender said what the
    /// bytes hash to (`expected_sha256`) and they hash otherwise, nothing is renamed and the
    /// temporary file is deleted.
    pub fn commit(self, expected_sha256: Option<&str>) -> Result<FileDigest, CommitError> {
        let digest = self.digest.finish();
        if let Some(expected) = expected_sha256.filter(|e| *e != digest.sha256) {
            return Err(CommitError::Mismatch(format!(
                "{} arrived with sha256 {}, but its sender computed {expected}",
                self.target.display(),
                digest.sha256
            )));
        }
        let io = |what: &str, path: &Path, e: std::io::Error| {
            CommitError::Io(anyhow::Error::new(e).context(format!("cannot {what} {}", path.display())))
        };
        self.tmp.as_file().sync_all().map_err(|e| io("sync", &self.target, e))?;
        self.tmp.persist(&self.target).map_err(|e| io("rename into", &self.target, e.error))?;
        if let Some(dir) = self.target.parent() {
            integrity::sync_dir(dir).map_err(|e| io("sync", dir, e))?;
        }
        Ok(digest)
    }
}

/// Why an artifact was not committed.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// Its bytes are not the ones its sender hashed.
    #[error("{0}")]
    Mismatch(String),
    #[error("{0:#}")]
    Io(anyhow::Error),
}

/// A line of metrics.jsonl for one of rank 0's steps (`"type": "step"`), written every
/// `log_every` steps and at each epoch's last step, as `worker train` writes them.
#[derive(Debug, Clone, Serialize)]
pub struct StepRecord {
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// 1-based, as in the epoch records.
    pub epoch: usize,
    /// 1-based step within the epoch.
    pub step: u64,
    pub steps_in_epoch: usize,
    /// Optimizer steps done in all, this one included.
    pub global_step: u64,
    /// Rank 0's mean loss over its samples since the last record (`log_every` steps), as
    /// `worker train` logs it.
    pub loss: f64,
    /// Rank 0's training accuracy over the same samples.
    pub accuracy: f64,
    /// L2 norm of this step's all-reduced gradient before clipping (the same on every rank).
    pub grad_norm: f64,
    pub lr: f64,
    /// All ranks' tokens since the last record over rank 0's step time.
    pub tokens_per_second: f64,
}

/// One line of metrics.jsonl, written at each epoch's end.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochRecord {
    pub epoch: usize,
    pub steps: u64,
    /// Mean training loss over all ranks' samples of the epoch.
    pub train_loss: f64,
    pub train_samples: u64,
    pub train_tokens: u64,
    pub epoch_seconds: f64,
    pub tokens_per_second: f64,
    /// Share of the ranks' step time spent inside collectives.
    pub comm_share: f64,
    pub val_loss: Option<f64>,
    pub val_accuracy: Option<f64>,
    pub parameter_checksum: String,
}

/// A line of metrics.jsonl for a test evaluation (`"type": "eval"`), as `worker train`
/// writes them.
#[derive(Debug, Clone, Serialize)]
pub struct EvalRecord {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub split: &'static str,
    /// "last" (the last epoch's model) or "best" (the kept model, see [`Summary::kept_model`]).
    pub model: &'static str,
    /// Epochs completed when it was evaluated.
    pub epoch: usize,
    pub accuracy: f64,
    pub loss: f64,
    pub examples: u64,
    pub train_seconds: f64,
}

/// summary.json. The kept model and the last epoch's use the names `worker train` uses.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The kept model's (model.safetensors) test accuracy and loss.
    pub test_accuracy: f64,
    pub test_loss: f64,
    /// Which model is kept in model.safetensors: "best" (the best validation accuracy, the
    /// first epoch of a tie) or "last" (no validation split).
    pub kept_model: String,
    /// The epoch (1-based) of the kept model.
    pub kept_epoch: usize,
    /// The last epoch's model (model-last.safetensors) on the test split.
    pub last_epoch_test_accuracy: f64,
    pub last_epoch_test_loss: f64,
    pub best_val_accuracy: Option<f64>,
    pub best_epoch: Option<usize>,
    pub epochs: usize,
    pub stopped_early: bool,
    pub train_seconds: f64,
    pub tokens_per_second: f64,
    pub comm_share: f64,
    pub world_size: usize,
    pub backend: String,
    /// One parameter checksum per rank after the last epoch, in rank order (hex).
    pub replica_checksums: Vec<String>,
    pub train_samples: usize,
    pub val_samples: usize,
    pub test_samples: usize,
    pub vocab_size: usize,
    /// Times the group was restarted from a checkpoint.
    pub restarts: u32,
    /// Optimizer steps run again because of restarts and resizes (done after the checkpoint
    /// resumed from).
    pub steps_lost: u64,
    /// Changes of the world size (`--workers MIN:MAX`); `world_size` is the last one.
    pub resizes: u32,
    /// The world size from each optimizer step on.
    pub world_sizes: Vec<WorldSpan>,
    /// Checksum of the last epoch's parameters (hex; every rank's equals it).
    pub final_parameter_checksum: String,
    /// The class names, in label order (as in labels.json).
    pub classes: Vec<String>,
    /// The kept model's test accuracy, macro-F1, per-class precision and recall, and
    /// confusion matrix (rows: the true class, columns: the predicted one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_metrics: Option<trainer_core::class_metrics::ClassMetrics>,
}

/// From optimizer step `from_global_step` on, the job ran with `world_size` workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorldSpan {
    pub from_global_step: u64,
    pub world_size: usize,
}

pub fn checksum_hex(checksum: u64) -> String {
    format!("{checksum:016x}")
}

pub struct RunDir {
    dir: PathBuf,
    /// metrics.jsonl lines that a full or failing disk refused: kept, and written before
    /// the next line, so that a storage hiccup loses no record.
    unwritten: std::sync::Mutex<String>,
}

impl RunDir {
    /// Creates the folder and writes the corpus's run files (the vocabulary, a subword run's
    /// `tokenizer.json`, the class names) and the config right away. A fresh run starts a
    /// new metrics file; a resumed one appends to its own.
    pub fn create(
        dir: &Path,
        corpus: &EncodedCorpus,
        config: &JobConfig,
        resumed: bool,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the run folder {}", dir.display()))?;
        trainer_core::pipeline::write_run_files(dir, corpus)?;
        trainer_core::write_atomically(&dir.join(CONFIG_FILE), config.to_toml().as_bytes())?;
        if !resumed {
            trainer_core::write_atomically(&dir.join(METRICS_FILE), b"")?;
        }
        Ok(Self { dir: dir.to_path_buf(), unwritten: std::sync::Mutex::new(String::new()) })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Appends a line to metrics.jsonl. On a storage error (a full disk) the line is kept
    /// for the next call, and the file is cut back to its last whole line.
    pub fn append_metrics(&self, record: &impl Serialize) -> anyhow::Result<()> {
        let mut pending = self.unwritten.lock().unwrap_or_else(|p| p.into_inner());
        pending.push_str(&serde_json::to_string(record)?);
        pending.push('\n');
        self.write_pending(&mut pending).map(|_| ())
    }

    /// Writes the lines waiting in `pending`; false when the disk refused them (kept).
    fn write_pending(&self, pending: &mut String) -> anyhow::Result<bool> {
        let path = self.dir.join(METRICS_FILE);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let whole =
            f.metadata().map(|m| m.len()).with_context(|| format!("cannot stat {}", path.display()))?;
        match f.write_all(pending.as_bytes()) {
            Ok(()) => {
                pending.clear();
                Ok(true)
            }
            Err(e) if integrity::is_storage_error(&e) => {
                let _ = f.set_len(whole);
                tracing::warn!(
                    file = %path.display(),
                    error = %e,
                    lines = pending.lines().count(),
                    "metrics lines kept in memory until the disk takes them"
                );
                Ok(false)
            }
            Err(e) => Err(e).with_context(|| format!("cannot write {}", path.display())),
        }
    }

    /// summary.json, after any metrics lines still waiting for the disk.
    pub fn write_summary(&self, summary: &Summary) -> anyhow::Result<()> {
        let mut pending = self.unwritten.lock().unwrap_or_else(|p| p.into_inner());
        if !pending.is_empty() && !self.write_pending(&mut pending)? {
            return Err(anyhow::anyhow!(trainer_core::exit::Storage(format!(
                "cannot write the last {} lines of {}: the disk is still full",
                pending.lines().count(),
                self.dir.join(METRICS_FILE).display()
            ))));
        }
        let json = serde_json::to_vec_pretty(summary)?;
        trainer_core::write_atomically(&self.dir.join(SUMMARY_FILE), &json)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn artifacts_appear_only_when_committed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("checkpoint-000000001-end.safetensors"), b"old").unwrap();
        let mut w = ArtifactWriter::create(dir.path(), "checkpoint-000000001-end.safetensors").unwrap();
        w.write(b"new bytes").unwrap();
        drop(w); // an interrupted upload
        assert_eq!(std::fs::read(dir.path().join("checkpoint-000000001-end.safetensors")).unwrap(), b"old");
        let mut w = ArtifactWriter::create(dir.path(), "checkpoint-000000001-end.safetensors").unwrap();
        w.write(b"new bytes").unwrap();
        let bad = "0".repeat(64);
        assert!(matches!(w.commit(Some(&bad)), Err(CommitError::Mismatch(_))));
        assert_eq!(std::fs::read(dir.path().join("checkpoint-000000001-end.safetensors")).unwrap(), b"old");
        let mut w = ArtifactWriter::create(dir.path(), "checkpoint-000000001-end.safetensors").unwrap();
        w.write(b"new bytes").unwrap();
        let digest = FileDigest::of_bytes(b"new bytes");
        assert_eq!(w.commit(Some(&digest.sha256)).unwrap(), digest);
        assert_eq!(
            std::fs::read(dir.path().join("checkpoint-000000001-end.safetensors")).unwrap(),
            b"new bytes"
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "temp file left behind");
    }
}
