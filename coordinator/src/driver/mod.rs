//! The job driver: waits for the workers, drives the epochs through their session streams,
//! checks the replicas, aggregates metrics, commits checkpoints and writes the run folder.
//!
//! [`Driver::run_attempt`] is the job, phase by phase, top to bottom; each phase's details
//! live in a module named for it:
//!
//! | phase | module |
//! |---|---|
//! | registration, replicas ready, identical | `rendezvous` |
//! | an epoch of steps, its record, early stopping | `epoch` |
//! | validation, test, the kept best model | `evaluation` |
//! | checkpoints and exported models | `checkpoint` |
//! | test, export and summary at the end | `finish` |
//! | a lost worker: the group restarts | `restart` |
//! | events in, commands out, failure detection | `sessions` |
//!
//! A lost worker (it exits, disconnects, misses heartbeats or reports a failure) ends the
//! current *attempt* with an error marked [`Lost`]; [`Driver::run`] then restarts the whole
//! group from the last committed checkpoint, up to `--max-restarts` times: the other workers
//! are stopped, ranks are given anew, every rank restores the checkpoint, and training goes
//! on at the step the checkpoint was taken. A restart is a transition of the driver's state
//! (attempt, resume point, coordinator progress from the checkpoint), not a second code path.
//! Everything else (a checksum mismatch, Ctrl-C, SIGTERM, a protocol error) ends the job.
//!
//! Which model is kept, the same rule as `worker train`'s: the best by validation accuracy
//! (the first epoch of a tie). When an epoch improves on the best, every rank keeps a copy
//! of its parameters (KeepBest; the replicas are identical), and rank 0's checkpoints carry
//! that copy, so a restarted attempt still has it. At the end the last epoch's model is
//! tested and exported as model-last.safetensors; then every rank switches to the kept copy
//! (LoadBest, checked against that epoch's checksum), which is tested and exported as
//! model.safetensors. Without a validation split the last epoch's model is the kept one.

mod checkpoint;
mod epoch;
mod evaluation;
mod finish;
mod rendezvous;
mod restart;
mod sessions;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use tokio::sync::mpsc;
use trainer_core::exit::Lost;
use trainer_proto::v1::worker_message::Body;

use crate::checkpoints::{JobCheckpoint, JobProgress};
use crate::progress::Progress;
use crate::run_dir::{checksum_hex, RunDir, Summary, WorldSpan};
use crate::service::{Event, Shared};
use crate::views::RunViews;

pub use finish::render_summary;
pub use restart::{BelowMinimum, FaultTolerance, Interrupted, LocalPool, Resize, Terminated};

pub struct Driver {
    pub shared: Arc<Shared>,
    pub events: mpsc::UnboundedReceiver<Event>,
    pub progress: Progress,
    pub run_dir: RunDir,
    pub register_timeout: Duration,
    pub external_workers: bool,
    /// Local worker processes (None with --external-workers).
    pub local: Option<LocalPool>,
    fault: FaultTolerance,
    /// The last committed checkpoint (this run's, or the one it resumed from).
    checkpoint: Option<JobCheckpoint>,
    /// The coordinator's progress: epoch records, early stopping, totals.
    pub state: JobProgress,
    attempt: u32,
    /// The ranks of the current attempt (`--workers N`, or within MIN:MAX).
    world: usize,
    /// Workers (pids) that asked to join while every rank was taken (`--workers MIN:MAX`):
    /// the group grows at the next checkpoint.
    joiners: HashSet<u32>,
    rank_of_pid: HashMap<u32, usize>,
    registered: usize,
    last_seen: Vec<Option<Instant>>,
    pending: VecDeque<(usize, Body)>,
    /// Set once the job is over: exits and disconnects are expected from then on.
    finished: bool,
    /// True between the replicas being ready and the last epoch's checkpoint: a SIGTERM then
    /// asks for a checkpoint (a mid-epoch one, or the epoch-end one that is coming).
    training: bool,
    /// The furthest optimizer step rank 0 reported in this attempt.
    reached_step: u64,
    /// SIGTERM was received: stop at the next checkpoint, or at this deadline.
    terminate_by: Option<Instant>,
    pub backend: String,
    /// TensorBoard events and curves.png in the run folder.
    views: RunViews,
    /// The epoch (1-based) of the best model whose copy every replica of this attempt holds
    /// (KeepBest, or restored with the checkpoint).
    best_held: Option<usize>,
    /// Checkpoints in a row that the storage refused (reset by a committed one).
    checkpoint_failures: u32,
}

/// What a successful run produced.
pub struct Outcome {
    pub summary: Summary,
}

