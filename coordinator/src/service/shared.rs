//! What the gRPC handlers and the driver share: the ranks of the current attempt (who
//! holds each, their tokens, ring addresses and sessions), how a registering worker gets
//! its rank, and the identity check every later request passes.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tonic::Status;
use trainer_core::integrity::FileDigest;
use trainer_proto::v1::{CoordinatorMessage, WorkerIdentity};

use super::event::Event;
use crate::backend::{self, BackendChoice};
use crate::checkpoints::ResumeFrom;
use crate::job::JobData;
use crate::peer_input;
use crate::telemetry::Telemetry;

#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    pub rendezvous_timeout: Duration,
}

/// A registered rank of the current attempt.
pub(super) struct Slot {
    pub(super) token: String,
    /// Who holds it, for the error a duplicate rank hint gets.
    pub(super) pid: u32,
    pub(super) hostname: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RendezvousResult {
    pub attempt: u32,
    pub ring_addresses: Vec<String>,
    pub nccl_unique_id: Vec<u8>,
    pub ring_token: Vec<u8>,
    /// "ring" or "nccl", or why the requested backend cannot run.
    pub backend: Result<&'static str, String>,
}

#[derive(Default)]
pub(super) struct State {
    /// Restart attempt: 0 for the first group of workers, +1 for each restart.
    pub(super) attempt: u32,
    pub(super) resume: Option<ResumeFrom>,
    /// Per rank: the worker that holds it in this attempt.
    pub(super) slots: Vec<Option<Slot>>,
    pub(super) ring_addresses: Vec<Option<String>>,
    /// Per rank: what it can run (CUDA, NCCL and its version), from its rendezvous report.
    pub(super) collective_reports: Vec<backend::RankCollective>,
    pub(super) nccl_unique_id: Vec<u8>,
    pub(super) sessions: Vec<Option<mpsc::Sender<Result<CoordinatorMessage, Status>>>>,
}

impl State {
    /// No rank registered yet, for `world` ranks.
    fn fresh(world: usize, attempt: u32, resume: Option<ResumeFrom>) -> Self {
        Self {
            attempt,
            resume,
            slots: (0..world).map(|_| None).collect(),
            ring_addresses: vec![None; world],
            collective_reports: vec![backend::RankCollective::default(); world],
            sessions: (0..world).map(|_| None).collect(),
            ..State::default()
        }
    }
}

/// State shared by the gRPC handlers and the driver.
pub struct Shared {
    pub data: Arc<JobData>,
    pub timing: Timing,
    pub out_dir: PathBuf,
    pub backend: BackendChoice,
    /// `--workers MIN:MAX` with MIN < MAX: rank hints are advisory (a hint beyond the
    /// attempt's world size gets the lowest free rank), and a worker that comes while every
    /// rank is taken is told to wait for the next checkpoint.
    pub elastic: bool,
    /// Metrics and live state for /metrics and `coordinator status`.
    pub telemetry: Arc<Telemetry>,
    pub(super) config_toml: String,
    pub(super) state: Mutex<State>,
    /// The digest of every artifact stored in the run folder, by file name, until the
    /// driver commits it (checkpoints) or records it.
    pub(super) stored: Mutex<std::collections::HashMap<String, FileDigest>>,
    pub(super) events: mpsc::UnboundedSender<Event>,
    pub(super) rendezvous_done: watch::Sender<Option<Arc<RendezvousResult>>>,
}

pub(super) const SESSION_BUFFER: usize = 64;
pub(super) const NCCL_ID_BYTES: usize = 128;

impl Shared {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        data: Arc<JobData>,
        timing: Timing,
        out_dir: PathBuf,
        backend: BackendChoice,
        events: mpsc::UnboundedSender<Event>,
        resume: Option<ResumeFrom>,
        world: usize,
        elastic: bool,
    ) -> Arc<Self> {
        let config_toml = data.config.to_toml();
        let telemetry = Arc::new(Telemetry::new(world, data.config.train.epochs, data.steps_per_epoch));
        Arc::new(Self {
            telemetry,
            data,
            timing,
            out_dir,
            backend,
            elastic,
            config_toml,
            state: Mutex::new(State::fresh(world, 0, resume)),
            stored: Mutex::new(std::collections::HashMap::new()),
            events,
            rendezvous_done: watch::channel(None).0,
        })
    }

    /// Starts attempt `attempt` of `world` ranks: every rank is free again, the rendezvous is
    /// open, and old sessions are closed (their workers' streams end). `resume` is what the
    /// new workers restore before training.
    pub fn begin_attempt(&self, attempt: u32, resume: Option<ResumeFrom>, world: usize) {
        *self.state() = State::fresh(world, attempt, resume);
        self.rendezvous_done.send_replace(None);
    }

    /// The ranks of the current attempt.
    pub fn world(&self) -> usize {
        self.state().slots.len()
    }

    /// The digest of the artifact stored as `file_name` (once: the driver takes it when it
    /// commits the file).
    pub fn take_stored(&self, file_name: &str) -> Option<FileDigest> {
        self.stored.lock().unwrap_or_else(|p| p.into_inner()).remove(file_name)
    }

