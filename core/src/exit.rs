//! Exit codes: a contract with supervisors (Kubernetes podFailurePolicy, JobSet, scripts).
//!
//! | code | meaning                                              | retry?    |
//! |------|------------------------------------------------------|-----------|
//! | 0    | done                                                 |           |
//! | 1    | anything else                                        | maybe     |
//! | 2    | usage or config error                                | no        |
//! | 3    | authentication failure (wrong job secret)            | no        |
//! | 4    | bad data (corpus, cache, vocabulary)                 | no        |
//! | 5    | storage: a full disk, a quota, a read-only or failing filesystem | no |
//! | 6    | no intact checkpoint to resume from                  | no        |
//! | 75   | a peer or the coordinator was lost (EX_TEMPFAIL)     | yes       |
//! | 130  | interrupted by Ctrl-C                                |           |
//!
//! Binaries mark errors with the types below (or return [`ConfigError`] / [`DataError`])
//! and map the first marked cause of an error chain with [`code_for`].

use crate::{ConfigError, DataError};

pub const USAGE: u8 = 2;
pub const AUTH: u8 = 3;
pub const BAD_DATA: u8 = 4;
pub const STORAGE: u8 = 5;
pub const CORRUPT_CHECKPOINT: u8 = 6;
pub const LOST: u8 = 75;
pub const OTHER: u8 = 1;
pub const INTERRUPTED: u8 = 130;

/// A peer or the coordinator was lost (retryable: exit 75).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Lost(pub String);

/// The job secret was refused (exit 3).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AuthFailed(pub String);

/// The run folder's storage failed in a way a retry on the same storage cannot fix: full,
/// over quota, read-only, or I/O errors (exit 5).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Storage(pub String);

/// Every checkpoint the job could resume from failed its check (exit 6).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CorruptCheckpoint(pub String);

/// A usage error found after argument parsing (exit 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(pub String);

/// The exit code for an error, from the first cause in `chain` that says what it is.
pub fn code_for<'a>(chain: impl IntoIterator<Item = &'a (dyn std::error::Error + 'static)>) -> u8 {
    for cause in chain {
        if cause.is::<Lost>() {
            return LOST;
        }
        if cause.is::<AuthFailed>() {
            return AUTH;
        }
        if cause.is::<Usage>() || cause.is::<ConfigError>() {
            return USAGE;
        }
        if cause.is::<Storage>() {
            return STORAGE;
        }
        if cause.is::<CorruptCheckpoint>() {
            return CORRUPT_CHECKPOINT;
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            if crate::integrity::is_storage_error(io) {
                return STORAGE;
            }
        }
        if let Some(data) = cause.downcast_ref::<DataError>() {
            return match data {
                DataError::Config(_) | DataError::Shard(_) => USAGE,
                DataError::Io { cause, .. }
                | DataError::Write { cause, .. }
                | DataError::CacheIo { cause, .. }
                    if crate::integrity::is_storage_error(cause) =>
                {
                    STORAGE
                }
                // The disk or the network, not the data: a retry may work.
                DataError::Io { .. }
                | DataError::Write { .. }
                | DataError::CacheIo { .. }
                | DataError::Download { .. } => OTHER,
                _ => BAD_DATA,
            };
        }
    }
    OTHER
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Box<dyn std::error::Error + 'static>);

    fn code(e: &(dyn std::error::Error + 'static)) -> u8 {
        let mut chain = vec![e];
        while let Some(next) = chain.last().and_then(|c| c.source()) {
            chain.push(next);
        }
        code_for(chain)
    }

    #[test]
    fn the_first_marked_cause_decides() {
        assert_eq!(code(&Lost("peer".into())), 75);
        assert_eq!(code(&Outer(Box::new(AuthFailed("secret".into())))), 3);
        let bad = DataError::EmptyReview { path: "c.tar.gz".into(), name: "1_2.txt".into() };
        assert_eq!(code(&Outer(Box::new(bad))), 4);
        assert_eq!(code(&DataError::Shard("too few samples".into())), 2);
        let config = ConfigError::OutOfRange { field: "f", allowed: "a".into(), value: "v".into() };
        assert_eq!(code(&Outer(Box::new(config))), 2);
        assert_eq!(code(&Outer(Box::new(std::io::Error::other("x")))), 1);
        assert_eq!(code(&Outer(Box::new(Storage("full".into())))), 5);
        assert_eq!(code(&CorruptCheckpoint("bad".into())), 6);
        // A full disk under a data error or on its own is storage, not "anything else".
        let full = || std::io::Error::from_raw_os_error(28);
        assert_eq!(code(&DataError::Io { path: "run/x".into(), cause: full() }), 5);
        assert_eq!(code(&Outer(Box::new(full()))), 5);
    }
}
