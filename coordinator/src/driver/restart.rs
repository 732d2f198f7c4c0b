//! How an attempt ends and the next one starts. A lost worker ends the attempt with an error
//! marked [`trainer_core::exit::Lost`]; [`Driver::run`](super::Driver::run) then calls
//! [`Driver::restart`]: the group stops, ranks are given anew, every rank restores the last
//! committed checkpoint, and training goes on at its step. With `--workers MIN:MAX` the
//! next group may be smaller or larger ([`Resize`], [`Driver::resize`]): the same regroup
//! from the last checkpoint, at another world size, counted apart from restarts. Ctrl-C
//! ([`Interrupted`]) and SIGTERM ([`Terminated`]) end the job instead.
//!
//! Why from the last checkpoint and not from the last step that the survivors hold: the
//! survivors' replicas are identical only up to the step whose all-reduce every rank
//! finished, and the coordinator cannot tell which step a rank that died mid-collective
//! reached; the checkpoint is the one state that is known to be whole and verified. A
//! resize that grows the group happens right after a checkpoint is committed, so it loses
//! at most the steps the ranks ran while it was being stored.

use std::time::Duration;

use tokio::sync::mpsc;

use super::Driver;
use crate::checkpoints::{self, JobCheckpoint, JobIdentity};
use crate::launcher::{LocalWorkers, WorkerLaunch};
use crate::progress::Output;
use crate::service::Event;
use crate::telemetry::JobState;

/// The coordinator was interrupted (Ctrl-C or SIGTERM); main exits with 130.
#[derive(Debug)]
pub struct Interrupted(pub &'static str);

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "interrupted by {}; the workers were stopped and the last checkpoint is kept", self.0)
    }
}

impl std::error::Error for Interrupted {}

/// SIGTERM (Kubernetes before an eviction): the coordinator checkpointed at the next step
/// boundary when it could, stopped the workers, and exits 75 so that a supervisor starts it
/// again with `--resume=auto`.
#[derive(Debug)]
pub struct Terminated {
    pub checkpoint: Option<String>,
}

impl std::fmt::Display for Terminated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.checkpoint {
            Some(at) => write!(f, "terminated by SIGTERM; checkpointed at {at}; resume with --resume"),
            None => write!(f, "terminated by SIGTERM before a new checkpoint; the last one is kept"),
        }
    }
}

impl std::error::Error for Terminated {}

/// The group goes on at another world size (`--workers MIN:MAX`): fewer workers after a loss
/// that no replacement made good, more when workers asked to join.
#[derive(Debug, Clone)]
pub struct Resize {
    pub to: usize,
    pub cause: String,
    /// The job's first rendezvous ended with fewer than MAX (`--rendezvous-wait`): the job
    /// starts at that size. Nothing trained yet, so this is no resize: neither counted nor
    /// charged to `--max-resizes`, and the history starts at the size it trains at.
    pub at_start: bool,
}

impl std::fmt::Display for Resize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the group goes on with {} workers: {}", self.to, self.cause)
    }
}

impl std::error::Error for Resize {}

/// What a regroup is: a restart at the same size, a resize, or the start at the size the
/// first rendezvous reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Regroup {
    Restart,
    Resize,
    Start,
}

/// Local worker processes and how to start them again.
pub struct LocalPool {
    pub launch: WorkerLaunch,
    pub workers: LocalWorkers,
    pub events: mpsc::UnboundedSender<Event>,
    pub output: Output,
}

/// How the driver restarts and checkpoints.
pub struct FaultTolerance {
    pub max_restarts: u32,
    /// How long a restarted group has to register (external workers are replaced by their
    /// supervisor in that time).
    pub rejoin_timeout: Duration,
    pub term_grace: Duration,
    pub identity: JobIdentity,
    /// The checkpoint this run resumes from (`--resume`), already verified.
    pub resume: Option<JobCheckpoint>,
    /// Checkpoints in a row the storage may refuse before the job stops (exit 5).
    pub checkpoint_failures: u32,
    /// `--workers MIN:MAX` (equal for a fixed world size).
    pub min_world: usize,
    pub max_world: usize,
    /// Resizes the job may make before a loss stops it.
    pub max_resizes: u32,
    /// External workers of an elastic job: once MIN have registered, how long to wait for
    /// more (up to MAX) before the group starts with those there are.
    pub rendezvous_wait: Duration,
}

