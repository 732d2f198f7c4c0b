//! The replica thread: the one thread that owns the model. It builds the collective and the
//! replica, reports ready, then runs the coordinator's work items in order (an epoch of
//! steps, an evaluation, a checkpoint or model, keeping or loading the best model) and
//! sends what each produced back to the session. Rank 0 checkpoints mid-epoch at the job's
//! cadence or when asked (SIGTERM on the coordinator).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::mpsc;
use trainer_core::EncodedSplit;
use trainer_proto::v1::{ArtifactKind, BestLoaded, EpochDone, EvalResult, Ready, Split, StepMetrics};

use super::evaluation::evaluate;
use super::rendezvous::{connect_collective, CollectivePlan};
use super::{CheckpointAt, Factory, JobInfo, Replica, StepReport, StepSink};
use crate::collective::Collective;

/// Work for the replica thread, one item at a time, in the coordinator's order.
pub(super) enum Work {
    Train { epoch: u64, first_step: u64, shard: EncodedSplit },
    Evaluate { split: Split, epoch: u64 },
    Artifact { kind: ArtifactKind, at: CheckpointAt },
    KeepBest { epoch: u64 },
    LoadBest { epoch: u64 },
}

/// What the replica thread reports to the session.
pub(super) enum ReplicaEvent {
    Ready(Ready),
    Step(StepMetrics),
    EpochDone(EpochDone),
    Eval(EvalResult),
    BestLoaded(BestLoaded),
    Artifact {
        kind: ArtifactKind,
        at: CheckpointAt,
        bytes: Vec<u8>,
    },
    /// The replica failed; `peer_lost` when a collective lost or timed out on a peer.
    Failed {
        message: String,
        peer_lost: bool,
    },
}

/// What the replica thread works with besides the collective.
pub(super) struct ReplicaContext {
    pub(super) job: JobInfo,
    pub(super) val: EncodedSplit,
    pub(super) test: EncodedSplit,
    /// Set by a CheckpointNow command; rank 0 checkpoints at its next step boundary.
    pub(super) checkpoint_now: Arc<AtomicBool>,
}

/// Rank 0's checkpoint cadence within an epoch, and the relay of step reports.
struct EpochSink<'a> {
    epoch: u64,
    rank: usize,
    steps_per_epoch: u64,
    every_steps: u64,
    every: Option<Duration>,
    last_checkpoint: &'a mut Instant,
    checkpoint_now: &'a AtomicBool,
    events: &'a mpsc::UnboundedSender<ReplicaEvent>,
}

impl StepSink for EpochSink<'_> {
    fn step(&mut self, s: StepReport) -> bool {
        let _ = self.events.send(ReplicaEvent::Step(StepMetrics {
            epoch: self.epoch,
            step: s.step,
            loss_sum: s.loss_sum,
            samples: s.samples,
            tokens: s.tokens,
            step_seconds: s.step_seconds,
            comm_seconds: s.comm_seconds,
            grad_norm: s.grad_norm,
            lr: s.lr,
            correct: s.correct,
        }));
        if self.rank != 0 {
            return false;
        }
        // A request (SIGTERM) is served at once; the cadence leaves the epoch's last step to
        // the epoch-end checkpoint that follows it.
        if self.checkpoint_now.swap(false, Ordering::AcqRel) {
            return true;
        }
        let last_of_epoch = s.step + 1 >= self.steps_per_epoch;
        let by_steps = self.every_steps > 0 && s.global_step.is_multiple_of(self.every_steps);
        let by_time = self.every.is_some_and(|every| self.last_checkpoint.elapsed() >= every);
        !last_of_epoch && (by_steps || by_time)
    }

    fn checkpoint(&mut self, at: CheckpointAt, bytes: Vec<u8>) {
        *self.last_checkpoint = Instant::now();
        let _ = self.events.send(ReplicaEvent::Artifact { kind: ArtifactKind::Checkpoint, at, bytes });
    }
}

/// Whether a failure came from losing a peer (a collective that broke or timed out).
fn is_peer_lost(e: &anyhow::Error) -> bool {
    use crate::collective::CollectiveError;
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<CollectiveError>().or_else(|| match c.downcast_ref::<crate::WorkerError>() {
                Some(crate::WorkerError::Collective(inner)) => Some(inner),
                _ => None,
            }),
            Some(
                CollectiveError::Timeout { .. }
                    | CollectiveError::Peer { .. }
                    | CollectiveError::Handshake { .. }
                    | CollectiveError::Poisoned { .. }
            )
        )
    })
}

