//! The worker side of the coordinator's protocol (`worker join`).
//!
//! The agent registers with the coordinator, downloads this rank's validation and test
//! shards, meets the other ranks at the rendezvous, builds the ring collective, and hands it
//! to a [`Replica`] factory; then it keeps one session stream open (heartbeats up and down)
//! and runs the coordinator's commands: train an epoch on the shard it downloads for that
//! epoch, evaluate, keep a copy of the best model or switch to it, upload a checkpoint or
//! the model (rank 0), stop.
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

mod shard;
#[cfg(test)]
mod tests;
mod trainer_replica;

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::Args;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use trainer_core::{EncodedSplit, JobConfig};
use trainer_proto::v1::coordinator_client::CoordinatorClient;
use trainer_proto::v1::{
    coordinator_message, worker_message, ArtifactChunk, ArtifactDone, ArtifactKind, BestLoaded,
    CheckpointRequest, CoordinatorMessage, Device, EpochDone, EvalResult, Heartbeat, Hello, Ready,
    RegisterRequest, RendezvousRequest, ShardRequest, Split, StepMetrics, WorkerError, WorkerIdentity,
    WorkerMessage,
};
use trainer_proto::{
    ClientAuth, JobSecret, ARTIFACT_CHUNK_BYTES, COORDINATOR_ADDR_ENV, JOB_COMPLETION_INDEX_ENV,
    JOB_SECRET_ENV, JOB_SECRET_FILE_ENV, MAX_MESSAGE_BYTES, PROTOCOL_VERSION,
};

use crate::collective::nccl::NcclCollective;
use crate::collective::ring::{RingCollective, RingListener, RingOptions};
use crate::collective::{Collective, NoopCollective};
pub use crate::trainer::EvalCounts;

pub use shard::{append_chunk, check_totals};
pub use trainer_replica::TrainerReplica;

/// `worker join`: where the coordinator is and how to prove membership of the job.
#[derive(Debug, Clone, Args)]
pub struct JoinArgs {
    /// The coordinator's gRPC address (`host:port` or `http://host:port`)
    /// [default: MASTER_ADDR:MASTER_PORT, as Kubeflow's PyTorchJob sets them].
    #[arg(long, env = "COORDINATOR_ADDR")]
    pub coordinator: Option<String>,
    /// The per-job secret (prefer the env var or a file: command lines are visible to other
    /// users).
    #[arg(long, env = "TRAINER_JOB_SECRET", hide_env_values = true)]
    pub secret: Option<JobSecret>,
    /// A file that holds the job secret (a mounted Kubernetes Secret); one trailing newline
    /// is trimmed.
    #[arg(long, env = "TRAINER_JOB_SECRET_FILE", conflicts_with = "secret")]
    pub secret_file: Option<PathBuf>,
    /// The rank this worker asks for, so that pod i is rank i [default: JOB_COMPLETION_INDEX
    /// (a Kubernetes Indexed Job), else the coordinator's next free rank]. Every worker of a
    /// job needs its own; the coordinator refuses a duplicate or one beyond the world size.
    #[arg(long, env = "TRAINER_RANK")]
    pub rank: Option<u32>,
    /// PEM CA certificate to verify the coordinator's TLS certificate with: the channel is
    /// then TLS (`https://`), and a coordinator whose certificate this CA did not sign is
    /// refused.
    #[arg(long, env = "TRAINER_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Where this rank's ring listener binds (port 0 picks a free port).
    #[arg(long, env = "WORKER_RING_LISTEN", default_value = "127.0.0.1:0")]
    pub ring_listen: SocketAddr,
    /// Host name or IP the other ranks dial for this rank's ring listener [default: the
    /// listen IP; when listening on 0.0.0.0, POD_IP (the downward API's status.podIP), else
    /// this host's name].
    #[arg(long = "advertise-host", alias = "ring-advertise-host", env = "WORKER_ADVERTISE_HOST")]
    pub ring_advertise_host: Option<String>,
    /// Seconds a ring transfer may stall before the step fails.
    #[arg(long, env = "WORKER_RING_TIMEOUT", default_value_t = 30.0)]
    pub ring_timeout: f64,
    /// Seconds to keep trying to reach the coordinator and register at start-up: while its
    /// name does not resolve yet, nothing listens, or this rank is still held by the
    /// worker this one replaces. On a cluster, minutes of start-up skew are normal.
    #[arg(long, env = "WORKER_CONNECT_TIMEOUT", default_value_t = 600.0)]
    pub connect_timeout: f64,
    /// The device this rank trains on instead of the job's (`cpu`, `cuda`, `cuda:N`); local
    /// workers get `cuda:i` from the coordinator.
    #[arg(long, env = "WORKER_DEVICE")]
    pub device: Option<String>,
    /// This worker's index on its machine (torchrun's and PyTorchJob's LOCAL_RANK): with a
    /// GPU job and no --device, it trains on `cuda:LOCAL_RANK`.
    #[arg(long, env = "LOCAL_RANK")]
    pub local_rank: Option<usize>,
    /// The collective to prepare for: `auto`, `nccl` or `ring` (the coordinator decides at
    /// the rendezvous; `nccl` makes a missing NCCL library an error at start).
    #[arg(long, env = "TRAINER_BACKEND", default_value = "auto", value_parser = ["auto", "nccl", "ring"])]
    pub backend: String,
}

