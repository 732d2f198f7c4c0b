//! [`Replica`] for the tch [`Trainer`]: what `worker join` runs. The batches of an epoch are
//! formed exactly as `worker train` forms them (consecutive runs of the shard, which comes in
//! `ShardPlan::for_epoch` order, then `collate`), so a rank's steps match the single-process run's.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use trainer_core::batch::collate;
use trainer_core::EncodedSplit;

use super::{CheckpointAt, EpochReport, EvalCounts, JobInfo, Replica, StepReport, StepSink};
use crate::checkpoint::{
    checkpoint_from_bytes, export_model, save_checkpoint_keeping, KeptModel, LoopState, Position,
};
use crate::collective::{Collective, CollectiveError};
use crate::device::resolve_device;
use crate::trainer::Trainer;

/// Wraps a collective and adds up the time spent inside it (for the comm share).
struct TimedCollective {
    inner: Box<dyn Collective>,
    nanos: Arc<AtomicU64>,
}

impl TimedCollective {
    fn timed<T>(&mut self, op: impl FnOnce(&mut dyn Collective) -> T) -> T {
        let start = Instant::now();
        let out = op(self.inner.as_mut());
        self.nanos.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        out
    }
}

impl Collective for TimedCollective {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    fn all_reduce_mean(&mut self, buffer: &mut tch::Tensor) -> Result<(), CollectiveError> {
        self.timed(|c| c.all_reduce_mean(buffer))
    }
    fn broadcast(&mut self, buffer: &mut tch::Tensor, root: usize) -> Result<(), CollectiveError> {
        self.timed(|c| c.broadcast(buffer, root))
    }
    fn barrier(&mut self) -> Result<(), CollectiveError> {
        self.timed(|c| c.barrier())
    }
}

/// The tch replica behind the agent.
pub struct TrainerReplica {
    trainer: Trainer,
    job: JobInfo,
    comm_nanos: Arc<AtomicU64>,
    /// The best model by validation so far (the coordinator's KeepBest), in host memory.
    best: Option<KeptModel>,
}

impl TrainerReplica {
    /// Builds the model on the configured device, restores the job's checkpoint when the
    /// attempt resumes from one, and copies rank 0's parameters to every rank (the factory
    /// contract of [`super::run_agent`]).
    pub fn new(job: &JobInfo, collective: Box<dyn Collective>) -> anyhow::Result<Self> {
        let mut replica = Self::build(job, collective)?;
        if let Some(bytes) = &job.resume {
            // Every rank restores the same file (weights, Adam's moments, the step), so the
            // broadcast below changes nothing; the checksums compared before the first step
            // prove it.
            let source = std::path::Path::new("<the job's checkpoint>");
            let checkpoint = checkpoint_from_bytes(bytes, source)?;
            checkpoint.restore_into(&mut replica.trainer, &job.vocab_fingerprint, source)?;
            replica.best = checkpoint.kept_model(&replica.trainer, source)?;
        }
        replica.broadcast_from_rank0()?;
        Ok(replica)
    }

    /// The model with this rank's own initial weights; call [`Self::broadcast_from_rank0`]
    /// before training (every rank at the same time).
    pub fn build(job: &JobInfo, collective: Box<dyn Collective>) -> anyhow::Result<Self> {
        let device = resolve_device(&job.config.train.device)?;
        let comm_nanos = Arc::new(AtomicU64::new(0));
        let timed = TimedCollective { inner: collective, nanos: Arc::clone(&comm_nanos) };
        let mut trainer = Trainer::new(&job.config, job.vocab_size, device, Box::new(timed))?;
        trainer.set_total_steps((job.steps_per_epoch * job.config.train.epochs) as u64);
        Ok(Self { trainer, job: job.clone(), comm_nanos, best: None })
    }

    /// Replaces this rank's parameters with rank 0's (a collective call).
    pub fn broadcast_from_rank0(&mut self) -> anyhow::Result<()> {
        self.trainer.broadcast_parameters().context("cannot broadcast rank 0's parameters")
    }

    fn to_bytes(
        &self,
        name: &str,
        write: impl FnOnce(&std::path::Path) -> crate::Result<()>,
    ) -> anyhow::Result<Vec<u8>> {
        // The writers take a path; a private temporary file turns them into bytes.
        let path =
            std::env::temp_dir().join(format!(".worker-{}-rank{}-{name}", std::process::id(), self.job.rank));
        let result = write(&path)
            .map_err(anyhow::Error::from)
            .and_then(|()| std::fs::read(&path).with_context(|| format!("cannot read {}", path.display())));
        let _ = std::fs::remove_file(&path);
        result
    }
}

