//! What the job looks like from outside while it runs: the Prometheus metrics that
//! `--metrics-listen` serves on `/metrics`, and the live state that the `GetJobStatus` RPC
//! (`coordinator status`) returns. The driver and the gRPC handlers update it; readers take a
//! snapshot. Heartbeat ages are computed when read, so a scrape never sees a stale age.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use anyhow::Context;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use trainer_proto::v1::{JobStatus, RankStatus, StepMetrics};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RankLabel {
    pub rank: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SplitLabel {
    pub split: &'static str,
}

/// What the job is doing; `trainer_job_state{state}` is 1 for the current one, 0 otherwise.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum JobState {
    Waiting,
    Training,
    Evaluating,
    Checkpointing,
    Restarting,
    Finished,
    Failed,
}

impl JobState {
    const ALL: [JobState; 7] = [
        JobState::Waiting,
        JobState::Training,
        JobState::Evaluating,
        JobState::Checkpointing,
        JobState::Restarting,
        JobState::Finished,
        JobState::Failed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            JobState::Waiting => "waiting",
            JobState::Training => "training",
            JobState::Evaluating => "evaluating",
            JobState::Checkpointing => "checkpointing",
            JobState::Restarting => "restarting",
            JobState::Finished => "finished",
            JobState::Failed => "failed",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

type FloatGauge = Gauge<f64, AtomicU64>;

fn seconds_histogram() -> Histogram {
    // 1 ms to about 65 s: a tiny CPU step up to a long NCCL step or checkpoint.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

struct Metrics {
    steps: Family<RankLabel, Counter>,
    tokens: Family<RankLabel, Counter>,
    examples: Family<RankLabel, Counter>,
    step_seconds: Family<RankLabel, Histogram, fn() -> Histogram>,
    allreduce_seconds: Family<RankLabel, Histogram, fn() -> Histogram>,
    comm_share: Family<RankLabel, FloatGauge>,
    loss: Family<RankLabel, FloatGauge>,
    learning_rate: FloatGauge,
    grad_norm: FloatGauge,
    eval_accuracy: Family<SplitLabel, FloatGauge>,
    eval_loss: Family<SplitLabel, FloatGauge>,
    workers_registered: Gauge,
    heartbeat_age: Family<RankLabel, FloatGauge>,
    restarts: Counter,
    resizes: Counter,
    world_size: Gauge,
    checkpoint_seconds: Histogram,
    epoch: Gauge,
    job_state: Family<StateLabel, Gauge>,
}

impl Metrics {
    fn register(registry: &mut Registry) -> Self {
        let m = Metrics {
            steps: Family::default(),
            tokens: Family::default(),
            examples: Family::default(),
            step_seconds: Family::new_with_constructor(seconds_histogram),
            allreduce_seconds: Family::new_with_constructor(seconds_histogram),
            comm_share: Family::default(),
            loss: Family::default(),
            learning_rate: FloatGauge::default(),
            grad_norm: FloatGauge::default(),
            eval_accuracy: Family::default(),
            eval_loss: Family::default(),
            workers_registered: Gauge::default(),
            heartbeat_age: Family::default(),
            restarts: Counter::default(),
            resizes: Counter::default(),
            world_size: Gauge::default(),
            checkpoint_seconds: seconds_histogram(),
            epoch: Gauge::default(),
            job_state: Family::default(),
        };
        // Counters get `_total` and units their suffix from the encoder (OpenMetrics rules).
        let r = registry;
        r.register("trainer_steps", "Optimizer steps finished, per rank", m.steps.clone());
        r.register("trainer_tokens", "Real (unpadded) tokens trained on, per rank", m.tokens.clone());
        r.register("trainer_examples", "Reviews trained on, per rank", m.examples.clone());
        r.register_with_unit(
            "trainer_step",
            "Wall time of one training step",
            Unit::Seconds,
            m.step_seconds.clone(),
        );
        r.register_with_unit(
            "trainer_allreduce",
            "Time inside collectives (gradient all-reduce) during one step",
            Unit::Seconds,
            m.allreduce_seconds.clone(),
        );
        r.register(
            "trainer_communication_share",
            "Share of step time spent in collectives over the current epoch (0 to 1)",
            m.comm_share.clone(),
        );
        r.register("trainer_loss", "Mean training loss of the rank's last step", m.loss.clone());
        r.register("trainer_learning_rate", "Learning rate of the last step", m.learning_rate.clone());
        r.register(
            "trainer_grad_norm",
            "L2 norm of the all-reduced gradient before clipping",
            m.grad_norm.clone(),
        );
        r.register(
            "trainer_eval_accuracy",
            "Accuracy of the last evaluation (0 to 1)",
            m.eval_accuracy.clone(),
        );
        r.register("trainer_eval_loss", "Mean loss of the last evaluation", m.eval_loss.clone());
        r.register(
            "trainer_workers_registered",
            "Workers registered in the current attempt",
            m.workers_registered.clone(),
        );
        r.register_with_unit(
            "trainer_worker_last_heartbeat_age",
            "Time since the coordinator last heard from the rank (its session is open)",
            Unit::Seconds,
            m.heartbeat_age.clone(),
        );
        r.register("trainer_restarts", "Restarts of the worker group from a checkpoint", m.restarts.clone());
        r.register(
            "trainer_resizes",
            "Changes of the world size (--workers MIN:MAX): the group went on with fewer or more workers",
            m.resizes.clone(),
        );
        r.register("trainer_world_size", "Workers (ranks) of the current attempt", m.world_size.clone());
        r.register_with_unit(
            "trainer_checkpoint",
            "Time from asking rank 0 for an epoch-end checkpoint to committing it",
            Unit::Seconds,
            m.checkpoint_seconds.clone(),
        );
        r.register("trainer_epoch", "Current epoch (1-based; 0 before training)", m.epoch.clone());
        r.register("trainer_job_state", "1 for the job's current state", m.job_state.clone());
        m
    }
}

#[derive(Debug, Clone, Default)]
struct RankLive {
    hostname: String,
    pid: u32,
    peer: String,
    ring_address: String,
    device: String,
    last_seen: Option<Instant>,
    epoch_tokens: u64,
    epoch_steps: u64,
    epoch_step_seconds: f64,
    epoch_comm_seconds: f64,
}

#[derive(Debug)]
struct Live {
    state: JobState,
    epoch: u64,
    epoch_started: Instant,
    step_in_epoch: u64,
    global_step: u64,
    /// When this attempt's training began and the global step it began at (for the ETA).
    pace_from: Option<(Instant, u64)>,
    attempt: u32,
    restarts: u32,
    resizes: u32,
    /// Ranks of the current attempt.
    world: usize,
    backend: String,
    loss: f64,
    val_accuracy: f64,
    ranks: Vec<RankLive>,
}

pub struct Telemetry {
    registry: Registry,
    metrics: Metrics,
    live: Mutex<Live>,
    started: Instant,
    epochs: u64,
    steps_per_epoch: u64,
}

impl Telemetry {
    pub fn new(world: usize, epochs: usize, steps_per_epoch: usize) -> Self {
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        let t = Self {
            registry,
            metrics,
            live: Mutex::new(Live {
                state: JobState::Waiting,
                epoch: 0,
                epoch_started: Instant::now(),
                step_in_epoch: 0,
                global_step: 0,
                pace_from: None,
                attempt: 0,
                restarts: 0,
                resizes: 0,
                world,
                backend: String::new(),
                loss: f64::NAN,
                val_accuracy: f64::NAN,
                ranks: vec![RankLive::default(); world],
            }),
            started: Instant::now(),
            epochs: epochs as u64,
            steps_per_epoch: steps_per_epoch as u64,
        };
        t.set_state(JobState::Waiting);
        t.metrics.world_size.set(world as i64);
        t
    }

    fn live(&self) -> MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn rank_label(rank: usize) -> RankLabel {
        RankLabel { rank: rank as u32 }
    }

    pub fn set_state(&self, state: JobState) {
        self.live().state = state;
        for s in JobState::ALL {
            self.metrics.job_state.get_or_create(&StateLabel { state: s.name() }).set(i64::from(s == state));
        }
    }

    /// A new attempt (the first, a restart or a resize) of `world` ranks, given anew.
    pub fn begin_attempt(&self, attempt: u32, restarts: u32, resizes: u32, world: usize) {
        let mut live = self.live();
        live.attempt = attempt;
        if restarts > live.restarts {
            self.metrics.restarts.inc_by(u64::from(restarts - live.restarts));
        }
        if resizes > live.resizes {
            self.metrics.resizes.inc_by(u64::from(resizes - live.resizes));
        }
        live.restarts = restarts;
        live.resizes = resizes;
        live.world = world;
        self.metrics.world_size.set(world as i64);
        live.pace_from = None;
        live.ranks = vec![RankLive::default(); world];
        self.metrics.workers_registered.set(0);
        self.metrics.heartbeat_age.clear();
    }

    pub fn registered(&self, rank: usize, hostname: &str, pid: u32, peer: Option<SocketAddr>) {
        let mut live = self.live();
        if let Some(r) = live.ranks.get_mut(rank) {
            r.hostname = hostname.to_string();
            r.pid = pid;
            r.peer = peer.map_or_else(String::new, |p| p.to_string());
        }
        self.metrics.workers_registered.inc();
    }

    pub fn rendezvous(&self, rank: usize, ring_address: &str, device: &str) {
        if let Some(r) = self.live().ranks.get_mut(rank) {
            r.ring_address = ring_address.to_string();
            r.device = device.to_string();
        }
    }

    /// The coordinator heard from `rank` (None: its session closed).
    pub fn seen(&self, rank: usize, at: Option<Instant>) {
        if let Some(r) = self.live().ranks.get_mut(rank) {
            r.last_seen = at;
        }
    }

    pub fn set_backend(&self, backend: &str) {
        self.live().backend = backend.to_string();
    }

    pub fn start_epoch(&self, epoch: u64, first_step: u64) {
        let mut live = self.live();
        live.epoch = epoch;
        live.epoch_started = Instant::now();
        live.step_in_epoch = first_step;
        live.global_step = epoch * self.steps_per_epoch + first_step;
        if live.pace_from.is_none() {
            live.pace_from = Some((Instant::now(), live.global_step));
        }
        for r in live.ranks.iter_mut() {
            (r.epoch_tokens, r.epoch_steps, r.epoch_step_seconds, r.epoch_comm_seconds) = (0, 0, 0.0, 0.0);
        }
        self.metrics.epoch.set(epoch as i64 + 1);
        drop(live);
        self.set_state(JobState::Training);
    }

    pub fn step(&self, rank: usize, m: &StepMetrics) {
        let label = Self::rank_label(rank);
        let mx = &self.metrics;
        mx.steps.get_or_create(&label).inc();
        mx.tokens.get_or_create(&label).inc_by(m.tokens);
        mx.examples.get_or_create(&label).inc_by(m.samples);
        mx.step_seconds.get_or_create(&label).observe(m.step_seconds);
        mx.allreduce_seconds.get_or_create(&label).observe(m.comm_seconds);
        let mean_loss = if m.samples > 0 { m.loss_sum / m.samples as f64 } else { f64::NAN };
        mx.loss.get_or_create(&label).set(mean_loss);
        let mut live = self.live();
        if let Some(r) = live.ranks.get_mut(rank) {
            r.epoch_tokens += m.tokens;
            r.epoch_steps += 1;
            r.epoch_step_seconds += m.step_seconds;
            r.epoch_comm_seconds += m.comm_seconds;
            let share =
                if r.epoch_step_seconds > 0.0 { r.epoch_comm_seconds / r.epoch_step_seconds } else { 0.0 };
            mx.comm_share.get_or_create(&label).set(share);
        }
        if rank == 0 {
            // The learning rate and the all-reduced gradient are the same on every rank.
            mx.learning_rate.set(m.lr);
            mx.grad_norm.set(m.grad_norm);
            if m.epoch == live.epoch {
                live.step_in_epoch = m.step + 1;
                live.global_step = m.epoch * self.steps_per_epoch + m.step + 1;
            }
        }
    }

    /// Rank 0's mean loss over the last logged steps (for `coordinator status`).
    pub fn set_loss(&self, loss: f64) {
        self.live().loss = loss;
    }

    pub fn eval(&self, split: &'static str, accuracy: f64, loss: f64) {
        self.metrics.eval_accuracy.get_or_create(&SplitLabel { split }).set(accuracy);
        self.metrics.eval_loss.get_or_create(&SplitLabel { split }).set(loss);
        if split == "validation" {
            self.live().val_accuracy = accuracy;
        }
    }

    pub fn checkpoint_took(&self, seconds: f64) {
        self.metrics.checkpoint_seconds.observe(seconds);
    }

    /// The exposition for `/metrics` (OpenMetrics text, which Prometheus reads).
    pub fn encode(&self) -> anyhow::Result<String> {
        {
            let live = self.live();
            for (rank, r) in live.ranks.iter().enumerate() {
                let label = Self::rank_label(rank);
                match r.last_seen {
                    Some(t) => {
                        self.metrics.heartbeat_age.get_or_create(&label).set(t.elapsed().as_secs_f64());
                    }
                    None => {
                        self.metrics.heartbeat_age.remove(&label);
                    }
                }
            }
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .context("cannot encode the Prometheus metrics")?;
        Ok(text)
    }

    /// A snapshot for the `GetJobStatus` RPC.
    pub fn status(&self) -> JobStatus {
        let live = self.live();
        let total_steps = self.epochs * self.steps_per_epoch;
        let eta_seconds = match live.pace_from {
            Some((since, from)) if live.global_step > from => {
                let per_step = since.elapsed().as_secs_f64() / (live.global_step - from) as f64;
                total_steps.saturating_sub(live.global_step) as f64 * per_step
            }
            _ if live.state == JobState::Finished => 0.0,
            _ => -1.0,
        };
        let epoch_seconds = live.epoch_started.elapsed().as_secs_f64().max(1e-9);
        let ranks: Vec<RankStatus> = live
            .ranks
            .iter()
            .enumerate()
            .map(|(rank, r)| RankStatus {
                rank: rank as u32,
                hostname: r.hostname.clone(),
                pid: r.pid,
                peer_address: r.peer.clone(),
                ring_address: r.ring_address.clone(),
                device: r.device.clone(),
                heartbeat_age_seconds: r.last_seen.map_or(-1.0, |t| t.elapsed().as_secs_f64()),
                tokens_per_second: r.epoch_tokens as f64 / epoch_seconds,
                steps_in_epoch: r.epoch_steps,
            })
            .collect();
        JobStatus {
            state: live.state.name().to_string(),
            epoch: live.epoch,
            epochs: self.epochs,
            step_in_epoch: live.step_in_epoch,
            steps_per_epoch: self.steps_per_epoch,
            global_step: live.global_step,
            total_steps,
            eta_seconds,
            world_size: live.world as u32,
            resizes: live.resizes,
            backend: live.backend.clone(),
            attempt: live.attempt,
            restarts: live.restarts,
            tokens_per_second: ranks.iter().map(|r| r.tokens_per_second).sum(),
            loss: live.loss,
            val_accuracy: live.val_accuracy,
            ranks,
            uptime_seconds: self.started.elapsed().as_secs_f64(),
        }
    }
}

/// Serves `GET /metrics` on `addr` until `stop` resolves; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    telemetry: Arc<Telemetry>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    use axum::http::{header, StatusCode};
    use axum::response::IntoResponse;

    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("--metrics-listen: cannot listen on {addr}"))?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let telemetry = Arc::clone(&telemetry);
            async move {
                match telemetry.encode() {
                    Ok(text) => (
                        StatusCode::OK,
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        text,
                    )
                        .into_response(),
                    Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")).into_response(),
                }
            }
        }),
    );
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stop).await {
            tracing::warn!(error = %e, "the metrics endpoint stopped with an error");
        }
    });
    Ok((bound, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_the_documented_names_and_labels() {
        let t = Telemetry::new(2, 3, 10);
        t.registered(1, "host", 42, None);
        t.seen(1, Some(Instant::now()));
        t.start_epoch(0, 0);
        let m = StepMetrics {
            epoch: 0,
            step: 0,
            loss_sum: 6.4,
            samples: 16,
            tokens: 900,
            step_seconds: 0.5,
            comm_seconds: 0.125,
            grad_norm: 1.5,
            lr: 0.001,
            correct: 9,
        };
        t.step(0, &m);
        t.step(1, &m);
        t.eval("validation", 0.75, 0.5);
        t.begin_attempt(1, 1, 1, 3);
        let text = t.encode().unwrap();
        for needle in [
            "trainer_steps_total{rank=\"0\"} 1",
            "trainer_tokens_total{rank=\"1\"} 900",
            "trainer_examples_total{rank=\"0\"} 16",
            "trainer_step_seconds_bucket{le=\"0.512\",rank=\"0\"} 1",
            "trainer_step_seconds_bucket{le=\"0.256\",rank=\"0\"} 0",
            "trainer_allreduce_seconds_count{rank=\"1\"} 1",
            "trainer_communication_share{rank=\"0\"} 0.25",
            "trainer_loss{rank=\"0\"} 0.4",
            "trainer_learning_rate 0.001",
            "trainer_grad_norm 1.5",
            "trainer_eval_accuracy{split=\"validation\"} 0.75",
            "trainer_restarts_total 1",
            "trainer_resizes_total 1",
            "trainer_world_size 3",
            "trainer_epoch 1",
            "trainer_job_state{state=\"training\"} 1",
            "# EOF",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
        let status = t.status();
        assert_eq!(
            (status.epoch, status.step_in_epoch, status.global_step, status.total_steps),
            (0, 1, 1, 30)
        );
        // The last attempt was a resize to 3 ranks.
        assert_eq!((status.ranks.len(), status.world_size, status.resizes), (3, 3, 1));
    }
}