impl JoinArgs {
    /// The coordinator's address: --coordinator / COORDINATOR_ADDR, else
    /// MASTER_ADDR:MASTER_PORT (PyTorchJob's Master is the coordinator).
    pub fn coordinator_addr(&self) -> anyhow::Result<String> {
        coordinator_addr(self.coordinator.as_deref(), |name| std::env::var(name).ok())
    }

    /// The job secret: --secret / TRAINER_JOB_SECRET, else the file of --secret-file /
    /// TRAINER_JOB_SECRET_FILE.
    pub fn job_secret(&self) -> anyhow::Result<JobSecret> {
        match (&self.secret, &self.secret_file) {
            (Some(secret), _) => Ok(secret.clone()),
            (None, Some(path)) => {
                JobSecret::from_file(path).map_err(|e| anyhow!(trainer_core::exit::Usage(e.to_string())))
            }
            (None, None) => Err(anyhow!(trainer_core::exit::Usage(format!(
                "no job secret: set {JOB_SECRET_ENV} or {JOB_SECRET_FILE_ENV} (a mounted Secret), \
                 or pass --secret-file"
            )))),
        }
    }

    /// The rank to ask for: --rank / TRAINER_RANK, else JOB_COMPLETION_INDEX.
    pub fn rank_hint(&self) -> anyhow::Result<Option<u32>> {
        rank_hint(self.rank, |name| std::env::var(name).ok())
    }

    /// The host other ranks dial for this rank's ring listener bound at `bound`.
    fn advertise_host(&self, bound: SocketAddr) -> String {
        advertise_host(self.ring_advertise_host.as_deref(), bound, |name| std::env::var(name).ok())
    }
}

fn coordinator_addr(flag: Option<&str>, env: impl Fn(&str) -> Option<String>) -> anyhow::Result<String> {
    let set = |name: &str| env(name).filter(|v| !v.is_empty());
    if let Some(addr) = flag.filter(|a| !a.is_empty()) {
        return Ok(addr.to_string());
    }
    match (set("MASTER_ADDR"), set("MASTER_PORT")) {
        (Some(host), Some(port)) => {
            let port: u16 = port.parse().map_err(|_| {
                anyhow!(trainer_core::exit::Usage(format!("MASTER_PORT must be a port number, got {port:?}")))
            })?;
            Ok(if host.contains(':') && !host.starts_with('[') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            })
        }
        (Some(_), None) => Err(anyhow!(trainer_core::exit::Usage(
            "MASTER_ADDR is set but MASTER_PORT is not; set both, or COORDINATOR_ADDR".into()
        ))),
        _ => Err(anyhow!(trainer_core::exit::Usage(format!(
            "no coordinator address: pass --coordinator or set {COORDINATOR_ADDR_ENV} (or MASTER_ADDR \
             and MASTER_PORT, as PyTorchJob does)"
        )))),
    }
}

