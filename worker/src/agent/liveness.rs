//! Whether the coordinator is still there, as this rank sees it: the time of its last
//! message on the session stream, and whether that stream ended. Every wait on the
//! coordinator is [`guarded`] by it, so that a dead coordinator never leaves a rank hanging.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::anyhow;

/// How the coordinator looks from here: the time of its last message, and whether its
/// session stream ended (with the reason).
pub(super) struct Liveness {
    started: Instant,
    last_seen_ms: AtomicU64,
    closed: AtomicBool,
    /// The coordinator said that the group restarts (a stop with `restart`): a wait that the
    /// session's end cuts short is then a rejoin, not a loss.
    restart: AtomicBool,
    reason: std::sync::Mutex<String>,
    timeout: Duration,
}

impl Liveness {
    /// The coordinator counts as seen now; it is dead after `timeout` of silence.
    pub(super) fn new(timeout: Duration) -> Self {
        Self {
            started: Instant::now(),
            last_seen_ms: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            restart: AtomicBool::new(false),
            reason: std::sync::Mutex::new(String::new()),
            timeout,
        }
    }

    /// A message came from the coordinator.
    pub(super) fn touch(&self) {
        self.last_seen_ms.store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// The coordinator asked this rank to join the group again (it restarts or resizes).
    pub(super) fn restart_requested(&self) {
        self.restart.store(true, Ordering::Release);
    }

    /// The session stream ended, for `reason`.
    pub(super) fn close(&self, reason: String) {
        *self.reason.lock().unwrap_or_else(|p| p.into_inner()) = reason;
        self.closed.store(true, Ordering::Release);
    }

    /// Resolves (with the error to exit on) once the coordinator is gone.
    pub(super) async fn dead(&self) -> anyhow::Error {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tick.tick().await;
            if self.restart.load(Ordering::Acquire) {
                return anyhow!(super::RestartRequested);
            }
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
pub(super) async fn guarded<T>(
    live: &Liveness,
    fut: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::select! {
        r = fut => r,
        e = live.dead() => Err(e),
    }
}
