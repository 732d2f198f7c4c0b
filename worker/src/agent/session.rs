//! The session with the coordinator: one stream each way, heartbeats both ways, commands
//! down (train an epoch, evaluate, keep or load the best model, checkpoint, export, stop)
//! and the replica's reports up, until the coordinator says stop or goes silent.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use trainer_proto::v1::{
    coordinator_message, worker_message, ArtifactDone, ArtifactKind, CoordinatorMessage, Heartbeat, Hello,
    Split, WorkerError, WorkerMessage,
};

use super::args::JoinArgs;
use super::evaluation::split_to_evaluate;
use super::join::{status_error, Agent};
use super::liveness::{guarded, Liveness};
use super::rendezvous::NcclSupport;
use super::step_loop::{replica_thread, ReplicaContext, ReplicaEvent, Work};
use super::{CheckpointAt, Factory, RestartRequested};

impl Agent {
    pub(super) async fn serve(
        mut self,
        args: &JoinArgs,
        nccl: NcclSupport,
        factory: Factory,
    ) -> anyhow::Result<()> {
        // 1. The session first, so that heartbeats flow while shards download and the
        //    replica builds.
        let (up, mut commands, live) = self.open_session().await?;

        // 2. The checkpoint to resume from, evaluation shards, the rendezvous, then the
        //    replica on its own thread.
        if let Some(step) = self.resume_global_step {
            let bytes = guarded(&live, self.fetch_checkpoint()).await?;
            tracing::info!(global_step = step, bytes = bytes.len(), "resuming from the job's checkpoint");
            self.job.resume = Some(Arc::new(bytes));
        }
        let val = guarded(&live, self.fetch_shard(Split::Validation, 0)).await?;
        let test = guarded(&live, self.fetch_shard(Split::Test, 0)).await?;
        let plan = self.rendezvous(args, &nccl, &live).await?;
        let (events_tx, mut events) = mpsc::unbounded_channel::<ReplicaEvent>();
        let (work_tx, work_rx) = std::sync::mpsc::channel::<Work>();
        let thread_job = self.job.clone();
        let checkpoint_now = Arc::new(AtomicBool::new(false));
        let thread_checkpoint_now = Arc::clone(&checkpoint_now);
        let replica_thread = std::thread::Builder::new()
            .name("replica".into())
            .spawn(move || {
                let context =
                    ReplicaContext { job: thread_job, val, test, checkpoint_now: thread_checkpoint_now };
                replica_thread(context, plan, factory, work_rx, events_tx)
            })
            .context("cannot start the replica thread")?;
        self.job.resume = None;

        // 3. Commands down, replica events up, until the coordinator says stop.
        // Whether the coordinator itself ended the session (with a stop): then there is no
        // answer to wait for after a failure.
        let mut stopped = false;
        let result = loop {
            tokio::select! {
                e = live.dead() => break Err(e),
                command = commands.recv() => {
                    let Some(command) = command else {
                        break Err(anyhow!("lost the coordinator: the session ended"));
                    };
                    match self.command(command, &live, &work_tx, &checkpoint_now).await {
                        Ok(None) => {}
                        Ok(Some(done)) => {
                            stopped = true;
                            break done;
                        }
                        Err(e) => break Err(e),
                    }
                }
                event = events.recv() => {
                    let Some(event) = event else {
                        break Err(anyhow!("the replica thread ended unexpectedly"));
                    };
                    if let Err(e) = self.event(event, &live, &up).await {
                        break Err(e);
                    }
                }
            }
        };
        match &result {
            Ok(()) => {
                drop(work_tx);
                // Idle after a successful stop, so this returns at once.
                let _ = replica_thread.join();
            }
            Err(e) if stopped || e.is::<RestartRequested>() => {}
            Err(e) => {
                // Best effort: tell the coordinator why, and give the message a moment to leave.
                // Cut to what the coordinator keeps of it, far below the message limit.
                let mut message = format!("{e:#}");
                trainer_proto::cut_error_message(&mut message);
                let msg = self.message(worker_message::Body::Error(WorkerError { message }));
                if up.try_send(msg).is_ok() {
                    // The coordinator may answer with a restart of the group: join it again
                    // rather than exit (a supervisor need not restart this process).
                    let restart = tokio::time::timeout(Duration::from_secs(3), async {
                        while let Some(command) = commands.recv().await {
                            if let coordinator_message::Body::Stop(stop) = command {
                                return stop.restart;
                            }
                        }
                        false
                    })
                    .await;
                    if restart == Ok(true) {
                        return Err(anyhow!(RestartRequested));
                    }
                }
            }
        }
        result
    }

