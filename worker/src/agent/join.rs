//! Registration: connect to the coordinator (retrying while it starts, while its name does
//! not resolve yet, or while this rank is still held by the worker this one replaces),
//! register, and take the job's config, rank and timing from its answer.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use tonic::codegen::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use trainer_core::JobConfig;
use trainer_proto::v1::coordinator_client::CoordinatorClient;
use trainer_proto::v1::{worker_message, Device, RegisterRequest, WorkerIdentity, WorkerMessage};
use trainer_proto::{ClientAuth, MAX_MESSAGE_BYTES, PROTOCOL_VERSION};

use super::args::{hostname, rank_device, seconds, JoinArgs};
use super::JobInfo;

pub(super) type Client = CoordinatorClient<InterceptedService<Channel, ClientAuth>>;

/// This rank's side of the job: the coordinator's client and what registration gave it.
pub(super) struct Agent {
    pub(super) client: Client,
    /// The optimizer step of the checkpoint this attempt resumes from.
    pub(super) resume_global_step: Option<u64>,
    pub(super) job: JobInfo,
    pub(super) identity: WorkerIdentity,
    pub(super) heartbeat_interval: Duration,
    pub(super) heartbeat_timeout: Duration,
}

pub(super) fn status_error(what: &str, status: tonic::Status) -> anyhow::Error {
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
    pub(super) async fn join(args: &JoinArgs) -> anyhow::Result<Self> {
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
        let mut config = JobConfig::from_toml_str(
            &reply.job_config_toml,
            std::path::Path::new("the job config the coordinator sent"),
        )
        .context("the coordinator sent a job config this worker cannot read")?;
        config.train.device = rank_device(args, &config.train.device);
        config.validate().context("the job config (with this worker's device) is invalid")?;
        if reply.world_size == 0 || reply.rank >= reply.world_size {
            bail!("the coordinator assigned rank {} of world size {}", reply.rank, reply.world_size);
        }
        // An elastic job (--workers MIN:MAX) treats hints as advisory: a hint beyond its world
        // size or taken gets a free rank. Anywhere else a different rank is a mistake.
        if !reply.rank_hint_advisory
            && rank_hint.is_some_and(|hint| hint != reply.rank && hint < reply.world_size)
        {
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
        if let Some(hint) = rank_hint.filter(|&h| h != reply.rank) {
            tracing::info!(
                hint,
                rank = reply.rank,
                world = reply.world_size,
                "rank hints are advisory in an elastic job: this one was beyond the world size or taken, so the worker took a free rank"
            );
        }
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

    pub(super) fn message(&self, body: worker_message::Body) -> WorkerMessage {
        WorkerMessage { worker: Some(self.identity.clone()), body: Some(body) }
    }
}
