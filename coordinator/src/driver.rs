//! The job driver: waits for the workers, drives the epochs through their session streams,
//! checks the replicas, aggregates metrics, commits checkpoints and writes the run folder.
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

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use tokio::sync::mpsc;
use trainer_core::exit::Lost;
use trainer_proto::v1::{
    coordinator_message, worker_message::Body, ArtifactDone, ArtifactKind, Checkpoint, CheckpointNow,
    CoordinatorMessage, EpochDone, Evaluate, ExportModel, Heartbeat, KeepBest, LoadBest, Split, StartEpoch,
    Stop,
};

use crate::checkpoints::{self, JobCheckpoint, JobIdentity, JobProgress};
use crate::launcher::{LocalWorkers, WorkerLaunch};
use crate::progress::{Output, Progress};
use crate::run_dir::{checksum_hex, EpochRecord, EvalRecord, RunDir, Summary};
use crate::service::{Event, Shared};
use crate::telemetry::JobState;
use crate::views::RunViews;

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
    /// The checkpoint this run resumes from (`--resume`).
    pub resume: Option<JobCheckpoint>,
}

#[derive(Debug, Clone, Copy)]
pub struct Eval {
    pub correct: u64,
    pub total: u64,
    pub loss_sum: f64,
}

impl Eval {
    pub fn accuracy(&self) -> f64 {
        if self.total == 0 {
            f64::NAN
        } else {
            self.correct as f64 / self.total as f64
        }
    }
    pub fn mean_loss(&self) -> f64 {
        if self.total == 0 {
            f64::NAN
        } else {
            self.loss_sum / self.total as f64
        }
    }
}

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
}

/// What a successful run produced.
pub struct Outcome {
    pub summary: Summary,
}

fn body_name(body: &Body) -> &'static str {
    match body {
        Body::Hello(_) => "hello",
        Body::Heartbeat(_) => "heartbeat",
        Body::Ready(_) => "ready",
        Body::Step(_) => "step metrics",
        Body::EpochDone(_) => "epoch done",
        Body::Eval(_) => "evaluation result",
        Body::ArtifactDone(_) => "artifact done",
        Body::Error(_) => "error",
        Body::BestLoaded(_) => "best model loaded",
    }
}

fn command(body: coordinator_message::Body) -> CoordinatorMessage {
    CoordinatorMessage { body: Some(body) }
}