fn rank_hint(flag: Option<u32>, env: impl Fn(&str) -> Option<String>) -> anyhow::Result<Option<u32>> {
    if flag.is_some() {
        return Ok(flag);
    }
    match env(JOB_COMPLETION_INDEX_ENV).filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(index) => index.trim().parse().map(Some).map_err(|_| {
            anyhow!(trainer_core::exit::Usage(format!(
                "{JOB_COMPLETION_INDEX_ENV} must be a rank (0, 1, ...), got {index:?}"
            )))
        }),
    }
}

fn advertise_host(flag: Option<&str>, bound: SocketAddr, env: impl Fn(&str) -> Option<String>) -> String {
    if let Some(host) = flag.filter(|h| !h.is_empty()) {
        return host.to_string();
    }
    if !bound.ip().is_unspecified() {
        return bound.ip().to_string();
    }
    // A pod's own host name does not resolve in other pods; its IP always works.
    env("POD_IP").filter(|ip| !ip.is_empty()).unwrap_or_else(hostname)
}

/// What this process can offer the collective, found once at start.
#[derive(Debug, Clone)]
struct NcclSupport {
    available: bool,
    /// The loaded NCCL's version, sent at the rendezvous (ranks must agree).
    version: String,
}

/// Logs the devices and, on a GPU host, makes NCCL loadable (which may re-execute the
/// process once, see `collective::nccl_lib`).
fn prepare_devices(args: &JoinArgs) -> anyhow::Result<NcclSupport> {
    let cuda = crate::device::cuda_available();
    tracing::info!(
        cuda,
        cudnn = cuda && tch::Cuda::cudnn_is_available(),
        gpus = if cuda { tch::Cuda::device_count() } else { 0 },
        "devices"
    );
    if !cuda || args.backend == "ring" {
        return Ok(NcclSupport { available: false, version: String::new() });
    }
    match crate::collective::nccl_lib::ensure_nccl_loadable() {
        Ok(nccl) => {
            tracing::info!(library = %nccl.path.display(), version = %nccl.version, "NCCL in use");
            Ok(NcclSupport { available: true, version: nccl.version })
        }
        Err(e) if args.backend == "nccl" => Err(anyhow!(e).context("--backend nccl")),
        Err(e) => {
            tracing::warn!(error = %e, "NCCL unavailable; this worker can only use the ring");
            Ok(NcclSupport { available: false, version: String::new() })
        }
    }
}

/// The device string this rank trains on: --device, else cuda:LOCAL_RANK for a GPU job,
/// else the job's.
fn rank_device(args: &JoinArgs, job_device: &str) -> String {
    if let Some(device) = &args.device {
        return device.clone();
    }
    match args.local_rank {
        Some(local) if job_device != "cpu" && crate::device::cuda_available() => format!("cuda:{local}"),
        _ => job_device.to_string(),
    }
}

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

type Client = CoordinatorClient<InterceptedService<Channel, ClientAuth>>;

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

/// How the coordinator looks from here: the time of its last message, and whether its
/// session stream ended (with the reason).
struct Liveness {
    started: Instant,
    last_seen_ms: AtomicU64,
    closed: AtomicBool,
    reason: std::sync::Mutex<String>,
    timeout: Duration,
}

impl Liveness {
    fn touch(&self) {
        self.last_seen_ms.store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn close(&self, reason: String) {
        *self.reason.lock().unwrap_or_else(|p| p.into_inner()) = reason;
        self.closed.store(true, Ordering::Release);
    }

    /// Resolves (with the error to exit on) once the coordinator is gone.
    async fn dead(&self) -> anyhow::Error {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tick.tick().await;
            if self.closed.load(Ordering::Acquire) {
                let reason = self.reason.lock().unwrap_or_else(|p| p.into_inner()).clone();
                return anyhow!(trainer_core::exit::Lost(format!("lost the coordinator: {reason}")));
            }
            let silent = self.started.elapsed().as_millis() as u64
                - self.last_seen_ms.load(Ordering::Relaxed).min(self.started.elapsed().as_millis() as u64);
            if silent > self.timeout.as_millis() as u64 {
                return anyhow!(trainer_core::exit::Lost(format!(
                    "lost the coordinator: nothing heard for {:.1} s (heartbeat timeout {:.1} s)",
                    silent as f64 / 1000.0,
                    self.timeout.as_secs_f64()
                )));
            }
        }
    }
}

