//! `coordinator --workers N`: one data-parallel training job, from the corpus to the run
//! folder. Sets up the gRPC server, the local workers and the driver, and tears all of it
//! down on every exit path.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::Args;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::interceptor::InterceptedService;
use trainer_core::cli::{ConfigArgs, DataArgs};
use trainer_core::exit::{Storage, Usage};
use trainer_core::integrity;
use trainer_core::model_shape::ModelShape;
use trainer_core::pipeline::prepare;
use trainer_core::JobConfig;
use trainer_proto::v1::coordinator_server::CoordinatorServer;
use trainer_proto::{JobSecret, ServerAuth, JOB_SECRET_ENV, JOB_SECRET_FILE_ENV, MAX_MESSAGE_BYTES};

use crate::backend::{local_devices, visible_gpu_count, BackendChoice};
use crate::checkpoints::{self, JobCheckpoint, JobIdentity};
use crate::driver::{render_summary, Driver, FaultTolerance, LocalPool};
use crate::job::JobData;
use crate::launcher::{default_worker_bin, threads_per_worker, LocalWorkers, WorkerLaunch};
use crate::progress::{Output, Progress};
use crate::run_dir::RunDir;
use crate::service::{CoordinatorService, Event, Shared, Timing};

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Workers (ranks) in the job: N, or MIN:MAX for an elastic job that goes on with fewer
    /// workers after a loss (down to MIN) and takes more that join (up to MAX). Local
    /// workers: MAX are started. External: the job starts once MIN have registered and
    /// --rendezvous-wait has passed, or MAX are there.
    #[arg(long, env = "TRAINER_WORKERS", value_parser = parse_workers)]
    pub workers: Option<WorkerRange>,
    /// Elastic jobs with external workers: seconds to wait for more than MIN workers (up to
    /// MAX) once MIN have registered.
    #[arg(long, env = "COORDINATOR_RENDEZVOUS_WAIT", default_value_t = 10.0)]
    pub rendezvous_wait: f64,
    /// Elastic jobs: how many times the world size may change before a loss stops the job
    /// (a budget apart from --max-restarts).
    #[arg(long, env = "COORDINATOR_MAX_RESIZES", default_value_t = 10)]
    pub max_resizes: u32,
    /// The run folder: model, vocab, config, metrics, summary and the last checkpoint.
    #[arg(long, env = "TRAINER_OUT", default_value = "runs/latest")]
    pub out: PathBuf,
    /// Address the gRPC server listens on (port 0 picks a free one).
    #[arg(long, env = "COORDINATOR_LISTEN", default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Serve Prometheus metrics on http://ADDR/metrics (off by default; port 0 picks a free
    /// one, which the log names).
    #[arg(long, env = "COORDINATOR_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Address workers should dial [default: the listen address, 127.0.0.1 for 0.0.0.0].
    #[arg(long, env = "COORDINATOR_ADVERTISE")]
    pub advertise: Option<String>,
    /// Start no worker processes; wait for N workers started elsewhere (`worker join`).
    /// The job secret must then come from TRAINER_JOB_SECRET or TRAINER_JOB_SECRET_FILE.
    #[arg(long, env = "COORDINATOR_EXTERNAL_WORKERS")]
    pub external_workers: bool,
    /// Seconds to wait for all workers to register and open their sessions (on a cluster,
    /// image pulls and node autoscaling make minutes of start-up skew normal).
    #[arg(long, env = "COORDINATOR_REGISTER_TIMEOUT", default_value_t = 600.0)]
    pub register_timeout: f64,
    /// Seconds between heartbeats, both ways.
    #[arg(long, env = "COORDINATOR_HEARTBEAT_INTERVAL", default_value_t = 1.0)]
    pub heartbeat_interval: f64,
    /// Seconds of silence after which a worker (or, for a worker, the coordinator) is
    /// declared dead.
    #[arg(long, env = "COORDINATOR_HEARTBEAT_TIMEOUT", default_value_t = 10.0)]
    pub heartbeat_timeout: f64,
    /// Seconds a rendezvous waits for every rank to report its address.
    #[arg(long, env = "COORDINATOR_RENDEZVOUS_TIMEOUT", default_value_t = 120.0)]
    pub rendezvous_timeout: f64,
    /// The worker binary for local workers [default: `worker` next to this executable].
    #[arg(long, env = "COORDINATOR_WORKER_BIN")]
    pub worker_bin: Option<PathBuf>,
    /// Compute threads per local worker [default: the CPU cores divided by --workers].
    #[arg(long, env = "COORDINATOR_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    /// The collective: nccl (GPU memory, one GPU per worker), ring (TCP), or auto (NCCL when
    /// every worker has a GPU, the ring otherwise).
    #[arg(long, env = "TRAINER_BACKEND", value_enum, default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,
    /// Restart the whole group from the last checkpoint this many times when a worker is
    /// lost (dies, hangs, or a collective fails); 0 stops the job at the first loss.
    #[arg(long, env = "COORDINATOR_MAX_RESTARTS", default_value_t = 3)]
    pub max_restarts: u32,
    /// Seconds a restarted group has to register again (external workers are replaced by
    /// their supervisor in that time) [default: --register-timeout].
    #[arg(long, env = "COORDINATOR_REJOIN_TIMEOUT")]
    pub rejoin_timeout: Option<f64>,
    /// Checkpoints in a row that the run folder's storage may refuse (a full disk, a
    /// read-only or failing filesystem) before the job stops with exit 5; until then the
    /// last good checkpoint is kept and training goes on. Never spends a restart.
    #[arg(long, env = "COORDINATOR_CHECKPOINT_FAILURES", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub checkpoint_failures: u32,
    /// Seconds to checkpoint and stop after SIGTERM before exiting anyway (exit code 75).
    #[arg(long, env = "COORDINATOR_TERM_GRACE_SECONDS", default_value_t = 25.0)]
    pub term_grace_seconds: f64,
    /// Continue the job whose checkpoint is in --out: `--resume` (or `yes`) requires one,
    /// `auto` resumes when there is one and starts fresh otherwise, `no` refuses a folder
    /// that holds one. Without the flag, a folder with a checkpoint is refused.
    #[arg(long, env = "COORDINATOR_RESUME", value_enum, num_args = 0..=1, default_missing_value = "yes")]
    pub resume: Option<ResumeMode>,
    /// PEM certificate (chain) the gRPC server presents: with --tls-key, the channel is TLS
    /// and plaintext clients are refused. Its names must include the address workers dial.
    #[arg(long, env = "COORDINATOR_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "COORDINATOR_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate that signed --tls-cert, handed to local workers so that they verify
    /// the server (external workers take their own `worker join --tls-ca`).
    #[arg(long, env = "TRAINER_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub config: ConfigArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ResumeMode {
    Yes,
    Auto,
    No,
}

