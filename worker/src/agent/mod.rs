//! The worker side of the coordinator's protocol (`worker join`).
//!
//! The agent registers with the coordinator, downloads this rank's validation and test
//! shards, meets the other ranks at the rendezvous, builds the ring collective, and hands it
//! to a [`Replica`] factory; then it keeps one session stream open (heartbeats up and down)
//! and runs the coordinator's commands: train an epoch on the shard it downloads for that
//! epoch, evaluate, keep a copy of the best model or switch to it, upload a checkpoint or
//! the model (rank 0), stop.
//!
//! | what | module |
//! |---|---|
//! | `worker join`'s flags and their env fallbacks | `args` |
//! | connect and register | `join` |
//! | the session: heartbeats, commands down, reports up | `session`, `liveness` |
//! | rendezvous and the collective | `rendezvous` |
//! | the replica thread: the step loop, mid-epoch checkpoints | `step_loop` |
//! | evaluation | `evaluation` |
//! | shards and the checkpoint down, checkpoints and models up | `artifacts`, `shard` |
//!
//! # The seam
//!
//! The agent knows nothing about models. The training loop lives behind [`Replica`]:
//!
//! ```text
//! worker::agent::run_agent(&join_args, |job: &JobInfo, collective: Box<dyn Collective>| {
//!     // build the Trainer with `collective`, call broadcast_parameters(), wrap it
//!     Ok(Box::new(MyReplica::new(job, collective)?) as Box<dyn Replica>)
//! })
//! ```
//!
//! The factory and every [`Replica`] method run on one dedicated thread (the "replica
//! thread"), so a replica need not be `Send`; the gRPC side runs on a small tokio runtime
//! and keeps heartbeats flowing while a step computes. The factory must leave the replica
//! with rank 0's parameters (broadcast): the coordinator compares the checksums of all
//! ranks right after it returns.
//!
//! # Exit
//!
//! [`run_agent`] returns `Ok` only when the coordinator says the job succeeded. It returns
//! an error when the coordinator stops the job, when the session ends, when the coordinator
//! stays silent for the heartbeat timeout, or when the replica fails (the error is also
//! reported up). It never waits for a replica call that is stuck in a collective: the
//! caller should exit the process on error (the replica thread dies with it).

mod args;
mod artifacts;
mod evaluation;
mod join;
mod liveness;
mod rendezvous;
mod session;
mod shard;
mod step_loop;
#[cfg(test)]
mod tests;
mod trainer_replica;

use std::sync::Arc;

use anyhow::Context;
use trainer_core::{EncodedSplit, JobConfig};

use crate::collective::Collective;
pub use crate::trainer::EvalCounts;

pub use args::JoinArgs;
use join::Agent;
use rendezvous::prepare_devices;
pub use shard::{append_chunk, check_totals};
pub use trainer_replica::TrainerReplica;

/// What the coordinator told this rank at registration.
#[derive(Debug, Clone)]
pub struct JobInfo {
    pub rank: usize,
    pub world_size: usize,
    pub attempt: u32,
    pub config: JobConfig,
    /// Vocabulary size including the specials.
    pub vocab_size: usize,
    /// The vocabulary's fingerprint, written into checkpoints.
    pub vocab_fingerprint: String,
    /// Steps every rank runs per epoch (already capped by `train.max_steps_per_epoch`).
    pub steps_per_epoch: usize,
    /// The checkpoint this attempt resumes from (every rank restores it before the
    /// broadcast), as fetched from the coordinator.
    pub resume: Option<Arc<Vec<u8>>>,
}

/// Where a checkpoint was taken: after `step_in_epoch` steps of epoch `epoch` (0-based), or
/// at the end of epoch `epoch` (`epoch_end`, then `step_in_epoch` is 0).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CheckpointAt {
    pub epoch: u64,
    pub step_in_epoch: u64,
    pub global_step: u64,
    pub epoch_end: bool,
}

/// What a replica's epoch reports to, after every step.
pub trait StepSink {
    /// One step's report; true when the replica must checkpoint now (rank 0 only).
    fn step(&mut self, report: StepReport) -> bool;
    /// A checkpoint taken mid-epoch because [`StepSink::step`] asked for it.
    fn checkpoint(&mut self, at: CheckpointAt, bytes: Vec<u8>);
}

