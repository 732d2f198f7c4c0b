//! `worker join`'s flags and where each falls back to the environment that Kubernetes,
//! PyTorchJob and torchrun set (MASTER_ADDR/MASTER_PORT, JOB_COMPLETION_INDEX, POD_IP).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::anyhow;
use clap::Args;
use trainer_proto::{
    JobSecret, COORDINATOR_ADDR_ENV, JOB_COMPLETION_INDEX_ENV, JOB_SECRET_ENV, JOB_SECRET_FILE_ENV,
};

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
    pub(super) fn advertise_host(&self, bound: SocketAddr) -> String {
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

/// This host's name (the coordinator's logs and status show it).
pub(super) fn hostname() -> String {
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

/// `--flag SECONDS`, checked by the shared rule of `trainer_core::cli::seconds_flag`.
pub(super) fn seconds(flag: &str, value: f64) -> anyhow::Result<Duration> {
    trainer_core::cli::seconds_flag(flag, value).map_err(anyhow::Error::msg)
}

/// The device string this rank trains on: --device, else cuda:LOCAL_RANK for a GPU job,
/// else the job's.
pub(super) fn rank_device(args: &JoinArgs, job_device: &str) -> String {
    if let Some(device) = &args.device {
        return device.clone();
    }
    match args.local_rank {
        Some(local) if job_device != "cpu" && crate::device::cuda_available() => format!("cuda:{local}"),
        _ => job_device.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: Vec<(String, String)> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    #[test]
    fn the_coordinator_address_falls_back_to_master_addr_and_port() {
        let none = env_of(&[]);
        assert_eq!(coordinator_addr(Some("c:1"), &none).unwrap(), "c:1");
        let master = env_of(&[("MASTER_ADDR", "job-master-0"), ("MASTER_PORT", "23456")]);
        assert_eq!(coordinator_addr(Some("c:1"), &master).unwrap(), "c:1");
        assert_eq!(coordinator_addr(None, &master).unwrap(), "job-master-0:23456");
        assert_eq!(coordinator_addr(Some(""), &master).unwrap(), "job-master-0:23456");
        let v6 = env_of(&[("MASTER_ADDR", "fd00::1"), ("MASTER_PORT", "23456")]);
        assert_eq!(coordinator_addr(None, &v6).unwrap(), "[fd00::1]:23456");
        for (env, says) in [
            (env_of(&[]), "COORDINATOR_ADDR"),
            (env_of(&[("MASTER_ADDR", "m")]), "MASTER_PORT is not"),
            (env_of(&[("MASTER_ADDR", "m"), ("MASTER_PORT", "http")]), "port number"),
        ] {
            let e = coordinator_addr(None, &env).unwrap_err();
            assert!(format!("{e:#}").contains(says), "{e:#}");
            assert_eq!(trainer_core::exit::code_for(e.chain()), trainer_core::exit::USAGE);
        }
    }

    #[test]
    fn the_rank_hint_comes_from_the_flag_or_the_completion_index() {
        assert_eq!(rank_hint(Some(3), env_of(&[("JOB_COMPLETION_INDEX", "1")])).unwrap(), Some(3));
        assert_eq!(rank_hint(None, env_of(&[("JOB_COMPLETION_INDEX", "1")])).unwrap(), Some(1));
        assert_eq!(rank_hint(None, env_of(&[])).unwrap(), None);
        let e = rank_hint(None, env_of(&[("JOB_COMPLETION_INDEX", "one")])).unwrap_err();
        assert!(format!("{e:#}").contains("JOB_COMPLETION_INDEX"), "{e:#}");
    }

    #[test]
    fn the_ring_advertises_the_pod_ip_not_a_host_name() {
        let any: SocketAddr = "0.0.0.0:7000".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        let pod = env_of(&[("POD_IP", "10.1.2.3")]);
        assert_eq!(advertise_host(Some("10.9.9.9"), any, &pod), "10.9.9.9");
        assert_eq!(advertise_host(None, any, &pod), "10.1.2.3");
        assert_eq!(advertise_host(None, local, &pod), "127.0.0.1");
        assert_eq!(advertise_host(None, any, env_of(&[])), hostname());
    }
}