pub(super) fn replica_thread(
    context: ReplicaContext,
    plan: CollectivePlan,
    factory: Factory,
    work: std::sync::mpsc::Receiver<Work>,
    events: mpsc::UnboundedSender<ReplicaEvent>,
) {
    let ReplicaContext { job, val, test, checkpoint_now } = context;
    let fail = |e: anyhow::Error| {
        let peer_lost = is_peer_lost(&e);
        let _ = events.send(ReplicaEvent::Failed { message: format!("{e:#}"), peer_lost });
    };
    let collective = match connect_collective(&job, plan) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let backend = collective.backend().to_string();
    let mut replica = match make_replica(factory, &job, collective) {
        Ok(r) => r,
        Err(e) => return fail(e.context("cannot build the replica")),
    };
    match replica.parameter_checksum() {
        Ok(checksum) => {
            let _ = events.send(ReplicaEvent::Ready(Ready {
                backend,
                parameter_checksum: checksum,
                parameter_count: replica.parameter_count(),
                best_epoch: replica.best_epoch(),
            }));
        }
        Err(e) => return fail(e),
    }
    let cadence = &job.config.checkpoint;
    let mut last_checkpoint = Instant::now();
    while let Ok(item) = work.recv() {
        let outcome = match item {
            Work::Train { epoch, first_step, shard } => {
                let mut sink = EpochSink {
                    epoch,
                    rank: job.rank,
                    steps_per_epoch: job.steps_per_epoch as u64,
                    every_steps: cadence.every_steps,
                    every: (cadence.every_seconds > 0.0)
                        .then(|| Duration::from_secs_f64(cadence.every_seconds)),
                    last_checkpoint: &mut last_checkpoint,
                    checkpoint_now: &checkpoint_now,
                    events: &events,
                };
                replica
                    .train_epoch(epoch, first_step, &shard, &mut sink)
                    .and_then(|r| {
                        let checksum = replica.parameter_checksum()?;
                        Ok(ReplicaEvent::EpochDone(EpochDone {
                            epoch,
                            steps: r.steps,
                            loss_sum: r.loss_sum,
                            samples: r.samples,
                            tokens: r.tokens,
                            seconds: r.seconds,
                            comm_seconds: r.comm_seconds,
                            parameter_checksum: checksum,
                        }))
                    })
                    .with_context(|| format!("epoch {} failed", epoch + 1))
            }
            Work::Evaluate { split, epoch } => {
                let data = if split == Split::Test { &test } else { &val };
                evaluate(replica.as_mut(), split, epoch, data).map(ReplicaEvent::Eval)
            }
            Work::Artifact { kind, mut at } => {
                at.global_step = replica.global_step();
                let bytes = if kind == ArtifactKind::Model || kind == ArtifactKind::LastModel {
                    replica.export_model()
                } else {
                    last_checkpoint = Instant::now();
                    replica.checkpoint(at)
                };
                bytes
                    .map(|bytes| ReplicaEvent::Artifact { kind, at, bytes })
                    .with_context(|| format!("cannot produce the {}", kind.as_str_name()))
            }
            Work::KeepBest { epoch } => {
                // Nothing to answer: the commands that follow (rank 0's checkpoint, the next
                // epoch) run after it on this thread.
                match replica.keep_best(epoch) {
                    Ok(()) => continue,
                    Err(e) => Err(e.context(format!("cannot keep the model of epoch {}", epoch + 1))),
                }
            }
            Work::LoadBest { epoch } => replica
                .load_best(epoch)
                .map(|checksum| ReplicaEvent::BestLoaded(BestLoaded { epoch, parameter_checksum: checksum }))
                .with_context(|| format!("cannot switch to the best model of epoch {}", epoch + 1)),
        };
        match outcome {
            Ok(event) => {
                if events.send(event).is_err() {
                    return;
                }
            }
            Err(e) => return fail(e),
        }
    }
}

fn make_replica(
    factory: Factory,
    job: &JobInfo,
    collective: Box<dyn Collective>,
) -> anyhow::Result<Box<dyn Replica>> {
    factory(job, collective)
}
