//! `coordinator status ADDR`: what a running job is doing, from the coordinator's
//! `GetJobStatus` RPC (with the job secret, like every RPC). For a job you did not start,
//! where `kubectl logs` would otherwise be the only view.

use std::fmt::Write;
use std::time::Duration;

use anyhow::{anyhow, Context};
use clap::Args;
use tonic::transport::Endpoint;
use trainer_proto::v1::coordinator_client::CoordinatorClient;
use trainer_proto::v1::{JobStatus, JobStatusRequest};
use trainer_proto::{ClientAuth, JobSecret, JOB_SECRET_ENV};

#[derive(Debug, Args)]
pub struct StatusCmd {
    /// The coordinator's gRPC address (host:port or http://host:port); the job secret comes
    /// from TRAINER_JOB_SECRET.
    addr: String,
    /// Print the status as one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: &StatusCmd) -> anyhow::Result<()> {
    let secret = std::env::var(JOB_SECRET_ENV)
        .ok()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| anyhow!("`coordinator status` needs the job secret in {JOB_SECRET_ENV}"))?;
    let secret =
        JobSecret::new(&secret).with_context(|| format!("{JOB_SECRET_ENV} is not a usable secret"))?;
    let uri = if cmd.addr.contains("://") { cmd.addr.clone() } else { format!("http://{}", cmd.addr) };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let status = runtime.block_on(async {
        let channel = Endpoint::from_shared(uri.clone())
            .with_context(|| format!("{uri} is not a valid address"))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .connect()
            .await
            .with_context(|| format!("cannot reach the coordinator at {uri}"))?;
        // The same explicit limits as the workers' client (the status of 1,000 ranks is
        // far below them).
        let mut client = CoordinatorClient::with_interceptor(channel, ClientAuth::new(&secret))
            .max_decoding_message_size(trainer_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(trainer_proto::MAX_MESSAGE_BYTES);
        let status = client
            .get_job_status(JobStatusRequest {})
            .await
            .map_err(|s| anyhow!("the coordinator at {uri} refused: {}", s.message()))?;
        anyhow::Ok(status.into_inner())
    })?;
    if cmd.json {
        println!("{}", serde_json::to_string_pretty(&to_json(&status))?);
    } else {
        print!("{}", render(&status));
    }
    Ok(())
}

fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

fn to_json(s: &JobStatus) -> serde_json::Value {
    serde_json::json!({
        "state": s.state,
        "epoch": s.epoch + 1,
        "epochs": s.epochs,
        "step_in_epoch": s.step_in_epoch,
        "steps_per_epoch": s.steps_per_epoch,
        "global_step": s.global_step,
        "total_steps": s.total_steps,
        "eta_seconds": (s.eta_seconds >= 0.0).then_some(s.eta_seconds),
        "world_size": s.world_size,
        "backend": s.backend,
        "attempt": s.attempt,
        "restarts": s.restarts,
        "resizes": s.resizes,
        "tokens_per_second": s.tokens_per_second,
        "loss": finite(s.loss),
        "val_accuracy": finite(s.val_accuracy),
        "uptime_seconds": s.uptime_seconds,
        "ranks": s.ranks.iter().map(|r| serde_json::json!({
            "rank": r.rank,
            "hostname": r.hostname,
            "pid": r.pid,
            "address": r.peer_address,
            "ring_address": r.ring_address,
            "device": r.device,
            "heartbeat_age_seconds": (r.heartbeat_age_seconds >= 0.0).then_some(r.heartbeat_age_seconds),
            "tokens_per_second": r.tokens_per_second,
            "steps_in_epoch": r.steps_in_epoch,
        })).collect::<Vec<_>>(),
    })
}

fn duration(seconds: f64) -> String {
    let s = seconds.round() as u64;
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{}m {:02}s", s / 60, s % 60),
        _ => format!("{}h {:02}m", s / 3600, (s % 3600) / 60),
    }
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

pub fn render(s: &JobStatus) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "job {}: epoch {}/{}, step {}/{} (global {}/{}), attempt {}, {} restart(s), {} resize(s)",
        s.state,
        s.epoch + 1,
        s.epochs,
        s.step_in_epoch,
        s.steps_per_epoch,
        s.global_step,
        s.total_steps,
        s.attempt,
        s.restarts,
        s.resizes
    );
    let _ = writeln!(
        out,
        "{} workers, backend {}, {:.0} tokens/s, loss {}, validation accuracy {}",
        s.world_size,
        or_dash(&s.backend),
        s.tokens_per_second,
        finite(s.loss).map_or("-".into(), |l| format!("{l:.4}")),
        finite(s.val_accuracy).map_or("-".into(), |a| format!("{a:.4}")),
    );
    let eta = if s.eta_seconds >= 0.0 { duration(s.eta_seconds) } else { "unknown yet".into() };
    let _ =
        writeln!(out, "ETA {eta} (training steps at the current pace), up {}", duration(s.uptime_seconds));
    let _ = writeln!(
        out,
        "{:>4}  {:<16} {:>7}  {:<21} {:<21} {:<7} {:>10} {:>10} {:>6}",
        "rank", "host", "pid", "address", "ring", "device", "heartbeat", "tokens/s", "steps"
    );
    for r in &s.ranks {
        let heartbeat = if r.heartbeat_age_seconds >= 0.0 {
            format!("{:.1} s ago", r.heartbeat_age_seconds)
        } else {
            "-".into()
        };
        let _ = writeln!(
            out,
            "{:>4}  {:<16} {:>7}  {:<21} {:<21} {:<7} {:>10} {:>10.0} {:>6}",
            r.rank,
            or_dash(&r.hostname),
            if r.pid == 0 { "-".to_string() } else { r.pid.to_string() },
            or_dash(&r.peer_address),
            or_dash(&r.ring_address),
            or_dash(&r.device),
            heartbeat,
            r.tokens_per_second,
            r.steps_in_epoch
        );
    }
    out
}