/// The checkpoint to resume from, after checking the flag and that it is this job's.
fn resume_from(
    out: &Path,
    mode: Option<ResumeMode>,
    identity: &JobIdentity,
) -> anyhow::Result<Option<JobCheckpoint>> {
    let existing = checkpoints::read(out)?;
    let Some(checkpoint) = existing else {
        if mode == Some(ResumeMode::Yes) {
            return Err(anyhow!(Usage(format!(
                "--resume: {} holds no checkpoint of a job ({} is missing); use --resume=auto to \
                 start fresh when there is none",
                out.display(),
                checkpoints::POINTER_FILE
            ))));
        }
        return Ok(None);
    };
    if matches!(mode, None | Some(ResumeMode::No)) {
        return Err(anyhow!(Usage(format!(
            "{} already holds a checkpoint of a job ({}); pass --resume to continue it, or choose \
             another --out",
            out.display(),
            checkpoint.describe()
        ))));
    }
    let differences = identity.differences(&checkpoint.job);
    if !differences.is_empty() {
        return Err(anyhow!(Usage(format!(
            "{} holds a checkpoint of another job (this run vs the checkpoint): {}",
            out.display(),
            differences.join("; ")
        ))));
    }
    // Its bytes are checked before anything uses them (a damaged file is set aside and the
    // previous checkpoint taken; none intact is exit 6).
    Ok(Some(checkpoints::verified(out, &checkpoint)?))
}