impl FaultTolerance {
    pub fn is_elastic(&self) -> bool {
        self.min_world < self.max_world
    }

    /// The job cannot go on: `left` workers are fewer than MIN (exit 75, a supervisor may
    /// bring more). Not retried by the driver, whatever the restart budget.
    pub fn below_minimum(&self, left: usize, cause: anyhow::Error) -> anyhow::Error {
        BelowMinimum::error(left, self.min_world, self.max_world, &cause)
    }
}

/// Fewer workers than `--workers MIN:MAX`'s MIN are left. Its source is a [`Lost`] (exit
/// 75): a plain context would hide the type from the exit code, which reads the chain
/// (a rendezvous that ended below MIN exited 1).
///
/// [`Lost`]: trainer_core::exit::Lost
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct BelowMinimum {
    message: String,
    #[source]
    cause: trainer_core::exit::Lost,
}

impl BelowMinimum {
    fn error(left: usize, min: usize, max: usize, cause: &anyhow::Error) -> anyhow::Error {
        anyhow::Error::new(Self {
            message: format!("{left} worker(s) left, fewer than the {min} that --workers {min}:{max} needs"),
            cause: trainer_core::exit::Lost(format!("{cause:#}")),
        })
    }
}

impl Driver {
    /// Stops the group and starts the next attempt from the last checkpoint, at the same
    /// world size.
    pub(super) async fn restart(&mut self, cause: &anyhow::Error) -> anyhow::Result<()> {
        self.regroup(format!("{cause:#}"), self.world, Regroup::Restart).await
    }

    /// Stops the group and starts the next attempt from the last checkpoint with `to`
    /// workers; a resize of its own budget (`--max-resizes`), not a restart.
    pub async fn resize(&mut self, resize: Resize) -> anyhow::Result<()> {
        if resize.at_start {
            return self.regroup(resize.cause, resize.to, Regroup::Start).await;
        }
        if self.state.resizes >= self.fault.max_resizes {
            return Err(anyhow::anyhow!(trainer_core::exit::Lost(format!(
                "{resize}; but the job made {} resize(s) already (--max-resizes {})",
                self.state.resizes, self.fault.max_resizes
            ))));
        }
        self.regroup(resize.cause, resize.to, Regroup::Resize).await
    }

