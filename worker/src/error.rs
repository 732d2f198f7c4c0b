//! The worker library's errors. Each variant names what failed (the file, the device, the
//! checkpoint field), so that the binary can print it as a one-line message.

use std::path::PathBuf;

use trainer_core::{ConfigError, DataError};

use crate::collective::CollectiveError;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error(transparent)]
    Collective(#[from] CollectiveError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error("device {requested}: {message}")]
    Device { requested: String, message: String },
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    /// A checkpoint or model file whose bytes are not the ones written (exit 6).
    #[error("integrity check failed")]
    Corrupt(#[source] trainer_core::exit::CorruptCheckpoint),
    #[error("model folder {path}: {message}")]
    ModelDir { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("invalid batch: {0}")]
    Batch(String),
    #[error("training diverged at step {step}: {message}")]
    Diverged { step: u64, message: String },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = WorkerError> = std::result::Result<T, E>;

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> WorkerError + '_ {
    move |source| WorkerError::Io { path: path.to_path_buf(), source }
}