    pub(super) fn state(&self) -> MutexGuard<'_, State> {
        // A handler that panicked while holding the lock left plain data behind; keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn emit(&self, event: Event) {
        // The driver is gone only while the process is exiting.
        let _ = self.events.send(event);
    }

    /// Sends a command to one rank's session; false when it has no open session.
    pub async fn send(&self, rank: usize, message: CoordinatorMessage) -> bool {
        let tx = self.state().sessions.get(rank).and_then(Clone::clone);
        match tx {
            Some(tx) => tx.send(Ok(message)).await.is_ok(),
            None => false,
        }
    }

    /// Sends without waiting (heartbeats and stop messages): a full buffer drops it.
    pub fn try_send(&self, rank: usize, message: CoordinatorMessage) {
        if let Some(Some(tx)) = self.state().sessions.get(rank) {
            let _ = tx.try_send(Ok(message));
        }
    }

    /// Closes every session stream (after the stop messages).
    pub fn close_sessions(&self) {
        for s in self.state().sessions.iter_mut() {
            *s = None;
        }
    }

    /// Ranks that have not reported a rendezvous address yet.
    pub fn rendezvous_missing(&self) -> Vec<usize> {
        let st = self.state();
        (0..st.ring_addresses.len()).filter(|&r| st.ring_addresses[r].is_none()).collect()
    }

    pub(super) fn check_identity(&self, who: Option<&WorkerIdentity>) -> Result<usize, Status> {
        self.check_identity_in(&self.state(), who)
    }

    /// The rank `who` proves, checked against `st`: a handler that then changes `st` must
    /// hold the same guard, or a restart in between could let a worker of the attempt that
    /// just ended into the new one.
    pub(super) fn check_identity_in(
        &self,
        st: &State,
        who: Option<&WorkerIdentity>,
    ) -> Result<usize, Status> {
        let who = who.ok_or_else(|| Status::invalid_argument("the worker identity is missing"))?;
        let rank = who.rank as usize;
        if who.attempt != st.attempt {
            return Err(Status::failed_precondition(format!(
                "attempt {} is over; the job is at attempt {} (the group restarted: register again)",
                who.attempt, st.attempt
            )));
        }
        let slot = st.slots.get(rank).and_then(Option::as_ref).ok_or_else(|| {
            Status::failed_precondition(format!(
                "rank {rank} is not registered ({} of {} ranks are)",
                st.slots.iter().flatten().count(),
                st.slots.len()
            ))
        })?;
        let same = slot.token.len() == who.worker_token.len()
            && slot.token.bytes().zip(who.worker_token.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
        if !same {
            return Err(Status::permission_denied(format!(
                "the worker token does not belong to rank {rank}"
            )));
        }
        Ok(rank)
    }
}

/// The rank a registering worker gets in this attempt: its hint, or else the lowest free
/// rank. Ranks are handed out anew in every attempt, so a restarted worker with a hint gets
/// the same rank again; two workers with the same hint in one attempt are a mistake (or a
/// replaced pod that came back before the old one was declared lost: it may retry).
///
/// With --workers MIN:MAX hints are advisory: an attempt may have fewer ranks than there
/// are pod indices, and pods come and go. A hint that is beyond the world size, or taken,
/// gets the highest free rank, which leaves the low ranks to the pods whose index is in
/// range (after pod 1 of 3 is lost, pod 2 takes rank 1 and pod 0 still gets rank 0, in
/// whichever order they register); with no rank free it waits to be admitted.
pub(super) fn pick_rank(st: &State, hint: Option<u32>, world: usize, elastic: bool) -> Result<usize, Status> {
    let all_taken = || {
        Status::resource_exhausted(format!(
            "all {world} ranks of this job are taken (it runs with --workers {world})"
        ))
    };
    let mut free = st.slots.iter().enumerate().filter(|(_, slot)| slot.is_none()).map(|(rank, _)| rank);
    match hint {
        Some(hint) if elastic && st.slots.get(hint as usize).is_none_or(Option::is_some) => {
            free.next_back().ok_or_else(all_taken)
        }
        Some(hint) => {
            let rank = hint as usize;
            if rank >= world {
                return Err(Status::invalid_argument(format!(
                    "rank hint {hint} is out of range: this job has ranks 0 to {} (--workers {world})",
                    world - 1
                )));
            }
            match &st.slots[rank] {
                None => Ok(rank),
                Some(holder) => Err(Status::already_exists(format!(
                    "rank {rank} is already taken in attempt {} by pid {} on {}: every worker needs \
                     its own rank hint (--rank, TRAINER_RANK or JOB_COMPLETION_INDEX)",
                    st.attempt,
                    holder.pid,
                    truncate(&holder.hostname)
                ))),
            }
        }
        None => free.next().ok_or_else(all_taken),
    }
}

pub(super) fn truncate(s: &str) -> &str {
    peer_input::truncate(s, 64)
}

pub(super) fn new_token() -> String {
    let bytes: [u8; 16] = rand::random();
    hex::encode(bytes)
}

pub(super) fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

#[cfg(test)]
#[path = "shared_tests.rs"]
mod tests;