    async fn regroup(&mut self, cause: String, to: usize, kind: Regroup) -> anyhow::Result<()> {
        // Nothing is restored unchecked: a damaged checkpoint is set aside and the previous
        // one takes its place; none intact stops the job (exit 6).
        if let Some(current) = &self.checkpoint {
            self.checkpoint = Some(checkpoints::verified(self.run_dir.path(), current)?);
        }
        let resumed = self.checkpoint.clone();
        let resumed_step = resumed.as_ref().map_or(0, |c| c.global_step);
        let steps_lost = self.reached_step.saturating_sub(resumed_step);
        let restarts = self.state.restarts + u32::from(kind == Regroup::Restart);
        let resizes = self.state.resizes + u32::from(kind == Regroup::Resize);
        let from_world = self.world;
        let from =
            resumed.as_ref().map_or("the start (no checkpoint yet)".to_string(), JobCheckpoint::describe);
        // Said the moment it is decided, not after the old group has stopped.
        match kind {
            Regroup::Start => self
                .progress
                .line(&format!("starting with {to} of up to {} workers: {cause}", self.fault.max_world)),
            Regroup::Resize => self.progress.line(&format!(
                "resize {resizes}/{}: {from_world} -> {to} workers: {cause}; resuming from {from}, \
                 {steps_lost} steps lost",
                self.fault.max_resizes
            )),
            Regroup::Restart => self.progress.line(&format!(
                "restart {restarts}/{}: {cause}; resuming from {from}, {steps_lost} steps lost",
                self.fault.max_restarts
            )),
        }
        // A start is no restart or resize: nothing was trained, nothing lost.
        if kind != Regroup::Start {
            self.run_dir.append_metrics(&serde_json::json!({
                "type": if kind == Regroup::Resize { "resize" } else { "restart" },
                "attempt": self.attempt + 1,
                "cause": cause,
                "world_size_before": from_world,
                "world_size_after": to,
                "resumed_from_global_step": resumed_step,
                "resumed_from": from,
                "steps_lost": steps_lost,
            }))?;
        }
        // 1. Stop this attempt's workers: external ones register again by themselves.
        self.stop_workers(&format!("restarting the group: {cause}"), self.external_workers);
        if let Some(pool) = self.local.as_mut() {
            pool.workers.shutdown(Duration::from_secs(2)).await;
        }
        // 2. The next attempt: fresh ranks, the coordinator's state as of the checkpoint.
        let total_lost = self.state.steps_lost + steps_lost;
        let mut world_sizes = std::mem::take(&mut self.state.world_sizes);
        if to != from_world {
            // A group that never made a step (it re-formed at once) leaves no entry.
            if world_sizes.last().is_some_and(|s| s.from_global_step >= resumed_step) {
                world_sizes.pop();
            }
            // Nor does one that came and went between two groups of the same size (3 -> 4,
            // lost before its first step, -> 3): the history says 3 once.
            if world_sizes.last().map(|s| s.world_size) != Some(to) {
                world_sizes
                    .push(crate::run_dir::WorldSpan { from_global_step: resumed_step, world_size: to });
            }
        }
        self.state = resumed.as_ref().map(|c| c.progress.clone()).unwrap_or_default();
        self.state.restarts = restarts;
        self.state.resizes = resizes;
        self.state.steps_lost = total_lost;
        self.state.world_sizes = world_sizes;
        self.attempt += 1;
        self.world = to;
        self.joiners.clear();
        self.views.set_world(to);
        self.shared.telemetry.set_state(JobState::Restarting);
        self.shared.telemetry.begin_attempt(self.attempt, restarts, resizes, to);
        self.shared.begin_attempt(
            self.attempt,
            resumed.as_ref().map(|c| checkpoints::resume_from(self.run_dir.path(), c)),
            to,
        );
        self.rank_of_pid.clear();
        // The new replicas say which best model they restored (Ready).
        self.best_held = None;
        self.registered = 0;
        self.last_seen = vec![None; self.world()];
        self.pending.clear();
        self.training = false;
        self.reached_step = resumed_step;
        // 3. Local workers: new processes.
        if let Some(pool) = self.local.as_mut() {
            pool.workers = LocalWorkers::spawn(to, &pool.launch, pool.events.clone(), pool.output.clone())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fewer_workers_than_min_exit_75_with_the_cause_whatever_the_cause_was() {
        // A rendezvous deadline is no loss of its own; a lost worker is. Both end in 75.
        let deadline = anyhow::anyhow!("only 1 of 2 workers registered within 5 s (--rejoin-timeout)");
        let lost = anyhow::Error::new(trainer_core::exit::Lost("rank 1 stopped answering".into()));
        for cause in [deadline, lost] {
            let e = BelowMinimum::error(1, 2, 3, &cause);
            assert_eq!(trainer_core::exit::code_for(e.chain()), trainer_core::exit::LOST);
            assert!(e.is::<BelowMinimum>());
            let text = format!("{e:#}");
            assert!(
                text.starts_with("1 worker(s) left, fewer than the 2 that --workers 2:3 needs: "),
                "{text}"
            );
            assert!(text.contains(&format!("{cause:#}")), "{text}");
        }
    }
}