/// `--resume` at another world size goes on along the checkpoint's sequence of steps: unless
/// the config sets `train.global_batch_size`, the job keeps the checkpoint's global batch and
/// the new world size only changes each rank's share of it. A config that sets another
/// global batch is another job, refused by [`resume_from`] with the difference named.
fn keep_checkpoint_global_batch(
    out: &Path,
    mode: Option<ResumeMode>,
    config: &mut JobConfig,
    world: usize,
) -> anyhow::Result<()> {
    if matches!(mode, None | Some(ResumeMode::No)) || config.train.global_batch_size > 0 {
        return Ok(());
    }
    let Some(checkpoint) = checkpoints::read(out)? else { return Ok(()) };
    let theirs = &checkpoint.job;
    if theirs.world_size != world {
        let global_batch = theirs.config.train.global_batch(theirs.world_size);
        tracing::info!(
            checkpoint_world = theirs.world_size,
            world,
            global_batch,
            "resuming at another world size: the checkpoint's global batch is kept"
        );
        config.train.global_batch_size = global_batch;
    }
    Ok(())
}

/// Refuses a run folder that cannot be written (exit 5), before the corpus loads.
fn check_out_writable(out: &Path) -> anyhow::Result<()> {
    let probe = out.join(".write-probe");
    let written = std::fs::create_dir_all(out)
        .map_err(anyhow::Error::new)
        .and_then(|()| trainer_core::write_atomically(&probe, b"probe").map_err(anyhow::Error::new));
    let _ = std::fs::remove_file(&probe);
    written.map_err(|e| anyhow!(Storage(format!("--out {} is not writable: {e:#}", out.display()))))
}

/// Refuses a run folder without room for two checkpoints and the two model files (less
/// what this job's own files there already take), with the figures (exit 5).
fn check_out_space(out: &Path, config: &JobConfig, vocab_size: usize) -> anyhow::Result<()> {
    let shape = ModelShape::new(&config.model, vocab_size);
    // Parameters, Adam's two moments and the best model's copy.
    let checkpoint = shape.safetensors_bytes(4);
    let model = shape.safetensors_bytes(1);
    let ours: u64 = std::fs::read_dir(out)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
        .filter_map(|e| e.metadata().ok().map(|m| m.len()))
        .sum();
    let needed = (2 * checkpoint + 2 * model).saturating_sub(ours).max(checkpoint);
    let Some(free) = integrity::free_bytes(out) else {
        tracing::warn!(out = %out.display(), "cannot tell the free space of the run folder's filesystem");
        return Ok(());
    };
    if free < needed {
        return Err(anyhow!(Storage(format!(
            "--out {} has {} free, but this job needs about {} there: two checkpoints of about {} \
             and two model files of about {} ({} parameters){}; free space or choose another --out",
            out.display(),
            integrity::human_bytes(free),
            integrity::human_bytes(needed),
            integrity::human_bytes(checkpoint),
            integrity::human_bytes(model),
            shape.num_parameters(),
            if ours > 0 {
                format!(", less the {} its files there take", integrity::human_bytes(ours))
            } else {
                String::new()
            },
        ))));
    }
    tracing::info!(free = %integrity::human_bytes(free), needed = %integrity::human_bytes(needed), "run folder has room");
    Ok(())
}

/// Removes the folder it names on drop, if it is empty; [`RemoveIfEmpty::disarm`] keeps it.
struct RemoveIfEmpty(Option<PathBuf>);