/// One training step on this rank, reported while the epoch runs.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepReport {
    /// 0-based step within the epoch.
    pub step: u64,
    /// Sum of per-sample losses of this rank's batch (mean loss x batch size).
    pub loss_sum: f64,
    pub samples: u64,
    /// Real (unpadded) tokens.
    pub tokens: u64,
    pub step_seconds: f64,
    /// Time spent inside collectives during the step.
    pub comm_seconds: f64,
    /// Optimizer steps taken in all after this one.
    pub global_step: u64,
    /// Correctly classified samples of the batch.
    pub correct: u64,
    /// L2 norm of the all-reduced gradient before clipping (the same on every rank).
    pub grad_norm: f64,
    /// The learning rate the step used.
    pub lr: f64,
}

/// One epoch on this rank.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EpochReport {
    pub steps: u64,
    pub loss_sum: f64,
    pub samples: u64,
    pub tokens: u64,
    pub seconds: f64,
    pub comm_seconds: f64,
}

/// A model replica as the agent drives it. All methods run on the replica thread.
pub trait Replica {
    /// Trains epoch `epoch` (0-based) on `shard`, this rank's samples for the epoch in the
    /// order the shard plan gives, from step `first_step` (a resumed epoch) to
    /// `JobInfo::steps_per_epoch` (every rank the same steps); reports each step to `sink`,
    /// and checkpoints (with [`Replica::checkpoint`]) when the sink asks.
    fn train_epoch(
        &mut self,
        epoch: u64,
        first_step: u64,
        shard: &EncodedSplit,
        sink: &mut dyn StepSink,
    ) -> anyhow::Result<EpochReport>;
    /// Evaluates every review of `split` (this rank's part; it may be empty).
    fn evaluate(&mut self, split: &EncodedSplit) -> anyhow::Result<EvalCounts>;
    /// A checksum of every parameter's bits, equal on all ranks while replicas agree.
    fn parameter_checksum(&self) -> anyhow::Result<u64>;
    /// Number of scalar parameters (for logs).
    fn parameter_count(&self) -> u64;
    /// Keeps a copy of the parameters as the best model (after epoch `epoch`, 0-based), in
    /// place of the one kept before; later checkpoints carry it.
    fn keep_best(&mut self, epoch: u64) -> anyhow::Result<()>;
    /// The epoch of the best model kept (by [`Replica::keep_best`], or restored with the
    /// checkpoint), if any.
    fn best_epoch(&self) -> Option<u64>;
    /// Makes the best model kept (which must be `epoch`'s) the parameters; returns their
    /// checksum.
    fn load_best(&mut self, epoch: u64) -> anyhow::Result<u64>;
    /// The model as `model.safetensors` bytes (rank 0 only).
    fn export_model(&mut self) -> anyhow::Result<Vec<u8>>;
    /// A full checkpoint (`checkpoint.safetensors` bytes) at `at` (rank 0).
    fn checkpoint(&mut self, at: CheckpointAt) -> anyhow::Result<Vec<u8>>;
    /// Optimizer steps taken in all.
    fn global_step(&self) -> u64;
}

/// Joins the job and serves it until the coordinator stops it; see the module docs.
pub fn run_agent<F>(args: &JoinArgs, make_replica: F) -> anyhow::Result<()>
where
    F: FnOnce(&JobInfo, Box<dyn Collective>) -> anyhow::Result<Box<dyn Replica>> + Send + 'static,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("agent-rpc")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = prepare_devices(args).and_then(|nccl| {
        runtime
            .block_on(Agent::join(args))
            .and_then(|agent| runtime.block_on(agent.serve(args, nccl, Box::new(make_replica))))
    });
    // Never wait for blocking work: a replica stuck in a collective must not hold us here.
    runtime.shutdown_background();
    result
}

type Factory = Box<dyn FnOnce(&JobInfo, Box<dyn Collective>) -> anyhow::Result<Box<dyn Replica>> + Send>;

/// The coordinator asked this worker to register again: the group restarts from the last
/// checkpoint. `worker join` then starts over as a fresh process.
#[derive(Debug, thiserror::Error)]
#[error("the coordinator restarts the group; joining again")]
pub struct RestartRequested;