impl Replica for TrainerReplica {
    fn train_epoch(
        &mut self,
        epoch: u64,
        first_step: u64,
        shard: &EncodedSplit,
        sink: &mut dyn StepSink,
    ) -> anyhow::Result<EpochReport> {
        let (max_len, truncation) = (self.job.config.data.max_len, self.job.config.data.truncation);
        let global_batch = self.job.config.train.global_batch(self.job.world_size);
        let batch_size = trainer_core::shard::share(global_batch, self.job.world_size, self.job.rank);
        // The shard arrives in plan order (random or length-bucketed global batches, split
        // across ranks), so its batches are consecutive runs of this rank's share.
        let order: Vec<u32> = (0..shard.len() as u32).collect();
        let mut batches: Vec<Vec<u32>> = order.chunks(batch_size).map(<[u32]>::to_vec).collect();
        batches.truncate(self.job.steps_per_epoch);
        if batches.len() != self.job.steps_per_epoch {
            anyhow::bail!(
                "the shard of epoch {} gives {} batches, the job needs {} on every rank",
                epoch + 1,
                batches.len(),
                self.job.steps_per_epoch
            );
        }
        let mut total = EpochReport::default();
        let epoch_start = Instant::now();
        // A resumed epoch skips the steps its checkpoint already holds: the same batches as
        // an uninterrupted run, from the same step on.
        for (step, samples) in batches.iter().enumerate().skip(first_step as usize) {
            let start = Instant::now();
            let comm_before = self.comm_nanos.load(Ordering::Relaxed);
            let batch = collate(shard, samples, max_len, truncation);
            let stats = self.trainer.train_step(&batch)?;
            let r = StepReport {
                step: step as u64,
                loss_sum: stats.loss * stats.examples as f64,
                samples: stats.examples as u64,
                tokens: stats.tokens as u64,
                step_seconds: start.elapsed().as_secs_f64(),
                comm_seconds: (self.comm_nanos.load(Ordering::Relaxed) - comm_before) as f64 * 1e-9,
                global_step: self.trainer.global_step(),
                correct: stats.correct as u64,
                grad_norm: stats.grad_norm,
                lr: stats.lr,
            };
            if sink.step(r) {
                let at = CheckpointAt {
                    epoch,
                    step_in_epoch: step as u64 + 1,
                    global_step: r.global_step,
                    epoch_end: false,
                };
                let bytes = self.checkpoint(at)?;
                sink.checkpoint(at, bytes);
            }
            total.steps += 1;
            total.loss_sum += r.loss_sum;
            total.samples += r.samples;
            total.tokens += r.tokens;
            total.comm_seconds += r.comm_seconds;
        }
        total.seconds = epoch_start.elapsed().as_secs_f64();
        Ok(total)
    }

    fn evaluate(&mut self, split: &EncodedSplit) -> anyhow::Result<EvalCounts> {
        let all: Vec<u32> = (0..split.len() as u32).collect();
        Ok(self.trainer.evaluate(split, &all)?)
    }

    fn parameter_checksum(&self) -> anyhow::Result<u64> {
        Ok(self.trainer.parameter_checksum()?)
    }

    fn parameter_count(&self) -> u64 {
        self.trainer.model().shape().num_parameters() as u64
    }

    fn keep_best(&mut self, epoch: u64) -> anyhow::Result<()> {
        // The old copy goes first: never two copies of the parameters at once.
        self.best = None;
        self.best = Some(KeptModel::of(self.trainer.model(), epoch)?);
        Ok(())
    }

    fn best_epoch(&self) -> Option<u64> {
        self.best.as_ref().map(|b| b.epoch)
    }

    fn load_best(&mut self, epoch: u64) -> anyhow::Result<u64> {
        match &self.best {
            Some(best) if best.epoch == epoch => best.load_into(self.trainer.model_mut())?,
            Some(best) => anyhow::bail!(
                "the coordinator asked for the best model of epoch {}, but this replica keeps epoch {}'s",
                epoch + 1,
                best.epoch + 1
            ),
            None => anyhow::bail!(
                "the coordinator asked for the best model of epoch {}, but this replica keeps none",
                epoch + 1
            ),
        }
        Ok(self.trainer.parameter_checksum()?)
    }

    fn export_model(&mut self) -> anyhow::Result<Vec<u8>> {
        let (model, config) = (self.trainer.model(), self.trainer.config());
        self.to_bytes("model.safetensors", |p| export_model(model, config, p))
    }

    fn global_step(&self) -> u64 {
        self.trainer.global_step()
    }

    fn checkpoint(&mut self, at: CheckpointAt) -> anyhow::Result<Vec<u8>> {
        let position = if at.epoch_end {
            Position {
                epoch: at.epoch as usize + 1,
                step_in_epoch: 0,
                global_step: self.trainer.global_step(),
            }
        } else {
            Position {
                epoch: at.epoch as usize,
                step_in_epoch: at.step_in_epoch as usize,
                global_step: self.trainer.global_step(),
            }
        };
        // The coordinator keeps the loop state (best accuracy, early stopping); the best
        // model's weights travel with the checkpoint, so that a resumed attempt can still
        // export it.
        let (trainer, best) = (&self.trainer, self.best.as_ref());
        self.to_bytes("checkpoint.safetensors", |p| {
            save_checkpoint_keeping(
                trainer,
                p,
                position,
                &LoopState::default(),
                &self.job.vocab_fingerprint,
                best,
            )
        })
    }
}