impl Driver {
    pub fn new(
        shared: Arc<Shared>,
        events: mpsc::UnboundedReceiver<Event>,
        progress: Progress,
        run_dir: RunDir,
        register_timeout: Duration,
        local: Option<LocalPool>,
        fault: FaultTolerance,
    ) -> Self {
        let world = shared.world();
        let checkpoint = fault.resume.clone();
        let mut state: JobProgress = checkpoint.as_ref().map(|c| c.progress.clone()).unwrap_or_default();
        let from_global_step = checkpoint.as_ref().map_or(0, |c| c.global_step);
        if state.world_sizes.last().map(|s| s.world_size) != Some(world) {
            state.world_sizes.push(WorldSpan { from_global_step, world_size: world });
        }
        let views = RunViews::new(
            run_dir.path(),
            &shared.data.config.to_toml(),
            shared.data.config.train.log_every,
            shared.data.steps_per_epoch,
            world,
        );
        shared.telemetry.begin_attempt(0, state.restarts, state.resizes, world);
        Self {
            views,
            shared,
            events,
            progress,
            run_dir,
            register_timeout,
            external_workers: local.is_none(),
            local,
            fault,
            checkpoint,
            state,
            attempt: 0,
            world,
            joiners: HashSet::new(),
            rank_of_pid: HashMap::new(),
            registered: 0,
            last_seen: vec![None; world],
            pending: VecDeque::new(),
            finished: false,
            training: false,
            reached_step: 0,
            terminate_by: None,
            backend: String::new(),
            best_held: None,
            checkpoint_failures: 0,
        }
    }

    fn world(&self) -> usize {
        self.world
    }

    /// Runs the job to its end, restarting the group from the last checkpoint when a worker
    /// is lost, up to `--max-restarts` times; with `--workers MIN:MAX`, going on with fewer
    /// workers or more (a resize, up to `--max-resizes` times).
    pub async fn run(&mut self) -> anyhow::Result<Outcome> {
        loop {
            let error = match self.run_attempt().await {
                Ok(outcome) => return Ok(outcome),
                Err(e) => e,
            };
            if self.terminate_by.is_some() {
                return Err(error);
            }
            if let Some(resize) = error.downcast_ref::<Resize>().cloned() {
                self.resize(resize).await?;
                continue;
            }
            // Below MIN the job ends (exit 75) instead of waiting again for the same workers.
            let retryable = error.chain().any(|c| c.is::<Lost>()) && !error.is::<BelowMinimum>();
            if !retryable {
                return Err(error);
            }
            // Local workers of an elastic job are not replaced: the group goes on without the
            // lost one while at least MIN are left.
            if self.fault.is_elastic() && self.local.is_some() {
                let to = self.world - 1;
                if to < self.fault.min_world {
                    return Err(self.fault.below_minimum(to, error));
                }
                self.resize(Resize { to, cause: format!("{error:#}"), at_start: false }).await?;
                continue;
            }
            if self.state.restarts >= self.fault.max_restarts {
                return Err(error.context(format!(
                    "the job failed after {} restart(s) (--max-restarts {})",
                    self.state.restarts, self.fault.max_restarts
                )));
            }
            self.restart(&error).await?;
        }
    }

    /// One attempt of the job, from the rendezvous to the summary (or to the first error).
    async fn run_attempt(&mut self) -> anyhow::Result<Outcome> {
        // 1. Every rank registers and builds its replica (from the checkpoint, if any).
        self.wait_for_workers().await?;
        let (start_epoch, start_step) = self.checkpoint.as_ref().map_or((0, 0), JobCheckpoint::resume_point);
        self.reached_step = self.checkpoint.as_ref().map_or(0, |c| c.global_step);
        self.training = true;
        for epoch in start_epoch..self.shared.data.config.train.epochs as u64 {
            if self.state.stopped_early {
                break;
            }
            let first_step = if epoch == start_epoch { start_step } else { 0 };
            // 2. Train: every rank runs the epoch on its shard; the replicas stay identical.
            let trained = self.train_epoch(epoch, first_step).await?;
            // 3. Validation, summed over ranks.
            let val = self.validate(epoch).await?;
            // 4. The coordinator's state after the epoch, which the checkpoint carries.
            let improved = self.record_epoch(epoch, &trained, val)?;
            // 5. Every rank keeps a copy of the best model so far; rank 0's checkpoint carries it.
            if improved {
                self.keep_best(epoch).await?;
            }
            // 6. Rank 0 checkpoints; the driver commits it with the state above.
            self.checkpoint_epoch(epoch).await?;
        }
        self.training = false;
        // 7. Test and export the last epoch's model and the kept one; stop the workers.
        self.finish().await
    }
}

/// All checksums equal, or an error naming the ranks that differ from rank 0.
pub fn check_checksums(checksums: &[u64], when: &str) -> anyhow::Result<()> {
    let Some(&first) = checksums.first() else {
        return Ok(());
    };
    let differing: Vec<String> = checksums
        .iter()
        .enumerate()
        .filter(|(_, &c)| c != first)
        .map(|(r, &c)| format!("rank {r} ({})", checksum_hex(c)))
        .collect();
    if differing.is_empty() {
        Ok(())
    } else {
        bail!(
            "replicas diverged {when}: {} differ from rank 0 ({})",
            differing.join(", "),
            checksum_hex(first)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_mismatch_names_the_ranks() {
        assert!(check_checksums(&[7, 7, 7], "x").is_ok());
        let e = check_checksums(&[7, 7, 8, 9], "after epoch 2").unwrap_err().to_string();
        assert!(e.contains("rank 2") && e.contains("rank 3") && !e.contains("rank 1"), "{e}");
        assert!(e.contains("after epoch 2"), "{e}");
    }
}
