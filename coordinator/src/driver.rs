//! The job driver: waits for the workers, drives the epochs through their session streams,
//! checks the replicas, aggregates metrics and writes the run folder. Every failure (a
//! worker that exits, disconnects, misses heartbeats or reports an error; a checksum
//! mismatch; Ctrl-C) ends `run` with an error that names the rank.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use tokio::sync::mpsc;
use trainer_proto::v1::{
    coordinator_message, worker_message::Body, ArtifactKind, Checkpoint, CoordinatorMessage, EpochDone,
    Evaluate, ExportModel, Heartbeat, Split, StartEpoch, Stop,
};

use crate::progress::Progress;
use crate::run_dir::{checksum_hex, EpochRecord, RunDir, StepRecord, Summary};
use crate::service::{Event, Shared};

/// The coordinator was interrupted (Ctrl-C or SIGTERM); main exits with 130.
#[derive(Debug)]
pub struct Interrupted(pub &'static str);

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "interrupted by {}; the workers were stopped and the last checkpoint is kept", self.0)
    }
}

impl std::error::Error for Interrupted {}

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
    /// Local worker processes by pid (empty with --external-workers).
    pub local_pids: Vec<u32>,
    rank_of_pid: HashMap<u32, usize>,
    registered: usize,
    last_seen: Vec<Option<Instant>>,
    pending: VecDeque<(usize, Body)>,
    /// Set once the job is over: exits and disconnects are expected from then on.
    finished: bool,
    pub records: Vec<EpochRecord>,
    pub backend: String,
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
    }
}

fn command(body: coordinator_message::Body) -> CoordinatorMessage {
    CoordinatorMessage { body: Some(body) }
}

