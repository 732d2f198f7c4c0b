//! Checkpoints and exported models: rank 0 produces them and uploads them to the run folder
//! (the service stores the bytes and their digest); the driver commits a checkpoint by
//! writing `checkpoint.json` with the file's digest and its own state as of that step.
//!
//! A checkpoint the storage refused (a full disk, a read-only or failing filesystem) is not
//! a lost worker: the last good checkpoint stays current, a warning names the file and the
//! free space, training goes on, and the next checkpoint tries again. After
//! `--checkpoint-failures` such failures in a row the job stops with exit 5. A model the
//! storage refused at the end stops the job at once (exit 5); its checkpoint is kept.

use std::time::Instant;

use anyhow::anyhow;
use trainer_core::exit::Storage;
use trainer_core::integrity::{self, FileDigest};

use trainer_proto::v1::{
    coordinator_message, worker_message::Body, ArtifactDone, ArtifactKind, Checkpoint, ExportModel,
};

use super::sessions::{command, lost};
use super::{Driver, Terminated};
use crate::checkpoints::{self, JobCheckpoint};
use crate::telemetry::JobState;

impl Driver {
    /// Rank 0 checkpoints at the end of `epoch`; the checkpoint is committed (with the
    /// coordinator's state after the epoch) when its upload is done.
    pub(super) async fn checkpoint_epoch(&mut self, epoch: u64) -> anyhow::Result<()> {
        self.progress.status(&format!("epoch {}: checkpoint", epoch + 1));
        self.shared.telemetry.set_state(JobState::Checkpointing);
        let checkpoint_started = Instant::now();
        self.artifact(
            ArtifactKind::Checkpoint,
            coordinator_message::Body::Checkpoint(Checkpoint { epoch }),
            epoch,
        )
        .await?;
        self.shared.telemetry.checkpoint_took(checkpoint_started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Rank 0 finished a checkpoint: commit it, or count a storage failure.
    pub(super) fn checkpoint_done(&mut self, done: &ArtifactDone) -> anyhow::Result<()> {
        if !done.storage_error.is_empty() {
            return self.checkpoint_not_stored(done, &done.storage_error);
        }
        match self.commit_checkpoint(done) {
            Err(e) if is_storage(&e) => {
                // The file is there but checkpoint.json could not name it: free its space.
                let _ = std::fs::remove_file(
                    self.run_dir.path().join(checkpoints::file_name(done.global_step, done.epoch_end)),
                );
                self.checkpoint_not_stored(done, &format!("{e:#}"))
            }
            other => other,
        }
    }

    /// Makes the checkpoint rank 0 just uploaded the current one: `checkpoint.json` names it
    /// and its digest, with the coordinator's state as of now and the previous record.
    fn commit_checkpoint(&mut self, done: &ArtifactDone) -> anyhow::Result<()> {
        let file = checkpoints::file_name(done.global_step, done.epoch_end);
        let digest = match self.shared.take_stored(&file) {
            Some(digest) => digest,
            None => FileDigest::of_file(&self.run_dir.path().join(&file))
                .map_err(|e| anyhow!(e).context(format!("cannot read back {file}")))?,
        };
        let previous = self.checkpoint.clone().filter(|c| c.file != file).map(|mut c| {
            c.previous = None;
            c.previous_file = None;
            Box::new(c)
        });
        let pointer = JobCheckpoint {
            format: checkpoints::FORMAT.into(),
            file,
            digest: Some(digest),
            previous_file: previous.as_ref().map(|p| p.file.clone()),
            previous,
            epoch: done.epoch,
            step_in_epoch: done.step_in_epoch,
            epoch_end: done.epoch_end,
            global_step: done.global_step,
            job: self.fault.identity.clone(),
            progress: self.state.clone(),
        };
        checkpoints::commit(self.run_dir.path(), &pointer)?;
        tracing::info!(at = %pointer.describe(), file = %pointer.file, "checkpoint committed");
        let at = pointer.describe();
        self.checkpoint = Some(pointer);
        self.checkpoint_failures = 0;
        if self.terminate_by.is_some() {
            return Err(Terminated { checkpoint: Some(at) }.into());
        }
        // Workers that asked to join come in now, from this checkpoint (--workers MIN:MAX).
        if !self.joiners.is_empty() && self.world < self.fault.max_world && !self.finished {
            let to = (self.world + self.joiners.len()).min(self.fault.max_world);
            let cause = format!("{} worker(s) asked to join; admitted at {at}", self.joiners.len());
            return Err(super::Resize { to, cause, at_start: false }.into());
        }
        Ok(())
    }

    /// A checkpoint the storage refused: warn, keep the last one, and stop (exit 5) after
    /// `--checkpoint-failures` in a row.
    fn checkpoint_not_stored(&mut self, done: &ArtifactDone, error: &str) -> anyhow::Result<()> {
        self.checkpoint_failures += 1;
        let limit = self.fault.checkpoint_failures;
        let kept = self
            .checkpoint
            .as_ref()
            .map_or("no checkpoint yet".to_string(), |c| format!("{} ({})", c.file, c.describe()));
        let mut error =
            error.strip_prefix(trainer_proto::STORAGE_FAILURE_PREFIX).unwrap_or(error).to_string();
        if !error.contains(" free on ") {
            let dir = self.run_dir.path();
            let free = integrity::free_bytes(dir).map_or("unknown".into(), integrity::human_bytes);
            error.push_str(&format!(" ({free} free on {})", dir.display()));
        }
        let step = done.global_step;
        if self.checkpoint_failures >= limit {
            return Err(anyhow!(Storage(format!(
                "{} checkpoints in a row could not be stored (--checkpoint-failures {limit}); the last, \
                 at step {step}: {error}. The last good checkpoint is {kept}: free space on the run \
                 folder's filesystem and resume with --resume",
                self.checkpoint_failures
            ))));
        }
        self.progress.line(&format!(
            "warning: the checkpoint at step {step} was not stored: {error}; keeping {kept} and \
             training on (failure {} of {limit} in a row, --checkpoint-failures)",
            self.checkpoint_failures
        ));
        self.run_dir.append_metrics(&serde_json::json!({
            "type": "checkpoint_failed",
            "global_step": step,
            "error": error,
            "consecutive_failures": self.checkpoint_failures,
        }))?;
        if self.terminate_by.is_some() {
            return Err(Terminated { checkpoint: None }.into());
        }
        Ok(())
    }

    /// Rank 0 uploads its parameters as `kind` (model.safetensors or model-last.safetensors);
    /// a model the storage refused stops the job (exit 5).
    pub(super) async fn export(&mut self, kind: ArtifactKind, epoch: u64) -> anyhow::Result<()> {
        self.shared.telemetry.set_state(JobState::Checkpointing);
        let body = coordinator_message::Body::ExportModel(ExportModel { epoch, kind: kind as i32 });
        let done = self.artifact(kind, body, epoch).await?;
        if !done.storage_error.is_empty() {
            let error = done
                .storage_error
                .strip_prefix(trainer_proto::STORAGE_FAILURE_PREFIX)
                .unwrap_or(&done.storage_error);
            let kept = self.checkpoint.as_ref().map_or("none".to_string(), |c| c.file.clone());
            return Err(anyhow!(Storage(format!(
                "the model could not be stored: {error}. The last checkpoint ({kept}) is kept: free \
                 space and run again with --resume, which exports the model from it"
            ))));
        }
        Ok(())
    }

    /// Rank 0 produces and uploads an artifact (`body` asks for it); its size in bytes.
    async fn artifact(
        &mut self,
        kind: ArtifactKind,
        body: coordinator_message::Body,
        epoch: u64,
    ) -> anyhow::Result<ArtifactDone> {
        if !self.shared.send(0, command(body)).await {
            return Err(lost("worker rank 0 has no open session".into()));
        }
        let mut done = self
            .collect(&[0], kind.as_str_name(), |b| match b {
                Body::ArtifactDone(a) if a.kind == kind as i32 && a.epoch == epoch => Some(a.clone()),
                _ => None,
            })
            .await?;
        done.pop().ok_or_else(|| anyhow!("internal error: no artifact reply"))
    }
}

/// Whether `e` is a storage failure (a full disk, a quota, a read-only or failing filesystem).
fn is_storage(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.is::<Storage>()
            || c.downcast_ref::<std::io::Error>().is_some_and(integrity::is_storage_error)
            || matches!(
                c.downcast_ref::<trainer_core::DataError>(),
                Some(trainer_core::DataError::Io { cause, .. } | trainer_core::DataError::Write { cause, .. })
                    if integrity::is_storage_error(cause)
            )
    })
}