    /// Opens the session stream first, so that heartbeats flow while shards download and the
    /// replica builds: a task reads the coordinator's commands (and notes that it is alive),
    /// another sends heartbeats up.
    async fn open_session(
        &mut self,
    ) -> anyhow::Result<(
        mpsc::Sender<WorkerMessage>,
        mpsc::UnboundedReceiver<coordinator_message::Body>,
        Arc<Liveness>,
    )> {
        let (up, up_rx) = mpsc::channel::<WorkerMessage>(1024);
        up.send(self.message(worker_message::Body::Hello(Hello {})))
            .await
            .map_err(|_| anyhow!("internal error: session channel closed"))?;
        let mut inbound = self
            .client
            .session(ReceiverStream::new(up_rx))
            .await
            .map_err(|s| status_error("the coordinator refused the session", s))?
            .into_inner();
        let live = Arc::new(Liveness::new(self.heartbeat_timeout));
        let (commands_tx, commands) = mpsc::unbounded_channel::<coordinator_message::Body>();
        let reader_live = Arc::clone(&live);
        tokio::spawn(async move {
            let reason = loop {
                match inbound.message().await {
                    Ok(Some(CoordinatorMessage { body: Some(body) })) => {
                        reader_live.touch();
                        // Seen here too, so that a restart during the start-up waits (shards,
                        // the rendezvous) rejoins instead of failing.
                        if let coordinator_message::Body::Stop(stop) = &body {
                            if stop.restart {
                                reader_live.restart_requested();
                            }
                        }
                        if !matches!(body, coordinator_message::Body::Heartbeat(_))
                            && commands_tx.send(body).is_err()
                        {
                            break "the agent stopped listening".to_string();
                        }
                    }
                    Ok(Some(CoordinatorMessage { body: None })) => {
                        break "protocol error: a command without a body".to_string()
                    }
                    Ok(None) => break "the coordinator closed the session".to_string(),
                    Err(s) => break format!("the session stream broke: {}", s.message()),
                }
            };
            reader_live.close(reason);
        });
        let heartbeat_up = up.clone();
        let heartbeat_identity = self.identity.clone();
        let interval = self.heartbeat_interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            loop {
                tick.tick().await;
                let beat = WorkerMessage {
                    worker: Some(heartbeat_identity.clone()),
                    body: Some(worker_message::Body::Heartbeat(Heartbeat {
                        sent_unix_ms: std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_millis() as u64),
                    })),
                };
                if heartbeat_up.send(beat).await.is_err() {
                    break;
                }
            }
        });
        Ok((up, commands, live))
    }

    /// Runs one command; `Some(result)` ends the session.
    async fn command(
        &mut self,
        command: coordinator_message::Body,
        live: &Liveness,
        work: &std::sync::mpsc::Sender<Work>,
        checkpoint_now: &AtomicBool,
    ) -> anyhow::Result<Option<anyhow::Result<()>>> {
        let send = |w: Work| work.send(w).map_err(|_| anyhow!("the replica thread ended unexpectedly"));
        match command {
            coordinator_message::Body::Heartbeat(_) => {}
            coordinator_message::Body::StartEpoch(s) => {
                let shard = guarded(live, self.fetch_shard(Split::Train, s.epoch)).await?;
                tracing::debug!(epoch = s.epoch, reviews = shard.len(), "train shard fetched");
                send(Work::Train { epoch: s.epoch, first_step: s.first_step, shard })?;
            }
            coordinator_message::Body::Evaluate(e) => {
                send(Work::Evaluate { split: split_to_evaluate(e.split)?, epoch: e.epoch })?
            }
            coordinator_message::Body::Checkpoint(c) => send(Work::Artifact {
                kind: ArtifactKind::Checkpoint,
                at: CheckpointAt { epoch: c.epoch, epoch_end: true, ..CheckpointAt::default() },
            })?,
            coordinator_message::Body::ExportModel(m) => send(Work::Artifact {
                kind: if m.kind == ArtifactKind::LastModel as i32 {
                    ArtifactKind::LastModel
                } else {
                    ArtifactKind::Model
                },
                at: CheckpointAt { epoch: m.epoch, epoch_end: true, ..CheckpointAt::default() },
            })?,
            coordinator_message::Body::KeepBest(k) => send(Work::KeepBest { epoch: k.epoch })?,
            coordinator_message::Body::LoadBest(l) => send(Work::LoadBest { epoch: l.epoch })?,
            // Read by the replica thread at its next step boundary.
            coordinator_message::Body::CheckpointNow(_) => checkpoint_now.store(true, Ordering::Release),
            coordinator_message::Body::Stop(stop) => {
                return Ok(Some(if stop.success {
                    tracing::info!(reason = %stop.reason, "the coordinator finished the job");
                    Ok(())
                } else if stop.restart {
                    tracing::info!(reason = %stop.reason, "the coordinator restarts the group");
                    Err(anyhow!(RestartRequested))
                } else {
                    Err(anyhow!(trainer_core::exit::Lost(format!(
                        "the coordinator stopped the job: {}",
                        stop.reason
                    ))))
                }));
            }
        }
        Ok(None)
    }

    /// Forwards one replica event to the coordinator.
    async fn event(
        &mut self,
        event: ReplicaEvent,
        live: &Liveness,
        up: &mpsc::Sender<WorkerMessage>,
    ) -> anyhow::Result<()> {
        let body = match event {
            ReplicaEvent::Ready(r) => worker_message::Body::Ready(r),
            ReplicaEvent::Step(s) => worker_message::Body::Step(s),
            ReplicaEvent::EpochDone(d) => worker_message::Body::EpochDone(d),
            ReplicaEvent::Eval(e) => worker_message::Body::Eval(e),
            ReplicaEvent::BestLoaded(b) => worker_message::Body::BestLoaded(b),
            ReplicaEvent::Artifact { kind, at, bytes } => {
                let (bytes, storage_error) = match guarded(live, self.upload(kind, at, bytes)).await? {
                    Ok(stored) => (stored, String::new()),
                    Err(storage_error) => (0, storage_error),
                };
                worker_message::Body::ArtifactDone(ArtifactDone {
                    kind: kind as i32,
                    epoch: at.epoch,
                    bytes,
                    step_in_epoch: at.step_in_epoch,
                    global_step: at.global_step,
                    epoch_end: at.epoch_end,
                    storage_error,
                })
            }
            ReplicaEvent::Failed { message, peer_lost: true } => {
                return Err(anyhow!(trainer_core::exit::Lost(message)))
            }
            ReplicaEvent::Failed { message, peer_lost: false } => bail!("{message}"),
        };
        let message = self.message(body);
        guarded(live, async { up.send(message).await.map_err(|_| anyhow!("the session stream is closed")) })
            .await
    }
}