/// Runs `fut` unless the coordinator dies first.
async fn guarded<T>(
    live: &Liveness,
    fut: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::select! {
        r = fut => r,
        e = live.dead() => Err(e),
    }
}

struct Agent {
    client: Client,
    /// The optimizer step of the checkpoint this attempt resumes from.
    resume_global_step: Option<u64>,
    job: JobInfo,
    identity: WorkerIdentity,
    heartbeat_interval: Duration,
    heartbeat_timeout: Duration,
}

fn status_error(what: &str, status: tonic::Status) -> anyhow::Error {
    anyhow!("{what}: {} ({:?})", status.message(), status.code())
}

/// The coordinator's URI: `https://` with TLS, `http://` without; a scheme that
/// contradicts --tls-ca is refused rather than silently downgraded.
fn endpoint_uri(addr: &str, tls: bool) -> anyhow::Result<String> {
    let usage = |m: String| anyhow!(trainer_core::exit::Usage(m));
    match (addr.split_once("://").map(|(scheme, _)| scheme), tls) {
        (None, false) => Ok(format!("http://{addr}")),
        (None, true) => Ok(format!("https://{addr}")),
        (Some("http"), false) | (Some("https"), true) => Ok(addr.to_string()),
        (Some("http"), true) => {
            Err(usage(format!("--tls-ca is set but the coordinator address {addr} is http://")))
        }
        (Some("https"), false) => {
            Err(usage(format!("the coordinator address {addr} is https://: pass --tls-ca (TRAINER_TLS_CA)")))
        }
        (Some(other), _) => {
            Err(usage(format!("the coordinator address {addr} has an unknown scheme {other}://")))
        }
    }
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into the buffer we own.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let name = if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        String::new()
    };
    if name.is_empty() {
        "unknown-host".to_string()
    } else {
        name
    }
}

fn devices() -> Vec<Device> {
    let mut devices = vec![Device { kind: "cpu".into(), index: 0, name: String::new(), memory_bytes: 0 }];
    for index in 0..tch::Cuda::device_count().max(0) {
        devices.push(Device {
            kind: "cuda".into(),
            index: index as u32,
            name: String::new(),
            memory_bytes: 0,
        });
    }
    devices
}

/// `--flag SECONDS`, checked by the shared rule of `trainer_core::cli::seconds_flag`.
fn seconds(flag: &str, value: f64) -> anyhow::Result<Duration> {
    trainer_core::cli::seconds_flag(flag, value).map_err(anyhow::Error::msg)
}

/// An error with its causes, `a: b: c` (a transport error says little on its own; the
/// cause says whether the name did not resolve or the port refused).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Why a registration will be tried again.
struct Retry {
    why: String,
    /// The coordinator answered that the rank (or every rank) is taken.
    rank_taken: bool,
}

/// A refused registration: `Ok` when trying again may work, the error to exit with
/// otherwise.
fn register_retry(s: tonic::Status) -> anyhow::Result<Retry> {
    use tonic::Code;
    let code = s.code();
    let e = status_error("the coordinator refused the registration", s);
    match code {
        Code::Unavailable => Ok(Retry { why: format!("{e:#}"), rank_taken: false }),
        // A rank still held by the worker this one replaces, or every rank taken while the
        // group restarts.
        Code::AlreadyExists | Code::ResourceExhausted => {
            Ok(Retry { why: format!("{e:#}"), rank_taken: true })
        }
        Code::Unauthenticated => Err(anyhow!(trainer_core::exit::AuthFailed(format!("{e:#}")))),
        Code::InvalidArgument => Err(anyhow!(trainer_core::exit::Usage(format!("{e:#}")))),
        _ => Err(e),
    }
}

