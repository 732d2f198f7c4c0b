//! Local worker processes: started with the coordinator's address, the job secret and their
//! share of the CPU threads in their environment; watched for exit; stopped on every exit
//! path (gracefully first, then SIGKILL; `kill_on_drop` covers the rest).

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::{mpsc, watch};
use trainer_proto::{
    JobSecret, BACKEND_ENV, COORDINATOR_ADDR_ENV, DEVICE_ENV, JOB_COMPLETION_INDEX_ENV, JOB_SECRET_ENV,
    JOB_SECRET_FILE_ENV, RANK_ENV, THREADS_ENV, TLS_CA_ENV,
};

use crate::progress::Output;
use crate::service::Event;

/// The `worker` binary next to this executable.
pub fn default_worker_bin() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the coordinator's own executable")?;
    let dir = exe.parent().context("the coordinator's executable has no parent folder")?;
    Ok(dir.join("worker"))
}

/// Compute threads per worker: the machine's cores divided evenly, at least one.
pub fn threads_per_worker(workers: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / workers.max(1)).max(1)
}

pub fn describe_exit(status: &std::io::Result<ExitStatus>) -> String {
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exited with status {code}"),
            (None, Some(sig)) => format!("was killed by signal {sig}{}", signal_name(sig)),
            (None, None) => "ended".to_string(),
        },
        Err(e) => format!("could not be waited for: {e}"),
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        2 => " (SIGINT)",
        6 => " (SIGABRT)",
        9 => " (SIGKILL)",
        11 => " (SIGSEGV)",
        15 => " (SIGTERM)",
        _ => "",
    }
}

/// What every local worker is started with (again at each restart of the group).
#[derive(Clone)]
pub struct WorkerLaunch {
    pub worker_bin: PathBuf,
    pub coordinator_addr: String,
    pub secret: JobSecret,
    /// Compute threads per worker.
    pub threads: usize,
    /// Worker i's device (`cuda:i`), or `None` for the job's own.
    pub devices: Vec<Option<String>>,
    /// `auto`, `nccl` or `ring`, for the worker to prepare NCCL or not.
    pub backend: &'static str,
    /// The CA the workers verify the coordinator's TLS certificate with.
    pub tls_ca: Option<PathBuf>,
}

struct Handle {
    pid: u32,
    kill: watch::Sender<bool>,
    exited: watch::Receiver<bool>,
}

pub struct LocalWorkers {
    handles: Vec<Handle>,
}

impl LocalWorkers {
    pub fn spawn(
        count: usize,
        launch: &WorkerLaunch,
        events: mpsc::UnboundedSender<Event>,
        output: Output,
    ) -> anyhow::Result<Self> {
        let WorkerLaunch { worker_bin, coordinator_addr, secret, threads, devices, backend, tls_ca } = launch;
        let mut workers = Self { handles: Vec::with_capacity(count) };
        for index in 0..count {
            let mut cmd = Command::new(worker_bin);
            cmd.arg("join")
                .env(COORDINATOR_ADDR_ENV, coordinator_addr)
                .env(JOB_SECRET_ENV, secret.expose())
                // The secret travels by value; a file inherited from a pod would conflict.
                .env_remove(JOB_SECRET_FILE_ENV)
                // Worker i is rank i (and trains on GPU i): logs, devices and ranks line up.
                // A pod's own JOB_COMPLETION_INDEX must not reach every local worker.
                .env(RANK_ENV, index.to_string())
                .env_remove(JOB_COMPLETION_INDEX_ENV)
                .env(THREADS_ENV, threads.to_string())
                // The worker prepares NCCL at start unless the ring is forced.
                .env(BACKEND_ENV, backend)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                // Its own process group: a terminal's Ctrl-C reaches the coordinator only,
                // which then stops the workers in order.
                .process_group(0)
                .kill_on_drop(true);
            if let Some(ca) = tls_ca {
                cmd.env(TLS_CA_ENV, ca);
            }
            if let Some(device) = devices.get(index).cloned().flatten() {
                cmd.env(DEVICE_ENV, device);
            }
            // A failed spawn drops `workers`, which kills the ones already started.
            let mut child = cmd
                .spawn()
                .with_context(|| format!("cannot start worker {index} from {}", worker_bin.display()))?;
            let pid = child.id().unwrap_or(0);
            tracing::debug!(index, pid, "worker process started");
            for stream in [
                child.stdout.take().map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
                child.stderr.take().map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            ]
            .into_iter()
            .flatten()
            {
                let output = output.clone();
                tokio::spawn(async move {
                    let mut lines = BufReader::new(stream).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        output.line(&format!("[worker pid {pid}] {line}"));
                    }
                });
            }
            let (kill_tx, mut kill_rx) = watch::channel(false);
            let (exited_tx, exited_rx) = watch::channel(false);
            let events = events.clone();
            tokio::spawn(async move {
                let status = tokio::select! {
                    status = child.wait() => status,
                    _ = async { let _ = kill_rx.wait_for(|k| *k).await; } => {
                        let _ = child.start_kill();
                        child.wait().await
                    }
                };
                let _ = events.send(Event::ChildExited { pid, status: describe_exit(&status) });
                let _ = exited_tx.send(true);
            });
            workers.handles.push(Handle { pid, kill: kill_tx, exited: exited_rx });
        }
        Ok(workers)
    }

    pub fn pids(&self) -> Vec<u32> {
        self.handles.iter().map(|h| h.pid).collect()
    }

    /// Waits up to `grace` for every worker to exit by itself, then kills the rest and waits
    /// for them to be gone.
    pub async fn shutdown(&mut self, grace: Duration) {
        let all_exited = |handles: &mut Vec<Handle>| {
            let waits: Vec<_> = handles
                .iter_mut()
                .map(|h| {
                    let mut rx = h.exited.clone();
                    async move {
                        let _ = rx.wait_for(|e| *e).await;
                    }
                })
                .collect();
            async move {
                for w in waits {
                    w.await;
                }
            }
        };
        if tokio::time::timeout(grace, all_exited(&mut self.handles)).await.is_ok() {
            return;
        }
        for h in &self.handles {
            if !*h.exited.borrow() {
                tracing::warn!(pid = h.pid, "worker did not stop in time; killing it");
            }
            let _ = h.kill.send(true);
        }
        if tokio::time::timeout(Duration::from_secs(5), all_exited(&mut self.handles)).await.is_err() {
            tracing::error!("some workers did not die after SIGKILL");
        }
    }
}

impl Drop for LocalWorkers {
    fn drop(&mut self) {
        // The watcher tasks kill on request; kill_on_drop covers a runtime that is gone.
        for h in &self.handles {
            let _ = h.kill.send(true);
        }
    }
}
