//! Checkpoints and exported models: rank 0 produces them and uploads them to the run folder
//! (the service stores the bytes); the driver commits a checkpoint by writing
//! `checkpoint.json` with its own state as of that step.

use std::time::Instant;

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

    /// Makes the checkpoint rank 0 just uploaded the current one: `checkpoint.json` names it,
    /// with the coordinator's state as of now.
    pub(super) fn commit_checkpoint(&mut self, done: &ArtifactDone) -> anyhow::Result<()> {
        let file = checkpoints::file_name(done.global_step, done.epoch_end);
        let previous_file = self.checkpoint.as_ref().map(|c| c.file.clone()).filter(|f| *f != file);
        let progress = self.state.clone();
        let pointer = JobCheckpoint {
            format: checkpoints::FORMAT.into(),
            file,
            previous_file,
            epoch: done.epoch,
            step_in_epoch: done.step_in_epoch,
            epoch_end: done.epoch_end,
            global_step: done.global_step,
            job: self.fault.identity.clone(),
            progress,
        };
        checkpoints::commit(self.run_dir.path(), &pointer)?;
        tracing::info!(at = %pointer.describe(), file = %pointer.file, "checkpoint committed");
        let at = pointer.describe();
        self.checkpoint = Some(pointer);
        if self.terminate_by.is_some() {
            return Err(Terminated { checkpoint: Some(at) }.into());
        }
        Ok(())
    }

    /// Rank 0 uploads its parameters as `kind` (model.safetensors or model-last.safetensors).
    pub(super) async fn export(&mut self, kind: ArtifactKind, epoch: u64) -> anyhow::Result<u64> {
        self.shared.telemetry.set_state(JobState::Checkpointing);
        let body = coordinator_message::Body::ExportModel(ExportModel { epoch, kind: kind as i32 });
        self.artifact(kind, body, epoch).await
    }

    /// Rank 0 produces and uploads an artifact (`body` asks for it); its size in bytes.
    async fn artifact(
        &mut self,
        kind: ArtifactKind,
        body: coordinator_message::Body,
        epoch: u64,
    ) -> anyhow::Result<u64> {
        if !self.shared.send(0, command(body)).await {
            return Err(lost("worker rank 0 has no open session".into()));
        }
        let done = self
            .collect(&[0], kind.as_str_name(), |b| match b {
                Body::ArtifactDone(a) if a.kind == kind as i32 && a.epoch == epoch => Some(a.bytes),
                _ => None,
            })
            .await?;
        Ok(done[0])
    }
}