impl Driver {
    pub fn new(
        shared: Arc<Shared>,
        events: mpsc::UnboundedReceiver<Event>,
        progress: Progress,
        run_dir: RunDir,
        register_timeout: Duration,
        local_pids: Vec<u32>,
    ) -> Self {
        let world = shared.data.world_size;
        Self {
            shared,
            events,
            progress,
            run_dir,
            register_timeout,
            external_workers: local_pids.is_empty(),
            local_pids,
            rank_of_pid: HashMap::new(),
            registered: 0,
            last_seen: vec![None; world],
            pending: VecDeque::new(),
            finished: false,
            records: Vec::new(),
            backend: String::new(),
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

    /// Handles one event; returns a message the current phase must look at.
    async fn handle(&mut self, event: Event) -> anyhow::Result<Option<(usize, Body)>> {
        match event {
            Event::Registered { rank, hostname, pid, peer } => {
                if self.local_pids.contains(&pid) {
                    self.rank_of_pid.insert(pid, rank);
                }
                self.registered += 1;
                let peer = peer.map_or_else(|| "?".to_string(), |p| p.to_string());
                tracing::info!(rank, %hostname, pid, %peer, "worker registered");
                Ok(None)
            }
            Event::SessionOpened { rank } => {
                self.last_seen[rank] = Some(Instant::now());
                Ok(None)
            }
            Event::Message { rank, body } => {
                self.last_seen[rank] = Some(Instant::now());
                match body {
                    Body::Heartbeat(_) | Body::Hello(_) => Ok(None),
                    Body::Step(m) => {
                        self.progress.step(rank, &m);
                        if rank == 0 && self.progress.logs_step(m.step) {
                            let steps_per_epoch = self.shared.data.steps_per_epoch;
                            self.run_dir.append_metrics(&StepRecord::new(&m, steps_per_epoch))?;
                        }
                        Ok(None)
                    }
                    Body::Error(e) if !self.finished => Err(self.gather_failures(rank, e.message).await),
                    other => Ok(Some((rank, other))),
                }
            }
            Event::SessionClosed { rank, reason } => {
                self.last_seen[rank] = None;
                if self.finished {
                    return Ok(None);
                }
                Err(self.explain_disconnect(rank, reason).await)
            }
            Event::ChildExited { pid, status } => {
                if self.finished {
                    return Ok(None);
                }
                bail!("{} {status}", self.worker_name(pid))
            }
            Event::Interrupted { signal } => Err(Interrupted(signal).into()),
        }
    }

    /// One rank's failure often makes its ring neighbours fail too, in any order: collect
    /// what the other ranks report in a short window, so that the message names them all
    /// (the root cause is usually the one that does not blame a peer).
    async fn gather_failures(&mut self, rank: usize, message: String) -> anyhow::Error {
        let mut failures = vec![(rank, message)];
        let deadline = tokio::time::Instant::now() + Duration::from_millis(700);
        while let Ok(Some(event)) = tokio::time::timeout_at(deadline, self.events.recv()).await {
            match event {
                Event::Message { rank, body: Body::Error(e) } => failures.push((rank, e.message)),
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
        anyhow!("{}", text.join("; "))
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
                        return anyhow!("worker rank {rank} (pid {pid}) {status}");
                    }
                }
            }
        }
        anyhow!("worker rank {rank} disconnected: {reason}")
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
                    bail!(
                        "worker rank {rank} sent nothing for {:.1} s (heartbeat timeout {:.1} s): \
                         it is hung or unreachable",
                        silent.as_secs_f64(),
                        timeout.as_secs_f64()
                    );
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
            tokio::select! {
                event = self.events.recv() => {
                    let event = event.ok_or_else(|| anyhow!("internal error: the event channel closed"))?;
                    if let Some(m) = self.handle(event).await? {
                        return Ok(m);
                    }
                }
                _ = tick.tick() => self.heartbeat_tick()?,
                _ = &mut sleep => bail!("{}", on_deadline(self)),
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
                bail!("worker rank {rank} has no open session");
            }
        }
        Ok(())
    }

    /// Tells every worker to stop (the job failed: `reason`).
    pub fn abort(&mut self, reason: &str) {
        self.finished = true;
        for rank in 0..self.world() {
            self.shared.try_send(
                rank,
                command(coordinator_message::Body::Stop(Stop { success: false, reason: reason.to_string() })),
            );
        }
    }

    async fn wait_for_workers(&mut self) -> anyhow::Result<()> {
        let world = self.world();
        let deadline = Instant::now() + self.register_timeout;
        let timeout = self.register_timeout;
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
                         within {:.0} s (--register-timeout){hint}",
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
        let checksums: Vec<u64> = ready.iter().map(|r| r.parameter_checksum).collect();
        check_checksums(&checksums, "after the initial broadcast")?;
        tracing::info!(
            world,
            backend = %self.backend,
            parameters = ready[0].parameter_count,
            checksum = %checksum_hex(checksums[0]),
            "all replicas ready"
        );
        Ok(())
    }

    async fn evaluate(&mut self, split: Split, epoch: u64) -> anyhow::Result<Eval> {
        self.broadcast(coordinator_message::Body::Evaluate(Evaluate { split: split as i32, epoch })).await?;
        let ranks: Vec<usize> = (0..self.world()).collect();
        let results = self
            .collect(&ranks, &format!("{} results", split.as_str_name()), |b| match b {
                Body::Eval(e) if e.split == split as i32 && e.epoch == epoch => Some(*e),
                _ => None,
            })
            .await?;
        Ok(results.iter().fold(Eval { correct: 0, total: 0, loss_sum: 0.0 }, |acc, e| Eval {
            correct: acc.correct + e.correct,
            total: acc.total + e.total,
            loss_sum: acc.loss_sum + e.loss_sum,
        }))
    }

    async fn artifact(
        &mut self,
        kind: ArtifactKind,
        body: coordinator_message::Body,
        epoch: u64,
    ) -> anyhow::Result<u64> {
        if !self.shared.send(0, command(body)).await {
            bail!("worker rank 0 has no open session");
        }
        let done = self
            .collect(&[0], kind.as_str_name(), |b| match b {
                Body::ArtifactDone(a) if a.kind == kind as i32 && a.epoch == epoch => Some(a.bytes),
                _ => None,
            })
            .await?;
        Ok(done[0])
    }

    pub async fn run(&mut self) -> anyhow::Result<Outcome> {
        self.wait_for_workers().await?;
        let data = Arc::clone(&self.shared.data);
        let train = &data.config.train;
        let world = self.world();
        let all: Vec<usize> = (0..world).collect();
        let has_val = !data.splits.val.is_empty();
        let mut best: Option<(f64, usize)> = None;
        let mut epochs_without_gain = 0;
        let mut stopped_early = false;
        let (mut train_seconds, mut tokens, mut step_seconds, mut comm_seconds) =
            (0.0f64, 0u64, 0.0f64, 0.0f64);
        let mut checksums: Vec<u64> = Vec::new();
        let mut last_epoch = 0u64;

        for epoch in 0..train.epochs as u64 {
            last_epoch = epoch;
            // 1. Train: every rank runs the epoch on its shard.
            self.progress.start_epoch(epoch);
            let started = Instant::now();
            self.broadcast(coordinator_message::Body::StartEpoch(StartEpoch { epoch })).await?;
            let done: Vec<EpochDone> = self
                .collect(&all, "the end of the epoch", |b| match b {
                    Body::EpochDone(d) if d.epoch == epoch => Some(*d),
                    _ => None,
                })
                .await?;
            let seconds = started.elapsed().as_secs_f64();
            // 2. The replicas must still be identical.
            checksums = done.iter().map(|d| d.parameter_checksum).collect();
            check_checksums(&checksums, &format!("after epoch {}", epoch + 1))?;
            let loss_sum: f64 = done.iter().map(|d| d.loss_sum).sum();
            let samples: u64 = done.iter().map(|d| d.samples).sum();
            let epoch_tokens: u64 = done.iter().map(|d| d.tokens).sum();
            let (s, c) = done.iter().fold((0.0, 0.0), |(s, c), d| (s + d.seconds, c + d.comm_seconds));
            train_seconds += seconds;
            tokens += epoch_tokens;
            step_seconds += s;
            comm_seconds += c;
            // 3. Validation, summed over ranks.
            self.progress.status(&format!("epoch {}: validating", epoch + 1));
            let val = if has_val { Some(self.evaluate(Split::Validation, epoch).await?) } else { None };
            // 4. Rank 0 checkpoints.
            self.progress.status(&format!("epoch {}: checkpoint", epoch + 1));
            self.artifact(
                ArtifactKind::Checkpoint,
                coordinator_message::Body::Checkpoint(Checkpoint { epoch }),
                epoch,
            )
            .await?;
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
            self.run_dir.append_metrics(&record)?;
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
            self.records.push(record);
            // 5. Early stopping on validation accuracy.
            if let Some(v) = val {
                let acc = v.accuracy();
                if best.is_none_or(|(b, _)| acc > b) {
                    best = Some((acc, epoch as usize + 1));
                    epochs_without_gain = 0;
                } else {
                    epochs_without_gain += 1;
                    if train.early_stopping_patience > 0
                        && epochs_without_gain >= train.early_stopping_patience
                    {
                        stopped_early = true;
                        self.progress.line(&format!(
                            "early stopping: no validation gain for {epochs_without_gain} epochs"
                        ));
                        break;
                    }
                }
            }
        }

        // Test evaluation and the final model.
        self.progress.status("testing");
        let test = self.evaluate(Split::Test, last_epoch).await?;
        self.progress.status("exporting the model");
        self.artifact(
            ArtifactKind::Model,
            coordinator_message::Body::ExportModel(ExportModel { epoch: last_epoch }),
            last_epoch,
        )
        .await?;
        self.finished = true;
        for rank in 0..world {
            self.shared.try_send(
                rank,
                command(coordinator_message::Body::Stop(Stop {
                    success: true,
                    reason: "training finished".to_string(),
                })),
            );
        }
        self.progress.finish();
        let summary = Summary {
            test_accuracy: test.accuracy(),
            test_loss: test.mean_loss(),
            best_val_accuracy: best.map(|b| b.0),
            best_epoch: best.map(|b| b.1),
            epochs: self.records.len(),
            stopped_early,
            train_seconds,
            tokens_per_second: tokens as f64 / train_seconds.max(1e-9),
            comm_share: if step_seconds > 0.0 { comm_seconds / step_seconds } else { 0.0 },
            world_size: world,
            backend: self.backend.clone(),
            replica_checksums: checksums.iter().map(|&c| checksum_hex(c)).collect(),
            train_samples: data.splits.train.len(),
            val_samples: data.splits.val.len(),
            test_samples: data.splits.test.len(),
            vocab_size: data.vocab_size,
        };
        self.run_dir.write_summary(&summary)?;
        Ok(Outcome { summary })
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
    let _ = writeln!(
        s,
        "  test accuracy: {:.4} (loss {:.4}, {} reviews)",
        summary.test_accuracy, summary.test_loss, summary.test_samples
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
    fn checksum_mismatch_names_the_ranks() {
        assert!(check_checksums(&[7, 7, 7], "x").is_ok());
        let e = check_checksums(&[7, 7, 8, 9], "after epoch 2").unwrap_err().to_string();
        assert!(e.contains("rank 2") && e.contains("rank 3") && !e.contains("rank 1"), "{e}");
        assert!(e.contains("after epoch 2"), "{e}");
    }
}
