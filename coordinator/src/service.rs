//! The gRPC side of the coordinator: registration, shard streaming, rendezvous, the session
//! streams and artifact uploads. It validates every request and turns what workers say
//! into [`Event`]s for the job driver; it never decides anything about the job itself.

use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};
use trainer_proto::v1::coordinator_server::Coordinator;
use trainer_proto::v1::{
    worker_message, ArtifactChunk, ArtifactKind, CheckpointRequest, CoordinatorMessage, JobStatus,
    JobStatusRequest, RegisterRequest, RegisterResponse, RendezvousRequest, RendezvousResponse, ShardChunk,
    ShardRequest, Split, UploadArtifactResponse, WorkerMessage,
};
use trainer_proto::STORAGE_FAILURE_PREFIX;

use crate::backend;
use crate::job::for_each_chunk;
use crate::peer_input::{self, check_register, SessionLimits, MAX_ARTIFACT_BYTES};
use crate::run_dir::CommitError;
use trainer_core::integrity::{self, FileDigest};

mod event;
mod shared;
pub use event::Event;
use shared::{millis, new_token, pick_rank, truncate, Slot, NCCL_ID_BYTES, SESSION_BUFFER};
pub use shared::{RendezvousResult, Shared, Timing};

/// The tonic service; cheap to clone.
#[derive(Clone)]
pub struct CoordinatorService {
    shared: Arc<Shared>,
}

