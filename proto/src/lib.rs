//! The coordinator/worker protocol (`trainer.v1`): generated messages and tonic services,
//! the protocol version, and the job-secret authentication shared by both sides; and the
//! byte layouts of the workers' ring handshake and op headers ([`ring_wire`]).

pub mod auth;
pub mod ring_wire;

/// Generated code of `proto/trainer/v1/trainer.proto`.
pub mod v1 {
    #![allow(clippy::large_enum_variant, clippy::doc_lazy_continuation)]
    tonic::include_proto!("trainer.v1");
}

pub use auth::{AuthError, ClientAuth, JobSecret, ServerAuth};

/// The protocol version a worker sends in `Register`; a coordinator refuses any other.
/// Bump it on every change that an old peer would misread.
pub const PROTOCOL_VERSION: u32 = 6;

/// The longest error text a worker sends and the coordinator keeps (a failure's message, a
/// storage error): far below the message limit, and still room for a whole error chain.
pub const MAX_ERROR_MESSAGE: usize = 16 * 1024;

/// `s` cut to at most `max` bytes at a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Cuts an error text to [`MAX_ERROR_MESSAGE`] bytes, saying how much went.
pub fn cut_error_message(message: &mut String) {
    if message.len() > MAX_ERROR_MESSAGE {
        let kept = truncate(message, MAX_ERROR_MESSAGE).to_string();
        let cut = message.len() - kept.len();
        *message = format!("{kept} [... {cut} more bytes cut]");
    }
}

/// How the message of an UploadArtifact status starts when the coordinator's storage refused
/// the artifact (with RESOURCE_EXHAUSTED): rank 0 then reports it in ArtifactDone and
/// trains on, rather than failing.
pub const STORAGE_FAILURE_PREFIX: &str = "storage: ";

/// Env var with the coordinator's address (`http://host:port` or `host:port`).
pub const COORDINATOR_ADDR_ENV: &str = "COORDINATOR_ADDR";
/// Env var with the per-job secret.
pub const JOB_SECRET_ENV: &str = "TRAINER_JOB_SECRET";
/// Env var naming a file that holds the per-job secret (a mounted Kubernetes Secret).
pub const JOB_SECRET_FILE_ENV: &str = "TRAINER_JOB_SECRET_FILE";
/// Env var naming the PEM CA certificate that workers verify the coordinator's TLS
/// certificate with (`worker join --tls-ca`, `coordinator --tls-ca` for local workers).
pub const TLS_CA_ENV: &str = "TRAINER_TLS_CA";
/// Env var with the rank a worker asks for (`worker join --rank`).
pub const RANK_ENV: &str = "TRAINER_RANK";
/// Set by a Kubernetes Indexed Job in every pod: the rank hint when TRAINER_RANK is unset.
pub const JOB_COMPLETION_INDEX_ENV: &str = "JOB_COMPLETION_INDEX";
/// Env var with the compute threads a local worker should use (the worker's `--threads`).
pub const THREADS_ENV: &str = "WORKER_THREADS";
/// The collective a local worker should prepare for: `auto`, `nccl` or `ring`.
pub const BACKEND_ENV: &str = "TRAINER_BACKEND";
/// The device a worker trains on instead of the job's (`cuda:N` for local worker N).
pub const DEVICE_ENV: &str = "WORKER_DEVICE";

/// Largest message either side accepts. Shard chunks stay far below it (about 1 MB); the
/// limit is there for one unusually long review, which always travels whole.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// Bytes of token data per shard chunk, at most (a single longer review travels alone).
pub const SHARD_CHUNK_TOKENS: usize = 256 * 1024;
/// Bytes per artifact upload chunk.
pub const ARTIFACT_CHUNK_BYTES: usize = 1024 * 1024;

/// Refuses `message` when it is over [`MAX_MESSAGE_BYTES`], with an error that says so and
/// names it (`what`). Call it before sending anything whose size the sender does not bound
/// by construction: over the limit, the receiver refuses the message anyway, but a client's
/// own limit only makes tonic reset the HTTP/2 stream ("h2 protocol error"), which names
/// nothing.
pub fn check_message_size<M: prost::Message>(what: &str, message: &M) -> Result<(), tonic::Status> {
    let len = message.encoded_len();
    if len > MAX_MESSAGE_BYTES {
        return Err(tonic::Status::out_of_range(format!(
            "{what} is {len} bytes; the gRPC message limit is {MAX_MESSAGE_BYTES} bytes"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_over_the_limit_are_named() {
        let at = v1::WorkerError { message: "x".repeat(MAX_MESSAGE_BYTES - 8) };
        assert!(prost::Message::encoded_len(&at) <= MAX_MESSAGE_BYTES);
        assert!(check_message_size("an error", &at).is_ok());
        let over = v1::WorkerError { message: "x".repeat(MAX_MESSAGE_BYTES) };
        let e = check_message_size("an error report", &over).unwrap_err();
        assert_eq!(e.code(), tonic::Code::OutOfRange);
        assert!(e.message().starts_with("an error report is 67108869 bytes"), "{}", e.message());
    }
}