impl RemoveIfEmpty {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveIfEmpty {
    fn drop(&mut self) {
        if let Some(dir) = &self.0 {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// `--flag SECONDS`, checked by the shared rule of `trainer_core::cli::seconds_flag`.
fn seconds(flag: &str, value: f64) -> anyhow::Result<Duration> {
    trainer_core::cli::seconds_flag(flag, value).map_err(|e| anyhow!(Usage(e)))
}

/// The gRPC server, with TLS when --tls-cert and --tls-key are given (read now, so that a
/// bad file is refused before the corpus loads).
fn grpc_server(args: &TrainArgs, local_workers: bool) -> anyhow::Result<(tonic::transport::Server, bool)> {
    let builder = tonic::transport::Server::builder();
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        return Ok((builder, false));
    };
    let read = |flag: &str, path: &PathBuf| {
        std::fs::read(path)
            .map_err(|e| anyhow!(Usage(format!("{flag}: cannot read {}: {e}", path.display()))))
    };
    let identity = tonic::transport::Identity::from_pem(read("--tls-cert", cert)?, read("--tls-key", key)?);
    if local_workers && args.tls_ca.is_none() {
        return Err(anyhow!(Usage(
            "--tls-cert with local workers needs --tls-ca, the CA they verify the server with".into()
        )));
    }
    let server =
        builder.tls_config(tonic::transport::ServerTlsConfig::new().identity(identity)).map_err(|e| {
            anyhow!(Usage(format!("--tls-cert/--tls-key ({}, {}): {e}", cert.display(), key.display())))
        })?;
    Ok((server, true))
}

/// The job secret: TRAINER_JOB_SECRET or the file TRAINER_JOB_SECRET_FILE names (required
/// with --external-workers), else a fresh random one for this job.
fn job_secret(external: bool) -> anyhow::Result<JobSecret> {
    match JobSecret::from_env().map_err(|e| anyhow!(Usage(e.to_string())))? {
        Some(secret) => Ok(secret),
        None if external => Err(anyhow!(Usage(format!(
            "--external-workers needs the job secret shared with the workers, in {JOB_SECRET_ENV} \
             or in a file named by {JOB_SECRET_FILE_ENV}"
        )))),
        None => {
            let bytes: [u8; 32] = rand::random();
            Ok(JobSecret::new(&hex::encode(bytes))?)
        }
    }
}

/// `--workers N` or `--workers MIN:MAX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerRange {
    pub min: usize,
    pub max: usize,
}

fn parse_workers(text: &str) -> Result<WorkerRange, String> {
    let number = |t: &str| -> Result<usize, String> {
        match t.trim().parse::<usize>() {
            Ok(n) if (1..=1024).contains(&n) => Ok(n),
            _ => Err(format!("{t:?} is not a number of workers from 1 to 1024")),
        }
    };
    let range = match text.split_once(':') {
        None => {
            let n = number(text)?;
            WorkerRange { min: n, max: n }
        }
        Some((min, max)) => WorkerRange { min: number(min)?, max: number(max)? },
    };
    if range.min > range.max {
        return Err(format!("MIN ({}) is above MAX ({}); write N or MIN:MAX", range.min, range.max));
    }
    Ok(range)
}

pub fn run(args: TrainArgs, output: Output) -> anyhow::Result<()> {
    let range = args
        .workers
        .context("--workers N is required to train (or run a subcommand such as `coordinator data`)")?;
    // The most workers the job runs with: local workers start with all of them.
    let workers = range.max;
    let elastic = range.min < range.max;
    let rendezvous_wait = seconds("rendezvous-wait", args.rendezvous_wait)?;
    let timing = Timing {
        heartbeat_interval: seconds("heartbeat-interval", args.heartbeat_interval)?,
        heartbeat_timeout: seconds("heartbeat-timeout", args.heartbeat_timeout)?,
        rendezvous_timeout: seconds("rendezvous-timeout", args.rendezvous_timeout)?,
    };
    if timing.heartbeat_timeout <= timing.heartbeat_interval {
        bail!("--heartbeat-timeout must be longer than --heartbeat-interval");
    }
    let register_timeout = seconds("register-timeout", args.register_timeout)?;
    let rejoin_timeout = match args.rejoin_timeout {
        Some(t) => seconds("rejoin-timeout", t)?,
        None => register_timeout,
    };
    let term_grace = seconds("term-grace-seconds", args.term_grace_seconds)?;
    let mut config = args.data.configure(args.config.resolve()?)?;
    let secret = job_secret(args.external_workers)?;
    let worker_bin = match (&args.worker_bin, args.external_workers) {
        (_, true) => None,
        (Some(bin), false) => Some(bin.clone()),
        (None, false) => Some(default_worker_bin()?),
    };
    let (server, tls) = grpc_server(&args, worker_bin.is_some())?;
    if let Some(bin) = &worker_bin {
        if !bin.is_file() {
            bail!(
                "the worker binary {} does not exist; build it (cargo build -p worker) or pass --worker-bin",
                bin.display()
            );
        }
    }

    // Refuse an impossible launch before loading anything or starting any worker.
    let devices = if worker_bin.is_some() {
        let gpus = visible_gpu_count();
        let devices = local_devices(args.backend, workers, gpus, &config.train.device)?;
        tracing::info!(gpus, backend = args.backend.name(), "devices for local workers: {devices:?}");
        devices
    } else {
        Vec::new()
    };
    // A run folder made here is removed (when still empty) if the job is refused before
    // its files are written, so that bad data leaves nothing behind.
    let made_out = RemoveIfEmpty((!args.out.exists()).then(|| args.out.clone()));
    check_out_writable(&args.out)?;
    let (corpus, report) = prepare(&args.data.prepare_options(&config))?;
    trainer_core::pipeline::log_corpus_ready(&corpus, &report);
    keep_checkpoint_global_batch(&args.out, args.resume, &mut config, workers)?;
    if elastic && config.train.global_batch_size == 0 {
        // One global batch for every world size the job may run at: MAX x batch_size.
        config.train.global_batch_size = workers * config.train.batch_size;
        tracing::info!(
            global_batch_size = config.train.global_batch_size,
            "elastic job: the global batch is fixed at --workers MAX x train.batch_size"
        );
    }
    let data = Arc::new(JobData::new(&corpus, config, workers)?);
    tracing::info!(
        workers,
        train = data.splits.train.len(),
        validation = data.splits.val.len(),
        test = data.splits.test.len(),
        vocab = data.vocab_size,
        steps_per_epoch = data.steps_per_epoch,
        "job planned"
    );
    let identity = JobIdentity {
        config: data.config.clone(),
        corpus: corpus.checksum.clone(),
        vocab_fingerprint: data.vocab_fingerprint.clone(),
        world_size: workers,
    };
    let resume = resume_from(&args.out, args.resume, &identity)?;
    check_out_space(&args.out, &data.config, data.vocab_size)?;
    if let Some(c) = &resume {
        tracing::info!(at = %c.describe(), restarts = c.progress.restarts, "resuming the job from its checkpoint");
    }
    let run_dir = RunDir::create(&args.out, &corpus, &data.config, resume.is_some())?;
    made_out.disarm();
    drop(corpus);
    let fault = FaultTolerance {
        max_restarts: args.max_restarts,
        rejoin_timeout,
        term_grace,
        identity,
        resume,
        checkpoint_failures: args.checkpoint_failures,
        min_world: range.min,
        max_world: range.max,
        max_resizes: args.max_resizes,
        rendezvous_wait,
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let job = Job {
        args,
        data,
        timing,
        register_timeout,
        secret,
        worker_bin,
        devices,
        run_dir,
        output,
        fault,
        server,
        tls,
    };
    // Dropping the runtime drops the launcher's tasks, whose children are killed on drop.
    runtime.block_on(job.run())
}

struct Job {
    args: TrainArgs,
    data: Arc<JobData>,
    timing: Timing,
    register_timeout: Duration,
    secret: JobSecret,
    worker_bin: Option<PathBuf>,
    /// The device of each local worker (empty with external workers).
    devices: Vec<Option<String>>,
    run_dir: RunDir,
    output: Output,
    fault: FaultTolerance,
    /// The gRPC server builder (with its TLS configuration, if any).
    server: tonic::transport::Server,
    tls: bool,
}

impl Job {
    async fn run(mut self) -> anyhow::Result<()> {
        let listener = TcpListener::bind(self.args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", self.args.listen))?;
        let local = listener.local_addr()?;
        let advertise = match &self.args.advertise {
            Some(a) => a.clone(),
            None if local.ip().is_unspecified() => format!("127.0.0.1:{}", local.port()),
            None => local.to_string(),
        };
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let resume = self.fault.resume.as_ref().map(|c| checkpoints::resume_from(self.run_dir.path(), c));
        let shared = Shared::new(
            Arc::clone(&self.data),
            self.timing,
            self.run_dir.path().to_path_buf(),
            self.args.backend,
            events_tx.clone(),
            resume,
            self.data.max_world,
            self.fault.is_elastic(),
        );

        // The gRPC server: the coordinator behind the job secret, and the standard health
        // service without it (it reveals nothing, and the kubelet's `grpc:` probe cannot
        // send metadata).
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<CoordinatorServer<CoordinatorService>>().await;
        let service = CoordinatorServer::new(CoordinatorService::new(Arc::clone(&shared)))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let service = InterceptedService::new(service, ServerAuth::new(self.secret.clone()));
        let (stop_server, server_stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(
            self.server.add_service(health_service).add_service(service).serve_with_incoming_shutdown(
                TcpListenerStream::new(listener),
                async {
                    let _ = server_stopped.await;
                },
            ),
        );
        tracing::info!(listen = %local, advertise = %advertise, tls = self.tls, "coordinator listening");

        // Prometheus: same lifetime as the gRPC server.
        let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
        let metrics_server = match self.args.metrics_listen {
            Some(addr) => {
                let stopped = async {
                    let _ = metrics_stopped.await;
                };
                let (bound, task) =
                    crate::telemetry::serve(addr, Arc::clone(&shared.telemetry), stopped).await?;
                tracing::info!(address = %bound, "metrics listening on http://{bound}/metrics");
                Some(task)
            }
            None => None,
        };

        // Ctrl-C and SIGTERM become events, so that the driver stops the workers in order.
        let signals = tokio::spawn(forward_signals(events_tx.clone()));

        let local = match &self.worker_bin {
            Some(bin) => {
                let threads =
                    self.args.worker_threads.unwrap_or_else(|| threads_per_worker(self.data.max_world));
                tracing::info!(workers = self.data.max_world, threads, bin = %bin.display(), "starting local workers");
                let launch = WorkerLaunch {
                    worker_bin: bin.clone(),
                    coordinator_addr: format!("{}://{advertise}", if self.tls { "https" } else { "http" }),
                    tls_ca: self.args.tls_ca.clone(),
                    secret: self.secret.clone(),
                    threads,
                    devices: self.devices.clone(),
                    backend: self.args.backend.name(),
                };
                let workers = LocalWorkers::spawn(
                    self.data.max_world,
                    &launch,
                    events_tx.clone(),
                    self.output.clone(),
                )?;
                Some(LocalPool { launch, workers, events: events_tx.clone(), output: self.output.clone() })
            }
            None => {
                tracing::info!(
                    workers = self.data.max_world,
                    address = %advertise,
                    "waiting for external workers"
                );
                None
            }
        };
        drop(events_tx);

        let progress = Progress::new(
            self.output.clone(),
            self.data.config.train.epochs,
            self.data.steps_per_epoch,
            self.data.config.train.log_every,
        );
        let run_dir_path = self.run_dir.path().to_path_buf();
        let mut driver = Driver::new(
            Arc::clone(&shared),
            events_rx,
            progress,
            self.run_dir,
            self.register_timeout,
            local,
            self.fault,
        );
        let result = driver.run().await;
        if let Err(e) = &result {
            shared.telemetry.set_state(crate::telemetry::JobState::Failed);
            driver.abort(&format!("{e:#}"));
        }
        driver.progress.finish();

        // Teardown, on every path: workers first (they got a stop message), then the server.
        // Workers got a stop message; after a failure they need not finish anything.
        let grace = if result.is_ok() { Duration::from_secs(10) } else { Duration::from_secs(2) };
        if let Some(pool) = driver.local.as_mut() {
            pool.workers.shutdown(grace).await;
        }
        shared.close_sessions();
        let _ = stop_server.send(());
        match tokio::time::timeout(Duration::from_secs(3), server).await {
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "gRPC server ended with an error"),
            Ok(_) => {}
            Err(_) => tracing::debug!("gRPC server did not drain in time"),
        }
        signals.abort();
        let _ = stop_metrics.send(());
        if let Some(task) = metrics_server {
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }

        let outcome = result?;
        print!("{}", render_summary(&outcome.summary, &driver.state.records, &run_dir_path));
        Ok(())
    }
}

/// Every Ctrl-C and SIGTERM, as events (the driver decides: a first SIGTERM checkpoints, a
/// second one or Ctrl-C stops at once).
async fn forward_signals(events: mpsc::UnboundedSender<Event>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            let _ = events.send(Event::Interrupted { signal: "SIGINT" });
            return;
        }
    };
    loop {
        let signal = tokio::select! {
            _ = tokio::signal::ctrl_c() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        };
        if events.send(Event::Interrupted { signal }).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_are_a_number_or_a_range() {
        assert_eq!(parse_workers("4"), Ok(WorkerRange { min: 4, max: 4 }));
        assert_eq!(parse_workers("2:4"), Ok(WorkerRange { min: 2, max: 4 }));
        assert!(parse_workers("4:2").unwrap_err().contains("MIN (4) is above MAX (2)"));
        assert!(parse_workers("0").unwrap_err().contains("from 1 to 1024"));
        assert!(parse_workers("2:x").unwrap_err().contains("\"x\" is not a number"));
        assert!(parse_workers("1:2000").is_err());
    }
}