impl CoordinatorService {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let peer = request.remote_addr();
        let req = request.into_inner();
        check_register(&req)?;
        let sh = &self.shared;
        let (rank, token, attempt, resume, world) = {
            let mut st = sh.state();
            let world = st.slots.len();
            let rank = match pick_rank(&st, req.rank_hint, world, sh.elastic) {
                Err(e)
                    if sh.elastic
                        && e.code() == tonic::Code::ResourceExhausted
                        && world < sh.data.max_world =>
                {
                    sh.emit(Event::JoinWaiting { hostname: req.hostname.clone(), pid: req.pid });
                    return Err(Status::resource_exhausted(format!(
                        "the job runs at {world} of up to {} workers: this one is admitted at the next \
                         checkpoint (keep retrying)",
                        sh.data.max_world
                    )));
                }
                other => other?,
            };
            let token = new_token();
            st.slots[rank] =
                Some(Slot { token: token.clone(), pid: req.pid, hostname: req.hostname.clone() });
            (rank, token, st.attempt, st.resume.as_ref().map(|r| r.global_step), world)
        };
        sh.emit(Event::Registered { attempt, rank, hostname: req.hostname.clone(), pid: req.pid, peer });
        let (val, test) = (
            crate::job::eval_shard(sh.data.splits.val.len(), world, rank).len(),
            crate::job::eval_shard(sh.data.splits.test.len(), world, rank).len(),
        );
        Ok(Response::new(RegisterResponse {
            rank: rank as u32,
            world_size: world as u32,
            attempt,
            resume: resume.is_some(),
            resume_global_step: resume.unwrap_or(0),
            worker_token: token,
            job_config_toml: sh.config_toml.clone(),
            vocab_size: sh.data.vocab_size as u32,
            vocab_fingerprint: sh.data.vocab_fingerprint.clone(),
            heartbeat_interval_ms: millis(sh.timing.heartbeat_interval),
            heartbeat_timeout_ms: millis(sh.timing.heartbeat_timeout),
            rendezvous_timeout_ms: millis(sh.timing.rendezvous_timeout),
            validation_reviews: val as u32,
            test_reviews: test as u32,
            steps_per_epoch: sh.data.steps_per_epoch as u32,
            rank_hint_advisory: sh.elastic,
        }))
    }

    type FetchShardStream = BoxStream<ShardChunk>;

    async fn fetch_shard(
        &self,
        request: Request<ShardRequest>,
    ) -> Result<Response<Self::FetchShardStream>, Status> {
        let req = request.into_inner();
        let rank = self.shared.check_identity(req.worker.as_ref())?;
        let split = Split::try_from(req.split)
            .ok()
            .filter(|s| *s != Split::Unspecified)
            .ok_or_else(|| Status::invalid_argument(format!("unknown split {}", req.split)))?;
        if split == Split::Train && req.epoch >= self.shared.data.config.train.epochs as u64 {
            return Err(Status::invalid_argument(format!(
                "epoch {} is beyond the job's {} epochs",
                req.epoch, self.shared.data.config.train.epochs
            )));
        }
        let data = Arc::clone(&self.shared.data);
        let world = self.shared.world();
        let epoch = req.epoch;
        // Cut the chunks on a blocking thread; the bounded channel keeps only a few in memory.
        let (tx, rx) = mpsc::channel(4);
        tokio::task::spawn_blocking(move || match data.shard(split, rank, world, epoch) {
            Ok((source, indices)) => {
                for_each_chunk(source, &indices, split, epoch, |chunk| tx.blocking_send(Ok(chunk)).is_ok());
            }
            Err(e) => {
                let _ = tx.blocking_send(Err(Status::internal(format!("{e:#}"))));
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn rendezvous(
        &self,
        request: Request<RendezvousRequest>,
    ) -> Result<Response<RendezvousResponse>, Status> {
        let req = request.into_inner();
        let sh = &self.shared;
        let rank = sh.check_identity(req.worker.as_ref())?;
        peer_input::check_ring_address(&req.ring_address)?;
        if !req.nccl_unique_id.is_empty() {
            if rank != 0 {
                return Err(Status::invalid_argument("only rank 0 may send the NCCL unique id"));
            }
            if req.nccl_unique_id.len() != NCCL_ID_BYTES {
                return Err(Status::invalid_argument(format!(
                    "the NCCL unique id must be {NCCL_ID_BYTES} bytes, got {}",
                    req.nccl_unique_id.len()
                )));
            }
        }
        let attempt = {
            let mut st = sh.state();
            sh.check_identity_in(&st, req.worker.as_ref())?;
            if st.ring_addresses[rank].is_some() {
                return Err(Status::already_exists(format!(
                    "rank {rank} already reported its rendezvous address"
                )));
            }
            st.ring_addresses[rank] = Some(req.ring_address.clone());
            st.collective_reports[rank] = backend::RankCollective::new(
                req.device.starts_with("cuda"),
                req.nccl_available,
                truncate(&req.nccl_version),
            );
            if rank == 0 {
                st.nccl_unique_id = req.nccl_unique_id.clone();
            }
            sh.telemetry.rendezvous(rank, &req.ring_address, truncate(&req.device));
            if st.ring_addresses.iter().all(Option::is_some) {
                let backend =
                    backend::decide(sh.backend, &st.collective_reports, !st.nccl_unique_id.is_empty());
                tracing::info!(backend = ?backend, "collective chosen");
                let result = RendezvousResult {
                    attempt: st.attempt,
                    ring_addresses: st.ring_addresses.iter().flatten().cloned().collect(),
                    nccl_unique_id: st.nccl_unique_id.clone(),
                    ring_token: rand::random::<[u8; 32]>().to_vec(),
                    backend,
                };
                sh.rendezvous_done.send_replace(Some(Arc::new(result)));
            }
            st.attempt
        };
        tracing::debug!(rank, address = %req.ring_address, "rendezvous report");
        let mut done = sh.rendezvous_done.subscribe();
        let waited = tokio::time::timeout(
            sh.timing.rendezvous_timeout,
            done.wait_for(|r| r.as_ref().is_some_and(|r| r.attempt == attempt)),
        )
        .await;
        match waited {
            Ok(Ok(result)) => {
                let result = result
                    .as_ref()
                    .map(Arc::clone)
                    .ok_or_else(|| Status::internal("rendezvous finished without a result"))?;
                let backend = result.backend.clone().map_err(Status::failed_precondition)?;
                Ok(Response::new(RendezvousResponse {
                    ring_addresses: result.ring_addresses.clone(),
                    nccl_unique_id: result.nccl_unique_id.clone(),
                    ring_token: result.ring_token.clone(),
                    backend: backend.to_string(),
                }))
            }
            Ok(Err(_)) => Err(Status::unavailable("the coordinator is shutting down")),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "rendezvous timed out after {:.1} s: ranks {:?} did not report their address",
                sh.timing.rendezvous_timeout.as_secs_f64(),
                sh.rendezvous_missing()
            ))),
        }
    }

    type SessionStream = BoxStream<CoordinatorMessage>;

    async fn session(
        &self,
        request: Request<Streaming<WorkerMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let mut inbound = request.into_inner();
        let sh = Arc::clone(&self.shared);
        let first = tokio::time::timeout(sh.timing.heartbeat_timeout, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello on the session stream"))??
            .ok_or_else(|| Status::invalid_argument("the session ended before its hello"))?;
        if !matches!(first.body, Some(worker_message::Body::Hello(_))) {
            return Err(Status::invalid_argument("the first session message must be a hello"));
        }
        let (tx, rx) = mpsc::channel(SESSION_BUFFER);
        let (rank, attempt, world) = {
            let mut st = sh.state();
            let rank = sh.check_identity_in(&st, first.worker.as_ref())?;
            if st.sessions[rank].is_some() {
                return Err(Status::already_exists(format!("rank {rank} already has a session")));
            }
            st.sessions[rank] = Some(tx);
            (rank, st.attempt, st.slots.len())
        };
        let limits = SessionLimits::new(&sh.data, rank, world);
        sh.emit(Event::SessionOpened { attempt, rank });
        tokio::spawn(async move {
            let reason = loop {
                match inbound.message().await {
                    Ok(Some(msg)) => {
                        let from = msg.worker.as_ref().map(|w| w.rank as usize);
                        if from != Some(rank) {
                            break format!(
                                "protocol error: a message on rank {rank}'s session claims rank {from:?}"
                            );
                        }
                        let Some(mut body) = msg.body else {
                            break "protocol error: a session message without a body".into();
                        };
                        if let Err(why) = peer_input::check_session_body(&mut body, &limits) {
                            tracing::warn!(rank, attempt, reason = %why, "closing a session: bad message");
                            break format!("protocol error: rank {rank} sent {why}");
                        }
                        sh.emit(Event::Message { attempt, rank, body });
                    }
                    Ok(None) => break "the worker closed its session".to_string(),
                    Err(status) => break format!("the session stream broke: {}", status.message()),
                }
            };
            sh.emit(Event::SessionClosed { attempt, rank, reason });
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_job_status(
        &self,
        _request: Request<JobStatusRequest>,
    ) -> Result<Response<JobStatus>, Status> {
        Ok(Response::new(self.shared.telemetry.status()))
    }

    type FetchCheckpointStream = BoxStream<ArtifactChunk>;

    async fn fetch_checkpoint(
        &self,
        request: Request<CheckpointRequest>,
    ) -> Result<Response<Self::FetchCheckpointStream>, Status> {
        let req = request.into_inner();
        let resume = {
            let st = self.shared.state();
            self.shared.check_identity_in(&st, req.worker.as_ref())?;
            st.resume.clone()
        };
        let Some(resume) = resume else {
            return Err(Status::not_found(
                "this attempt starts fresh: there is no checkpoint to resume from",
            ));
        };
        // The file is checked again as it is read: the bytes a rank restores are the ones
        // recorded when the checkpoint was committed, or none at all.
        let file = resume.file.clone();
        let expected = resume.digest.clone();
        let bytes = tokio::task::spawn_blocking(move || match &expected {
            Some(digest) => digest.read_checked(&file).map_err(|e| e.to_string()),
            None => std::fs::read(&file).map_err(|e| format!("cannot read: {e}")),
        })
        .await
        .map_err(|e| Status::internal(format!("reading the checkpoint failed: {e}")))?
        .map_err(|e| {
            tracing::error!(file = %resume.file.display(), "the checkpoint to resume from failed its check: {e}");
            Status::data_loss(format!("{}: {e}", resume.file.display()))
        })?;
        let total = bytes.len() as u64;
        let sha256 = FileDigest::of_bytes(&bytes).sha256;
        let mut chunks: Vec<Result<ArtifactChunk, Status>> = bytes
            .chunks(trainer_proto::ARTIFACT_CHUNK_BYTES)
            .map(|data| {
                Ok(ArtifactChunk { total_bytes: total, data: data.to_vec(), ..ArtifactChunk::default() })
            })
            .collect();
        if let Some(Ok(first)) = chunks.first_mut() {
            first.sha256 = sha256;
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    async fn upload_artifact(
        &self,
        request: Request<Streaming<ArtifactChunk>>,
    ) -> Result<Response<UploadArtifactResponse>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("the upload carried no chunk"))?;
        let rank = self.shared.check_identity(first.worker.as_ref())?;
        if rank != 0 {
            return Err(Status::permission_denied(format!("only rank 0 uploads artifacts, not rank {rank}")));
        }
        let kind = ArtifactKind::try_from(first.kind)
            .ok()
            .filter(|k| *k != ArtifactKind::Unspecified)
            .ok_or_else(|| Status::invalid_argument(format!("unknown artifact kind {}", first.kind)))?;
        let file_name = match kind {
            ArtifactKind::Checkpoint => crate::checkpoints::file_name(first.global_step, first.epoch_end),
            ArtifactKind::LastModel => crate::run_dir::LAST_MODEL_FILE.to_string(),
            _ => crate::run_dir::MODEL_FILE.to_string(),
        };
        let file_name = file_name.as_str();
        if first.total_bytes > MAX_ARTIFACT_BYTES {
            return Err(Status::invalid_argument(format!(
                "artifact of {} bytes is over the {MAX_ARTIFACT_BYTES}-byte limit",
                first.total_bytes
            )));
        }
        let total = first.total_bytes;
        let expected_sha256 = (!first.sha256.is_empty()).then(|| first.sha256.clone());
        let out_dir = self.shared.out_dir.clone();
        let storage = |e: anyhow::Error| storage_status(e, &out_dir, file_name);
        let mut writer = crate::run_dir::ArtifactWriter::create(&out_dir, file_name).map_err(storage)?;
        tracing::debug!(file = file_name, bytes = total, "upload started");
        let mut written = 0u64;
        let mut chunk = Some(first);
        while let Some(c) = chunk {
            written += c.data.len() as u64;
            if written > total {
                return Err(Status::invalid_argument(format!(
                    "the upload of {file_name} sent more than the {total} bytes it declared"
                )));
            }
            writer.write(&c.data).map_err(storage)?;
            chunk = inbound.message().await.inspect_err(|e| {
                // The partial file is deleted with the writer; the last committed one stays.
                tracing::warn!(file = file_name, written, total, error = %e.message(), "upload broke off");
            })?;
        }
        if written != total {
            // Dropping the writer deletes the partial file; the previous artifact stays.
            return Err(Status::invalid_argument(format!(
                "the upload of {file_name} ended after {written} of {total} bytes"
            )));
        }
        let digest = match writer.commit(expected_sha256.as_deref()) {
            Ok(digest) => digest,
            Err(CommitError::Mismatch(m)) => return Err(Status::data_loss(m)),
            Err(CommitError::Io(e)) => return Err(storage(e)),
        };
        if kind != ArtifactKind::Checkpoint {
            // An exported model gets its sha256sum line beside it.
            integrity::write_sidecar(&out_dir.join(file_name), &digest)
                .map_err(|e| storage(anyhow::Error::new(e)))?;
        }
        tracing::debug!(file = file_name, bytes = written, sha256 = %digest.sha256, "artifact stored");
        self.shared.stored.lock().unwrap_or_else(|p| p.into_inner()).insert(file_name.to_string(), digest);
        Ok(Response::new(UploadArtifactResponse { bytes_written: written }))
    }
}

/// The status for a failed write of `file_name` into the run folder `dir`: a storage
/// failure (a full disk, a quota, a read-only or failing filesystem) is RESOURCE_EXHAUSTED
/// with the free space, so that rank 0 reports it and trains on; anything else INTERNAL.
fn storage_status(e: anyhow::Error, dir: &std::path::Path, file_name: &str) -> Status {
    let storage =
        e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(integrity::is_storage_error));
    if !storage {
        return Status::internal(format!("{e:#}"));
    }
    let free = integrity::free_bytes(dir).map_or("unknown".to_string(), integrity::human_bytes);
    tracing::warn!(file = file_name, free = %free, dir = %dir.display(), "cannot store {file_name}: {e:#}");
    Status::resource_exhausted(format!(
        "{STORAGE_FAILURE_PREFIX}cannot store {}: {e:#} ({free} free on {})",
        dir.join(file_name).display(),
        dir.display()
    ))
}
