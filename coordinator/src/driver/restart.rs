//! How an attempt ends and the next one starts. A lost worker ends the attempt with an error
//! marked [`trainer_core::exit::Lost`]; [`Driver::run`](super::Driver::run) then calls
//! [`Driver::restart`]: the group stops, ranks are given anew, every rank restores the last
//! committed checkpoint, and training goes on at its step. Ctrl-C ([`Interrupted`]) and
//! SIGTERM ([`Terminated`]) end the job instead.

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
}

impl Driver {
    /// Stops the group and starts the next attempt from the last checkpoint.
    pub(super) async fn restart(&mut self, cause: &anyhow::Error) -> anyhow::Result<()> {
        let cause = format!("{cause:#}");
        // Nothing is restored unchecked: a damaged checkpoint is set aside and the previous
        // one takes its place; none intact stops the job (exit 6).
        if let Some(current) = &self.checkpoint {
            self.checkpoint = Some(checkpoints::verified(self.run_dir.path(), current)?);
        }
        let resumed = self.checkpoint.clone();
        let resumed_step = resumed.as_ref().map_or(0, |c| c.global_step);
        let steps_lost = self.reached_step.saturating_sub(resumed_step);
        // 1. Stop this attempt's workers: external ones register again by themselves.
        self.stop_workers(&format!("restarting the group: {cause}"), self.external_workers);
        if let Some(pool) = self.local.as_mut() {
            pool.workers.shutdown(Duration::from_secs(2)).await;
        }
        // 2. The next attempt: fresh ranks, the coordinator's state as of the checkpoint.
        let restarts = self.state.restarts + 1;
        let total_lost = self.state.steps_lost + steps_lost;
        self.state = resumed.as_ref().map(|c| c.progress.clone()).unwrap_or_default();
        self.state.restarts = restarts;
        self.state.steps_lost = total_lost;
        self.attempt += 1;
        self.shared.telemetry.set_state(JobState::Restarting);
        self.shared.telemetry.begin_attempt(self.attempt, restarts);
        self.shared.begin_attempt(
            self.attempt,
            resumed.as_ref().map(|c| checkpoints::resume_from(self.run_dir.path(), c)),
        );
        self.rank_of_pid.clear();
        // The new replicas say which best model they restored (Ready).
        self.best_held = None;
        self.registered = 0;
        self.last_seen = vec![None; self.world()];
        self.pending.clear();
        self.training = false;
        self.reached_step = resumed_step;
        let from =
            resumed.as_ref().map_or("the start (no checkpoint yet)".to_string(), JobCheckpoint::describe);
        self.run_dir.append_metrics(&serde_json::json!({
            "type": "restart",
            "attempt": self.attempt,
            "cause": cause,
            "resumed_from_global_step": resumed_step,
            "resumed_from": from,
            "steps_lost": steps_lost,
        }))?;
        self.progress.line(&format!(
            "restart {restarts}/{}: {cause}; resuming from {from}, {steps_lost} steps lost",
            self.fault.max_restarts
        ));
        // 3. Local workers: new processes.
        if let Some(pool) = self.local.as_mut() {
            pool.workers = LocalWorkers::spawn(
                self.shared.data.world_size,
                &pool.launch,
                pool.events.clone(),
                pool.output.clone(),
            )?;
        }
        Ok(())
    }
}