/// A lost worker: the attempt ends, and the group may restart.
fn lost(message: String) -> anyhow::Error {
    anyhow!(Lost(message))
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
        let world = shared.data.world_size;
        let checkpoint = fault.resume.clone();
        let state = checkpoint.as_ref().map(|c| c.progress.clone()).unwrap_or_default();
        let views = RunViews::new(
            run_dir.path(),
            &shared.data.config.to_toml(),
            shared.data.config.train.log_every,
            shared.data.steps_per_epoch,
        );
        shared.telemetry.begin_attempt(0, state.restarts);
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
        }
    }

    fn world(&self) -> usize {
        self.shared.data.world_size
    }

    fn worker_name(&self, pid: u32) -> String {
        match self.rank_of_pid.get(&pid) {
            Some(rank) => format!("worker rank {rank} (pid {pid})"),
            None => format!("worker pid {pid} (not registered yet)"),
        }
    }

    fn is_current_pid(&self, pid: u32) -> bool {
        self.local.as_ref().is_some_and(|l| l.workers.pids().contains(&pid))
    }

    /// Handles one event; returns a message the current phase must look at.
    async fn handle(&mut self, event: Event) -> anyhow::Result<Option<(usize, Body)>> {
        match event {
            Event::Registered { attempt, .. }
            | Event::SessionOpened { attempt, .. }
            | Event::Message { attempt, .. }
            | Event::SessionClosed { attempt, .. }
                if attempt != self.attempt =>
            {
                Ok(None)
            }
            Event::Registered { rank, hostname, pid, peer, .. } => {
                if self.is_current_pid(pid) {
                    self.rank_of_pid.insert(pid, rank);
                }
                self.registered += 1;
                self.shared.telemetry.registered(rank, &hostname, pid, peer);
                let peer = peer.map_or_else(|| "?".to_string(), |p| p.to_string());
                tracing::info!(rank, %hostname, pid, %peer, attempt = self.attempt, "worker registered");
                Ok(None)
            }
            Event::SessionOpened { rank, .. } => {
                self.last_seen[rank] = Some(Instant::now());
                self.shared.telemetry.seen(rank, self.last_seen[rank]);
                Ok(None)
            }
            Event::Message { rank, body, .. } => {
                self.last_seen[rank] = Some(Instant::now());
                self.shared.telemetry.seen(rank, self.last_seen[rank]);
                match body {
                    Body::Heartbeat(_) | Body::Hello(_) => Ok(None),
                    Body::Step(m) => {
                        if rank == 0 {
                            let step = m.epoch * self.shared.data.steps_per_epoch as u64 + m.step + 1;
                            self.reached_step = self.reached_step.max(step);
                        }
                        self.progress.step(rank, &m);
                        self.shared.telemetry.step(rank, &m);
                        // One point for metrics.jsonl, TensorBoard and the gauges alike.
                        if let Some(point) = self.views.step(rank, &m) {
                            self.shared.telemetry.set_loss(point.loss);
                            self.run_dir.append_metrics(&point)?;
                        }
                        Ok(None)
                    }
                    Body::Error(e) if !self.finished => Err(self.gather_failures(rank, e.message).await),
                    Body::ArtifactDone(done) if done.kind == ArtifactKind::Checkpoint as i32 => {
                        self.commit_checkpoint(&done)?;
                        Ok(done.epoch_end.then_some((rank, Body::ArtifactDone(done))))
                    }
                    other => Ok(Some((rank, other))),
                }
            }
            Event::SessionClosed { rank, reason, .. } => {
                self.last_seen[rank] = None;
                self.shared.telemetry.seen(rank, None);
                if self.finished {
                    return Ok(None);
                }
                Err(self.explain_disconnect(rank, reason).await)
            }
            Event::ChildExited { pid, status } => {
                if self.finished || !self.is_current_pid(pid) {
                    return Ok(None);
                }
                Err(lost(format!("{} {status}", self.worker_name(pid))))
            }
            Event::Interrupted { signal: "SIGTERM" } if self.terminate_by.is_none() => {
                let grace = self.fault.term_grace;
                self.terminate_by = Some(Instant::now() + grace);
                if !self.training {
                    return Err(Terminated { checkpoint: None }.into());
                }
                self.progress.line(&format!(
                    "SIGTERM: checkpointing at the next step, then stopping (within {:.0} s)",
                    grace.as_secs_f64()
                ));
                self.shared.try_send(0, command(coordinator_message::Body::CheckpointNow(CheckpointNow {})));
                Ok(None)
            }
            Event::Interrupted { signal: "SIGTERM" } => Err(Terminated { checkpoint: None }.into()),
            Event::Interrupted { signal } => Err(Interrupted(signal).into()),
        }
    }

    /// Makes the checkpoint rank 0 just uploaded the current one: `checkpoint.json` names it,
    /// with the coordinator's state as of now.
    fn commit_checkpoint(&mut self, done: &ArtifactDone) -> anyhow::Result<()> {
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

    /// One rank's failure often makes its ring neighbours fail too, in any order: collect
    /// what the other ranks report in a short window, so that the message names them all
    /// (the root cause is usually the one that does not blame a peer).
    async fn gather_failures(&mut self, rank: usize, message: String) -> anyhow::Error {
        let mut failures = vec![(rank, message)];
        let deadline = tokio::time::Instant::now() + Duration::from_millis(700);
        let attempt = self.attempt;
        while let Ok(Some(event)) = tokio::time::timeout_at(deadline, self.events.recv()).await {
            match event {
                Event::Message { rank, body: Body::Error(e), attempt: a } if a == attempt => {
                    failures.push((rank, e.message))
                }
                Event::ChildExited { pid, status } => {
                    if let Some(&r) = self.rank_of_pid.get(&pid) {
                        failures.push((r, format!("its process {status}")));
                    }
                }
                _ => {}
            }
        }
        failures.sort_by_key(|f| f.0);
        failures.dedup_by_key(|f| f.0);
        let text: Vec<String> =
            failures.iter().map(|(r, m)| format!("worker rank {r} failed: {m}")).collect();
        lost(text.join("; "))
    }

    /// A session that ends usually means its process died: wait briefly for the exit status
    /// of a local worker so that the message says how it ended.
    async fn explain_disconnect(&mut self, rank: usize, reason: String) -> anyhow::Error {
        let pid = self.rank_of_pid.iter().find(|(_, &r)| r == rank).map(|(&p, _)| p);
        if let Some(pid) = pid {
            let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
            while let Ok(Some(event)) = tokio::time::timeout_at(deadline, self.events.recv()).await {
                if let Event::ChildExited { pid: p, status } = event {
                    if p == pid {
                        return lost(format!("worker rank {rank} (pid {pid}) {status}"));
                    }
                }
            }
        }
        lost(format!("worker rank {rank} disconnected: {reason}"))
    }

    /// Sends heartbeats down and checks that every open session sent something recently.
    fn heartbeat_tick(&mut self) -> anyhow::Result<()> {
        let timeout = self.shared.timing.heartbeat_timeout;
        for rank in 0..self.world() {
            if let Some(seen) = self.last_seen[rank] {
                self.shared.try_send(
                    rank,
                    command(coordinator_message::Body::Heartbeat(Heartbeat { sent_unix_ms: unix_ms() })),
                );
                let silent = seen.elapsed();
                if silent > timeout {
                    return Err(lost(format!(
                        "worker rank {rank} sent nothing for {:.1} s (heartbeat timeout {:.1} s): \
                         it is hung or unreachable",
                        silent.as_secs_f64(),
                        timeout.as_secs_f64()
                    )));
                }
            }
        }
        Ok(())
    }

    /// The next message for the current phase; `deadline` ends the wait with `on_deadline`.
    async fn next(
        &mut self,
        deadline: Option<Instant>,
        on_deadline: &dyn Fn(&Self) -> String,
    ) -> anyhow::Result<(usize, Body)> {
        if let Some(m) = self.pending.pop_front() {
            return Ok(m);
        }
        let mut tick = tokio::time::interval(self.shared.timing.heartbeat_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let far = Instant::now() + Duration::from_secs(365 * 24 * 3600);
        let sleep = tokio::time::sleep_until(deadline.unwrap_or(far).into());
        tokio::pin!(sleep);
        loop {
            let terminate = tokio::time::sleep_until(self.terminate_by.unwrap_or(far).into());
            tokio::select! {
                event = self.events.recv() => {
                    let event = event.ok_or_else(|| anyhow!("internal error: the event channel closed"))?;
                    if let Some(m) = self.handle(event).await? {
                        return Ok(m);
                    }
                }
                _ = tick.tick() => self.heartbeat_tick()?,
                _ = &mut sleep => bail!("{}", on_deadline(self)),
                _ = terminate => return Err(Terminated { checkpoint: None }.into()),
            }
        }
    }

    /// Waits for one message from each of `ranks` that `pick` accepts; anything else is a
    /// protocol error that names the rank.
    async fn collect<T>(
        &mut self,
        ranks: &[usize],
        waiting_for: &str,
        mut pick: impl FnMut(&Body) -> Option<T>,
    ) -> anyhow::Result<Vec<T>> {
        let mut got: Vec<Option<T>> = ranks.iter().map(|_| None).collect();
        while got.iter().any(Option::is_none) {
            let (rank, body) = self.next(None, &|_| String::new()).await?;
            let slot = ranks.iter().position(|&r| r == rank);
            match (slot, pick(&body)) {
                (Some(i), Some(v)) if got[i].is_none() => got[i] = Some(v),
                _ => bail!(
                    "protocol error: worker rank {rank} sent {} while the coordinator waited for {waiting_for}",
                    body_name(&body)
                ),
            }
        }
        Ok(got.into_iter().flatten().collect())
    }

    async fn broadcast(&mut self, body: coordinator_message::Body) -> anyhow::Result<()> {
        for rank in 0..self.world() {
            if !self.shared.send(rank, command(body.clone())).await {
                return Err(lost(format!("worker rank {rank} has no open session")));
            }
        }
        Ok(())
    }

    /// Tells every worker to stop: the job failed (`reason`), or the group restarts.
    fn stop_workers(&self, reason: &str, restart: bool) {
        for rank in 0..self.world() {
            self.shared.try_send(
                rank,
                command(coordinator_message::Body::Stop(Stop {
                    success: false,
                    reason: reason.to_string(),
                    restart,
                })),
            );
        }
    }

    /// Tells every worker to stop (the job failed: `reason`).
    pub fn abort(&mut self, reason: &str) {
        self.finished = true;
        self.stop_workers(reason, false);
    }

    async fn wait_for_workers(&mut self) -> anyhow::Result<()> {
        let world = self.world();
        let timeout = if self.attempt == 0 { self.register_timeout } else { self.fault.rejoin_timeout };
        let flag = if self.attempt == 0 { "--register-timeout" } else { "--rejoin-timeout" };
        let deadline = Instant::now() + timeout;
        self.shared.telemetry.set_state(JobState::Waiting);
        self.progress.status("waiting for workers");
        while self.registered < world || self.last_seen.iter().any(Option::is_none) {
            let m = self
                .next(Some(deadline), &|d: &Self| {
                    let hint = if d.external_workers {
                        format!(
                            "; start them with `worker join` and {}=<this address>, {}=<the job secret>",
                            trainer_proto::COORDINATOR_ADDR_ENV,
                            trainer_proto::JOB_SECRET_ENV
                        )
                    } else {
                        String::new()
                    };
                    let opened = d.last_seen.iter().filter(|s| s.is_some()).count();
                    format!(
                        "only {} of {world} workers registered and {opened} opened their session \
                         within {:.0} s ({flag}){hint}",
                        d.registered,
                        timeout.as_secs_f64()
                    )
                })
                .await?;
            self.pending.push_back(m);
        }
        self.progress.status("building replicas");
        let ready = self
            .collect(&(0..world).collect::<Vec<_>>(), "ready", |b| match b {
                Body::Ready(r) => Some(r.clone()),
                _ => None,
            })
            .await?;
        self.backend = ready[0].backend.clone();
        self.shared.telemetry.set_backend(&self.backend);
        let checksums: Vec<u64> = ready.iter().map(|r| r.parameter_checksum).collect();
        // Every rank restored the same checkpoint, so the same best model.
        let held: Vec<Option<u64>> = ready.iter().map(|r| r.best_epoch).collect();
        if held.windows(2).any(|w| w[0] != w[1]) {
            bail!("the replicas restored best models of different epochs (0-based, in rank order): {held:?}");
        }
        self.best_held = held[0].map(|e| e as usize + 1);
        let when = if self.checkpoint.is_some() {
            "after restoring the checkpoint and the broadcast"
        } else {
            "after the initial broadcast"
        };
        check_checksums(&checksums, when)?;
        tracing::info!(
            world,
            backend = %self.backend,
            parameters = ready[0].parameter_count,
            checksum = %checksum_hex(checksums[0]),
            attempt = self.attempt,
            "all replicas ready"
        );
        Ok(())
    }

    async fn evaluate(&mut self, split: Split, epoch: u64) -> anyhow::Result<Eval> {
        self.shared.telemetry.set_state(JobState::Evaluating);
        self.broadcast(coordinator_message::Body::Evaluate(Evaluate { split: split as i32, epoch })).await?;
        let ranks: Vec<usize> = (0..self.world()).collect();
        let results = self
            .collect(&ranks, &format!("{} results", split.as_str_name()), |b| match b {
                Body::Eval(e) if e.split == split as i32 && e.epoch == epoch => Some(*e),
                _ => None,
            })
            .await?;
        let eval = results.iter().fold(Eval { correct: 0, total: 0, loss_sum: 0.0 }, |acc, e| Eval {
            correct: acc.correct + e.correct,
            total: acc.total + e.total,
            loss_sum: acc.loss_sum + e.loss_sum,
        });
        let name = if split == Split::Test { "test" } else { "validation" };
        self.shared.telemetry.eval(name, eval.accuracy(), eval.mean_loss());
        Ok(eval)
    }

    /// Rank 0 uploads its parameters as `kind` (model.safetensors or model-last.safetensors).
    async fn export(&mut self, kind: ArtifactKind, epoch: u64) -> anyhow::Result<u64> {
        self.shared.telemetry.set_state(JobState::Checkpointing);
        let body = coordinator_message::Body::ExportModel(ExportModel { epoch, kind: kind as i32 });
        self.artifact(kind, body, epoch).await
    }

    /// The epoch (1-based) of the model to keep: the best by validation, when the replicas
    /// hold its copy. None (the last epoch's model is kept) without a validation split, or
    /// when the job resumed from a checkpoint written before best models were kept and no
    /// later epoch did better.
    fn kept_best(&mut self) -> Option<usize> {
        let kept = kept_best(self.state.best, self.best_held);
        if let (Some((_, best)), None) = (self.state.best, kept) {
            self.progress.line(&format!(
                "the best model by validation (epoch {best}) was not kept: the checkpoint this job \
                 resumed from was written before best models were kept; keeping the last epoch's model"
            ));
        }
        kept
    }

    /// Every rank makes its copy of the best model (of `epoch`, 1-based) its parameters; they
    /// must be the parameters the ranks reported after that epoch.
    async fn load_best(&mut self, epoch: usize) -> anyhow::Result<()> {
        self.progress.status(&format!("switching to the best model (epoch {epoch})"));
        let index = epoch.saturating_sub(1) as u64;
        self.broadcast(coordinator_message::Body::LoadBest(LoadBest { epoch: index })).await?;
        let ranks: Vec<usize> = (0..self.world()).collect();
        let checksums = self
            .collect(&ranks, "the best model loaded", |b| match b {
                Body::BestLoaded(l) if l.epoch == index => Some(l.parameter_checksum),
                _ => None,
            })
            .await?;
        check_checksums(&checksums, &format!("after switching to the best model (epoch {epoch})"))?;
        let reported =
            self.state.records.iter().find(|r| r.epoch == epoch).map(|r| r.parameter_checksum.clone());
        let loaded = checksum_hex(checksums[0]);
        if reported.as_deref() != Some(loaded.as_str()) {
            bail!(
                "the best model the ranks kept of epoch {epoch} has checksum {loaded}, but after that \
                 epoch they reported {}",
                reported.as_deref().unwrap_or("nothing")
            );
        }
        Ok(())
    }

    /// A test result in metrics.jsonl and TensorBoard: `model` is "last" or "best" (the kept
    /// model), as `worker train` writes them.
    fn record_test(&mut self, model: &'static str, test: &Eval) -> anyhow::Result<()> {
        let epochs = self.state.records.len();
        self.views.test(epochs, model, test);
        self.run_dir.append_metrics(&EvalRecord {
            kind: "eval",
            split: "test",
            model,
            epoch: epochs,
            accuracy: test.accuracy(),
            loss: test.mean_loss(),
            examples: test.total,
            train_seconds: self.state.train_seconds,
        })
    }

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

    /// Runs the job to its end, restarting the group from the last checkpoint when a worker
    /// is lost, up to `--max-restarts` times.
    pub async fn run(&mut self) -> anyhow::Result<Outcome> {
        loop {
            let error = match self.run_attempt().await {
                Ok(outcome) => return Ok(outcome),
                Err(e) => e,
            };
            let retryable = error.chain().any(|c| c.is::<Lost>()) && self.terminate_by.is_none();
            if !retryable {
                return Err(error);
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

    /// Stops the group and starts the next attempt from the last checkpoint.
    async fn restart(&mut self, cause: &anyhow::Error) -> anyhow::Result<()> {
        let cause = format!("{cause:#}");
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

    async fn run_attempt(&mut self) -> anyhow::Result<Outcome> {
        self.wait_for_workers().await?;
        let data = Arc::clone(&self.shared.data);
        let train = &data.config.train;
        let world = self.world();
        let all: Vec<usize> = (0..world).collect();
        let has_val = !data.splits.val.is_empty();
        let (start_epoch, start_step) = self.checkpoint.as_ref().map_or((0, 0), JobCheckpoint::resume_point);
        self.reached_step = self.checkpoint.as_ref().map_or(0, |c| c.global_step);

        self.training = true;
        for epoch in start_epoch..train.epochs as u64 {
            if self.state.stopped_early {
                break;
            }
            let first_step = if epoch == start_epoch { start_step } else { 0 };
            // 1. Train: every rank runs the epoch on its shard (from the resumed step).
            self.progress.start_epoch(epoch);
            self.shared.telemetry.start_epoch(epoch, first_step);
            self.views.start_epoch();
            let started = Instant::now();
            self.broadcast(coordinator_message::Body::StartEpoch(StartEpoch { epoch, first_step })).await?;
            let done: Vec<EpochDone> = self
                .collect(&all, "the end of the epoch", |b| match b {
                    Body::EpochDone(d) if d.epoch == epoch => Some(*d),
                    _ => None,
                })
                .await?;
            let seconds = started.elapsed().as_secs_f64();
            // 2. The replicas must still be identical.
            let checksums: Vec<u64> = done.iter().map(|d| d.parameter_checksum).collect();
            check_checksums(&checksums, &format!("after epoch {}", epoch + 1))?;
            let loss_sum: f64 = done.iter().map(|d| d.loss_sum).sum();
            let samples: u64 = done.iter().map(|d| d.samples).sum();
            let epoch_tokens: u64 = done.iter().map(|d| d.tokens).sum();
            let (s, c) = done.iter().fold((0.0, 0.0), |(s, c), d| (s + d.seconds, c + d.comm_seconds));
            // 3. Validation, summed over ranks.
            self.progress.status(&format!("epoch {}: validating", epoch + 1));
            let val = if has_val { Some(self.evaluate(Split::Validation, epoch).await?) } else { None };
            // 4. The coordinator's state after the epoch, which the checkpoint carries.
            let record = EpochRecord {
                epoch: epoch as usize + 1,
                steps: done[0].steps,
                train_loss: if samples > 0 { loss_sum / samples as f64 } else { f64::NAN },
                train_samples: samples,
                train_tokens: epoch_tokens,
                epoch_seconds: seconds,
                tokens_per_second: epoch_tokens as f64 / seconds.max(1e-9),
                comm_share: if s > 0.0 { c / s } else { 0.0 },
                val_loss: val.map(|v| v.mean_loss()),
                val_accuracy: val.map(|v| v.accuracy()),
                parameter_checksum: checksum_hex(checksums[0]),
            };
            let st = &mut self.state;
            st.train_seconds += seconds;
            st.tokens += epoch_tokens;
            st.step_seconds += s;
            st.comm_seconds += c;
            st.checksums = checksums;
            // Early stopping on validation accuracy; the best model is kept.
            let mut improved = false;
            if let Some(v) = val {
                let acc = v.accuracy();
                if st.best.is_none_or(|(b, _)| acc > b) {
                    st.best = Some((acc, epoch as usize + 1));
                    st.epochs_without_gain = 0;
                    improved = true;
                } else {
                    st.epochs_without_gain += 1;
                    st.stopped_early = train.early_stopping_patience > 0
                        && st.epochs_without_gain >= train.early_stopping_patience;
                }
            }
            st.records.push(record.clone());
            self.run_dir.append_metrics(&record)?;
            self.views.epoch_end(&record);
            self.views.plot(world, &self.backend);
            self.progress.line(&format!(
                "epoch {}/{}: train loss {:.4}, {:.0} tokens/s, comm {:.0}%{}",
                record.epoch,
                train.epochs,
                record.train_loss,
                record.tokens_per_second,
                100.0 * record.comm_share,
                val.map_or(String::new(), |v| format!(
                    ", val loss {:.4}, val accuracy {:.4}",
                    v.mean_loss(),
                    v.accuracy()
                ))
            ));
            if self.state.stopped_early {
                self.progress.line(&format!(
                    "early stopping: no validation gain for {} epochs",
                    self.state.epochs_without_gain
                ));
            }
            // 5. Every rank keeps a copy of the best model so far; rank 0's checkpoint carries it.
            if improved {
                self.broadcast(coordinator_message::Body::KeepBest(KeepBest { epoch })).await?;
                self.best_held = Some(epoch as usize + 1);
            }
            // 6. Rank 0 checkpoints; the driver commits it with the state above.
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
        }

        self.training = false;
        let epochs = self.state.records.len();
        let last_epoch = epochs.saturating_sub(1) as u64;
        let (kept_model, kept_epoch) = match self.kept_best() {
            Some(best) => ("best", best),
            None => ("last", epochs),
        };
        // 1. The last epoch's model: tested, and exported as model-last.safetensors.
        self.progress.status("testing the last epoch's model");
        let last_test = self.evaluate(Split::Test, last_epoch).await?;
        self.record_test("last", &last_test)?;
        self.progress.status("exporting the last epoch's model");
        self.export(ArtifactKind::LastModel, last_epoch).await?;
        // 2. The kept model, exported as model.safetensors: when it is another epoch's, every
        //    rank switches to its copy, and it is tested too.
        let test = if kept_epoch == epochs {
            last_test
        } else {
            self.load_best(kept_epoch).await?;
            self.progress.status(&format!("testing the best model (epoch {kept_epoch})"));
            self.evaluate(Split::Test, kept_epoch.saturating_sub(1) as u64).await?
        };
        self.record_test("best", &test)?;
        self.progress.status("exporting the model");
        self.export(ArtifactKind::Model, kept_epoch.saturating_sub(1) as u64).await?;
        self.finished = true;
        for rank in 0..world {
            self.shared.try_send(
                rank,
                command(coordinator_message::Body::Stop(Stop {
                    success: true,
                    reason: "training finished".to_string(),
                    restart: false,
                })),
            );
        }
        self.progress.finish();
        let st = &self.state;
        let summary = Summary {
            test_accuracy: test.accuracy(),
            test_loss: test.mean_loss(),
            kept_model: kept_model.to_string(),
            kept_epoch,
            last_epoch_test_accuracy: last_test.accuracy(),
            last_epoch_test_loss: last_test.mean_loss(),
            best_val_accuracy: st.best.map(|b| b.0),
            best_epoch: st.best.map(|b| b.1),
            epochs: st.records.len(),
            stopped_early: st.stopped_early,
            train_seconds: st.train_seconds,
            tokens_per_second: st.tokens as f64 / st.train_seconds.max(1e-9),
            comm_share: if st.step_seconds > 0.0 { st.comm_seconds / st.step_seconds } else { 0.0 },
            world_size: world,
            backend: self.backend.clone(),
            replica_checksums: st.checksums.iter().map(|&c| checksum_hex(c)).collect(),
            train_samples: data.splits.train.len(),
            val_samples: data.splits.val.len(),
            test_samples: data.splits.test.len(),
            vocab_size: data.vocab_size,
            restarts: st.restarts,
            steps_lost: st.steps_lost,
            final_parameter_checksum: st.checksums.first().map(|&c| checksum_hex(c)).unwrap_or_default(),
        };
        self.run_dir.write_summary(&summary)?;
        self.views.plot(world, &self.backend);
        self.shared.telemetry.set_state(JobState::Finished);
        Ok(Outcome { summary })
    }
}

/// The epoch (1-based) of the model to keep: the best by validation (`best`: accuracy,
/// epoch) when the replicas hold a copy of it (`held`); None keeps the last epoch's model.
pub fn kept_best(best: Option<(f64, usize)>, held: Option<usize>) -> Option<usize> {
    best.map(|(_, epoch)| epoch).filter(|&epoch| held == Some(epoch))
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

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The one-screen summary printed at the end.
pub fn render_summary(summary: &Summary, records: &[EpochRecord], run_dir: &std::path::Path) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\nTraining finished: {} workers ({}), {} epochs{} in {:.1} s",
        summary.world_size,
        summary.backend,
        summary.epochs,
        if summary.stopped_early { " (stopped early)" } else { "" },
        summary.train_seconds
    );
    let _ = writeln!(
        s,
        "  data: {} train / {} validation / {} test reviews, vocabulary {}",
        summary.train_samples, summary.val_samples, summary.test_samples, summary.vocab_size
    );
    let _ = writeln!(
        s,
        "  throughput: {:.0} tokens/s, communication {:.1}% of step time",
        summary.tokens_per_second,
        100.0 * summary.comm_share
    );
    let _ = writeln!(s, "  epoch  train loss  val loss  val acc   tokens/s  seconds");
    for r in records {
        let _ = writeln!(
            s,
            "  {:>5}  {:>10.4}  {:>8}  {:>7}  {:>9.0}  {:>7.1}",
            r.epoch,
            r.train_loss,
            r.val_loss.map_or("-".to_string(), |v| format!("{v:.4}")),
            r.val_accuracy.map_or("-".to_string(), |v| format!("{v:.4}")),
            r.tokens_per_second,
            r.epoch_seconds
        );
    }
    if let Some(best) = summary.best_val_accuracy {
        let _ =
            writeln!(s, "  best validation accuracy: {best:.4} (epoch {})", summary.best_epoch.unwrap_or(0));
    }
    let kept = if summary.kept_model == "best" { "the best by validation" } else { "the last epoch's" };
    let _ = writeln!(
        s,
        "  test accuracy: {:.4} (loss {:.4}, {} reviews) with the kept model, {kept} (epoch {}): {}",
        summary.test_accuracy,
        summary.test_loss,
        summary.test_samples,
        summary.kept_epoch,
        crate::run_dir::MODEL_FILE
    );
    let last = if summary.kept_epoch == summary.epochs {
        "the same model".to_string()
    } else {
        format!(
            "test accuracy {:.4} (loss {:.4})",
            summary.last_epoch_test_accuracy, summary.last_epoch_test_loss
        )
    };
    let _ = writeln!(
        s,
        "  last epoch's model (epoch {}): {last}: {}",
        summary.epochs,
        crate::run_dir::LAST_MODEL_FILE
    );
    let _ = writeln!(
        s,
        "  replica checksums: {} ({})",
        summary.replica_checksums.first().map_or("-", String::as_str),
        if summary.replica_checksums.windows(2).all(|w| w[0] == w[1]) { "all ranks equal" } else { "DIFFER" }
    );
    let _ = writeln!(s, "  run folder: {}", run_dir.display());
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_best_model_is_kept_when_the_replicas_hold_it() {
        assert_eq!(kept_best(Some((0.8, 3)), Some(3)), Some(3));
        // No validation split: the last epoch's model.
        assert_eq!(kept_best(None, None), None);
        // Resumed from a checkpoint without the best model's copy, and nothing better since.
        assert_eq!(kept_best(Some((0.8, 3)), None), None);
        assert_eq!(kept_best(Some((0.8, 3)), Some(2)), None);
    }

    #[test]
    fn checksum_mismatch_names_the_ranks() {
        assert!(check_checksums(&[7, 7, 7], "x").is_ok());
        let e = check_checksums(&[7, 7, 8, 9], "after epoch 2").unwrap_err().to_string();
        assert!(e.contains("rank 2") && e.contains("rank 3") && !e.contains("rank 1"), "{e}");
        assert!(e.contains("after epoch 2"), "{e}");
    }
}