impl Agent {
    /// Connects (retrying while the coordinator starts) and registers.
    async fn join(args: &JoinArgs) -> anyhow::Result<Self> {
        let connect_timeout = seconds("connect-timeout", args.connect_timeout)?;
        let coordinator = args.coordinator_addr()?;
        let secret = args.job_secret()?;
        let rank_hint = args.rank_hint()?;
        let uri = endpoint_uri(&coordinator, args.tls_ca.is_some())?;
        let mut endpoint = Endpoint::from_shared(uri.clone())
            .map_err(|e| {
                anyhow!(trainer_core::exit::Usage(format!("bad coordinator address {coordinator:?}: {e}")))
            })?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true);
        if let Some(ca) = &args.tls_ca {
            let pem = std::fs::read(ca).map_err(|e| {
                anyhow!(trainer_core::exit::Usage(format!("--tls-ca: cannot read {}: {e}", ca.display())))
            })?;
            let tls = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(pem));
            endpoint = endpoint.tls_config(tls).map_err(|e| {
                anyhow!(trainer_core::exit::Usage(format!("--tls-ca {}: {}", ca.display(), chain(&e))))
            })?;
        }
        let deadline = Instant::now() + connect_timeout;
        let request = RegisterRequest {
            protocol_version: PROTOCOL_VERSION,
            build_version: env!("CARGO_PKG_VERSION").to_string(),
            hostname: hostname(),
            pid: std::process::id(),
            devices: devices(),
            rank_hint,
        };
        // Retry until the deadline: the name may not resolve yet (a pod not yet created), the
        // port may not listen yet, and a hinted rank may still be held by the worker this one
        // replaces until the coordinator declares it lost and restarts the group.
        let mut last_warning: Option<Instant> = None;
        let (client, reply) = loop {
            let retry = match endpoint.connect().await {
                // A certificate this CA did not sign (or that does not name the address) will
                // not change by waiting.
                Err(e) if chain(&e).contains("certificate") => {
                    return Err(anyhow!(trainer_core::exit::AuthFailed(format!(
                        "the coordinator at {uri} is not trusted: {}",
                        chain(&e)
                    ))))
                }
                Err(e) => Retry {
                    why: format!("cannot reach the coordinator at {uri}: {}", chain(&e)),
                    rank_taken: false,
                },
                Ok(channel) => {
                    let mut client = CoordinatorClient::with_interceptor(channel, ClientAuth::new(&secret))
                        .max_decoding_message_size(MAX_MESSAGE_BYTES)
                        .max_encoding_message_size(MAX_MESSAGE_BYTES);
                    match client.register(request.clone()).await {
                        Ok(reply) => break (client, reply.into_inner()),
                        Err(s) => register_retry(s)?,
                    }
                }
            };
            let why = &retry.why;
            if Instant::now() >= deadline {
                let e = format!(
                    "{why} (gave up after {:.0} s, --connect-timeout)",
                    connect_timeout.as_secs_f64()
                );
                // A rank that stays taken is a configuration mistake; an absent coordinator
                // may come back.
                return Err(if retry.rank_taken {
                    anyhow!(trainer_core::exit::Usage(e))
                } else {
                    anyhow!(trainer_core::exit::Lost(e))
                });
            }
            if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                tracing::warn!("{why}; retrying");
                last_warning = Some(Instant::now());
            } else {
                tracing::debug!("{why}; retrying");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        let mut config: JobConfig = toml::from_str(&reply.job_config_toml)
            .context("the coordinator sent a job config this worker cannot read")?;
        config.train.device = rank_device(args, &config.train.device);
        config.validate().context("the job config (with this worker's device) is invalid")?;
        if reply.world_size == 0 || reply.rank >= reply.world_size {
            bail!("the coordinator assigned rank {} of world size {}", reply.rank, reply.world_size);
        }
        if rank_hint.is_some_and(|hint| hint != reply.rank) {
            bail!(
                "asked for rank {} but the coordinator assigned rank {} (a coordinator that predates rank hints?)",
                rank_hint.unwrap_or_default(),
                reply.rank
            );
        }
        let ms = |v: u32| Duration::from_millis(u64::from(v.max(1)));
        let job = JobInfo {
            rank: reply.rank as usize,
            world_size: reply.world_size as usize,
            attempt: reply.attempt,
            config,
            vocab_size: reply.vocab_size as usize,
            vocab_fingerprint: reply.vocab_fingerprint,
            steps_per_epoch: reply.steps_per_epoch as usize,
            resume: None,
        };
        tracing::info!(rank = job.rank, world = job.world_size, attempt = reply.attempt, "registered");
        Ok(Self {
            client,
            resume_global_step: reply.resume.then_some(reply.resume_global_step),
            identity: WorkerIdentity {
                rank: reply.rank,
                attempt: reply.attempt,
                worker_token: reply.worker_token,
            },
            job,
            heartbeat_interval: ms(reply.heartbeat_interval_ms),
            heartbeat_timeout: ms(reply.heartbeat_timeout_ms),
        })
    }

    fn message(&self, body: worker_message::Body) -> WorkerMessage {
        WorkerMessage { worker: Some(self.identity.clone()), body: Some(body) }
    }

    async fn fetch_shard(&self, split: Split, epoch: u64) -> anyhow::Result<EncodedSplit> {
        let what = format!("{} shard", split.as_str_name());
        let mut stream = self
            .client
            .clone()
            .fetch_shard(ShardRequest { worker: Some(self.identity.clone()), split: split as i32, epoch })
            .await
            .map_err(|s| status_error(&format!("cannot fetch the {what}"), s))?
            .into_inner();
        let mut out = EncodedSplit { offsets: vec![0], ..EncodedSplit::default() };
        let mut totals: Option<(u64, u64)> = None;
        while let Some(chunk) =
            stream.message().await.map_err(|s| status_error(&format!("the {what} stream broke"), s))?
        {
            if chunk.split != split as i32 || chunk.epoch != epoch {
                bail!("the {what} stream sent a chunk of another split or epoch");
            }
            let t = (chunk.total_reviews, chunk.total_tokens);
            if *totals.get_or_insert(t) != t {
                bail!("the {what} stream changed its announced totals");
            }
            append_chunk(&mut out, &chunk, self.job.vocab_size)
                .map_err(|e| anyhow!("malformed {what}: {e}"))?;
        }
        let (reviews, tokens) = totals.ok_or_else(|| anyhow!("the {what} stream was empty"))?;
        check_totals(&out, reviews, tokens).map_err(|e| anyhow!("{what}: {e}"))?;
        Ok(out)
    }

    /// The checkpoint this attempt resumes from, streamed from the coordinator.
    async fn fetch_checkpoint(&self) -> anyhow::Result<Vec<u8>> {
        let mut stream = self
            .client
            .clone()
            .fetch_checkpoint(CheckpointRequest { worker: Some(self.identity.clone()) })
            .await
            .map_err(|s| status_error("cannot fetch the checkpoint to resume from", s))?
            .into_inner();
        let mut bytes = Vec::new();
        let mut total = None;
        while let Some(chunk) =
            stream.message().await.map_err(|s| status_error("the checkpoint stream broke", s))?
        {
            let t = *total.get_or_insert(chunk.total_bytes);
            if bytes.len() as u64 + chunk.data.len() as u64 > t {
                bail!("the checkpoint stream sent more than the {t} bytes it announced");
            }
            bytes.extend_from_slice(&chunk.data);
        }
        match total {
            Some(t) if t == bytes.len() as u64 => Ok(bytes),
            Some(t) => bail!("the checkpoint stream ended after {} of {t} bytes", bytes.len()),
            None => bail!("the checkpoint stream was empty"),
        }
    }

    async fn upload(&self, kind: ArtifactKind, at: CheckpointAt, bytes: Vec<u8>) -> anyhow::Result<u64> {
        let epoch = at.epoch;
        let total = bytes.len() as u64;
        let identity = self.identity.clone();
        let mut chunks: Vec<ArtifactChunk> = bytes
            .chunks(ARTIFACT_CHUNK_BYTES)
            .map(|data| ArtifactChunk { data: data.to_vec(), ..ArtifactChunk::default() })
            .collect();
        if chunks.is_empty() {
            chunks.push(ArtifactChunk::default());
        }
        chunks[0].worker = Some(identity);
        chunks[0].kind = kind as i32;
        chunks[0].epoch = epoch;
        chunks[0].total_bytes = total;
        chunks[0].step_in_epoch = at.step_in_epoch;
        chunks[0].global_step = at.global_step;
        chunks[0].epoch_end = at.epoch_end;
        let reply = self
            .client
            .clone()
            .upload_artifact(tokio_stream::iter(chunks))
            .await
            .map_err(|s| status_error(&format!("cannot upload the {}", kind.as_str_name()), s))?
            .into_inner();
        if reply.bytes_written != total {
            bail!(
                "the coordinator stored {} of the {total} bytes of the {}",
                reply.bytes_written,
                kind.as_str_name()
            );
        }
        Ok(total)
    }

    async fn serve(mut self, args: &JoinArgs, nccl: NcclSupport, factory: Factory) -> anyhow::Result<()> {
        // 1. The session first, so that heartbeats flow while shards download and the
        //    replica builds.
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
        let live = Arc::new(Liveness {
            started: Instant::now(),
            last_seen_ms: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            reason: std::sync::Mutex::new(String::new()),
            timeout: self.heartbeat_timeout,
        });
        let (commands_tx, mut commands) = mpsc::unbounded_channel::<coordinator_message::Body>();
        let reader_live = Arc::clone(&live);
        tokio::spawn(async move {
            let reason = loop {
                match inbound.message().await {
                    Ok(Some(CoordinatorMessage { body: Some(body) })) => {
                        reader_live.touch();
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

        // 2. The checkpoint to resume from, evaluation shards, the rendezvous, then the
        //    replica on its own thread.
        if let Some(step) = self.resume_global_step {
            let bytes = guarded(&live, self.fetch_checkpoint()).await?;
            tracing::info!(global_step = step, bytes = bytes.len(), "resuming from the job's checkpoint");
            self.job.resume = Some(Arc::new(bytes));
        }
        let val = guarded(&live, self.fetch_shard(Split::Validation, 0)).await?;
        let test = guarded(&live, self.fetch_shard(Split::Test, 0)).await?;
        let listener = RingListener::bind(args.ring_listen)
            .with_context(|| format!("cannot bind the ring listener on {}", args.ring_listen))?;
        let bound = listener.local_addr();
        let host = args.advertise_host(bound);
        let advertised = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]:{}", bound.port())
        } else {
            format!("{host}:{}", bound.port())
        };
        // The device decides what this rank can offer: rank 0 on a GPU with NCCL makes the
        // NCCL id, which the coordinator relays if it picks NCCL.
        let device = crate::device::resolve_device(&self.job.config.train.device)?;
        tracing::info!(device = %crate::device::device_name(device), "training device");
        let nccl_ready = nccl.available && device.is_cuda();
        let nccl_unique_id = if nccl_ready && self.job.rank == 0 {
            crate::collective::nccl::new_unique_id()?
        } else {
            Vec::new()
        };
        let mut client = self.client.clone();
        let rendezvous = guarded(&live, async {
            client
                .rendezvous(RendezvousRequest {
                    worker: Some(self.identity.clone()),
                    ring_address: advertised.clone(),
                    nccl_unique_id,
                    device: crate::device::device_name(device),
                    nccl_available: nccl_ready,
                    nccl_version: if nccl_ready { nccl.version.clone() } else { String::new() },
                })
                .await
                .map(tonic::Response::into_inner)
                .map_err(|s| status_error("the rendezvous failed", s))
        })
        .await?;
        if rendezvous.ring_addresses.len() != self.job.world_size {
            bail!(
                "the rendezvous returned {} addresses for a world of {}",
                rendezvous.ring_addresses.len(),
                self.job.world_size
            );
        }
        let peers = rendezvous
            .ring_addresses
            .iter()
            .enumerate()
            .map(|(rank, a)| {
                a.to_socket_addrs()
                    .ok()
                    .and_then(|mut it| it.next())
                    .ok_or_else(|| anyhow!("cannot resolve rank {rank}'s ring address {a:?}"))
            })
            .collect::<anyhow::Result<Vec<SocketAddr>>>()?;
        let mut ring_options = RingOptions::new(rendezvous.ring_token);
        ring_options.timeout = seconds("ring-timeout", args.ring_timeout)?;
        let plan = match rendezvous.backend.as_str() {
            "nccl" => {
                let tch::Device::Cuda(ordinal) = device else {
                    bail!("the coordinator chose NCCL, but this rank trains on the CPU");
                };
                CollectivePlan::Nccl {
                    ordinal,
                    unique_id: rendezvous.nccl_unique_id,
                    timeout: ring_options.timeout,
                }
            }
            "ring" => CollectivePlan::Ring { listener, peers, options: ring_options },
            other => bail!("the coordinator chose an unknown collective {other:?}"),
        };
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
                let msg =
                    self.message(worker_message::Body::Error(WorkerError { message: format!("{e:#}") }));
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
                let split = Split::try_from(e.split)
                    .ok()
                    .filter(|s| matches!(s, Split::Validation | Split::Test))
                    .ok_or_else(|| anyhow!("the coordinator asked to evaluate split {}", e.split))?;
                send(Work::Evaluate { split, epoch: e.epoch })?;
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
                let bytes = guarded(live, self.upload(kind, at, bytes)).await?;
                worker_message::Body::ArtifactDone(ArtifactDone {
                    kind: kind as i32,
                    epoch: at.epoch,
                    bytes,
                    step_in_epoch: at.step_in_epoch,
                    global_step: at.global_step,
                    epoch_end: at.epoch_end,
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

/// The coordinator asked this worker to register again: the group restarts from the last
/// checkpoint. `worker join` then starts over as a fresh process.
#[derive(Debug, thiserror::Error)]
#[error("the coordinator restarts the group; joining again")]
pub struct RestartRequested;

/// Work for the replica thread, one item at a time, in the coordinator's order.
enum Work {
    Train { epoch: u64, first_step: u64, shard: EncodedSplit },
    Evaluate { split: Split, epoch: u64 },
    Artifact { kind: ArtifactKind, at: CheckpointAt },
    KeepBest { epoch: u64 },
    LoadBest { epoch: u64 },
}

enum ReplicaEvent {
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
struct ReplicaContext {
    job: JobInfo,
    val: EncodedSplit,
    test: EncodedSplit,
    /// Set by a CheckpointNow command; rank 0 checkpoints at its next step boundary.
    checkpoint_now: Arc<AtomicBool>,
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

/// How to build this rank's collective, as decided at the rendezvous.
enum CollectivePlan {
    Ring { listener: RingListener, peers: Vec<SocketAddr>, options: RingOptions },
    Nccl { ordinal: usize, unique_id: Vec<u8>, timeout: Duration },
}

fn connect_collective(job: &JobInfo, plan: CollectivePlan) -> anyhow::Result<Box<dyn Collective>> {
    Ok(match plan {
        CollectivePlan::Ring { listener, .. } if job.world_size == 1 => {
            drop(listener);
            Box::new(NoopCollective)
        }
        CollectivePlan::Ring { listener, peers, options } => Box::new(
            RingCollective::connect(listener, job.rank, job.world_size, &peers, options)
                .map_err(|e| anyhow!(e).context("cannot form the ring"))?,
        ),
        // Also at world size 1: the NCCL path is then exercised end to end on one GPU.
        CollectivePlan::Nccl { ordinal, unique_id, timeout } => Box::new(
            NcclCollective::new(ordinal, job.rank, job.world_size, &unique_id, timeout)
                .map_err(|e| anyhow!(e).context("cannot create the NCCL communicator"))?,
        ),
    })
}

fn replica_thread(
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
                replica
                    .evaluate(data)
                    .map(|c| {
                        ReplicaEvent::Eval(EvalResult {
                            split: split as i32,
                            epoch,
                            correct: c.correct,
                            total: c.total,
                            loss_sum: c.loss_sum,
                        })
                    })
                    .with_context(|| format!("evaluation on {} failed", split.as_str_name()))
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
