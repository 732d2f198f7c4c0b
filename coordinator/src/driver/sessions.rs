//! The driver's side of the session streams: events from the gRPC service and the local
//! launcher come in, commands go out to the ranks. Here a lost worker is noticed (it exits,
//! disconnects, misses heartbeats or reports a failure) and turned into an error marked
//! [`Lost`], which ends the attempt; the restart itself is `restart.rs`'s.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use trainer_core::exit::Lost;
use trainer_proto::v1::{
    coordinator_message, worker_message::Body, ArtifactKind, CheckpointNow, CoordinatorMessage, Heartbeat,
    Stop,
};

use super::{Driver, Interrupted, Terminated};
use crate::service::Event;

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

pub(super) fn command(body: coordinator_message::Body) -> CoordinatorMessage {
    CoordinatorMessage { body: Some(body) }
}

/// [`Driver::next`]'s deadline passed (its message says what was missing).
#[derive(Debug)]
pub(super) struct DeadlinePassed(pub String);

impl std::fmt::Display for DeadlinePassed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DeadlinePassed {}

/// A lost worker: the attempt ends, and the group may restart.
pub(super) fn lost(message: String) -> anyhow::Error {
    anyhow!(Lost(message))
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Driver {
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
                            let step = m
                                .epoch
                                .saturating_mul(self.shared.data.steps_per_epoch as u64)
                                .saturating_add(m.step)
                                .saturating_add(1);
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
                        self.checkpoint_done(&done)?;
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
            Event::JoinWaiting { hostname, pid } => {
                if self.fault.is_elastic() && self.world < self.fault.max_world && self.joiners.insert(pid) {
                    self.progress.line(&format!(
                        "worker pid {pid} on {hostname} asks to join ({} of up to {} workers now): \
                         it comes in at the next checkpoint",
                        self.world, self.fault.max_world
                    ));
                }
                Ok(None)
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
    pub(super) async fn next(
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
                _ = &mut sleep => return Err(DeadlinePassed(on_deadline(self)).into()),
                _ = terminate => return Err(Terminated { checkpoint: None }.into()),
            }
        }
    }

    /// Waits for one message from each of `ranks` that `pick` accepts; anything else is a
    /// protocol error that names the rank.
    pub(super) async fn collect<T>(
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

    pub(super) async fn broadcast(&mut self, body: coordinator_message::Body) -> anyhow::Result<()> {
        for rank in 0..self.world() {
            if !self.shared.send(rank, command(body.clone())).await {
                return Err(lost(format!("worker rank {rank} has no open session")));
            }
        }
        Ok(())
    }

    /// Tells every worker to stop: the job failed (`reason`), or the group restarts.
    pub(super) fn stop_workers(&self, reason: &str, restart: bool) {
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
}
