//! Errors of the data pipeline and the configuration. Each variant names the file or the
//! field that is wrong, so that the binaries can print it as a one-line message.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {cause}")]
    Read { path: PathBuf, cause: std::io::Error },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{field} must be {allowed}, got {value}")]
    OutOfRange { field: &'static str, allowed: String, value: String },
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: does not exist")]
    NotFound { path: PathBuf },
    #[error("{path}: cannot read: {cause}")]
    Io { path: PathBuf, cause: std::io::Error },
    #[error("{path}: cannot write: {cause}")]
    Write { path: PathBuf, cause: std::io::Error },
    #[error("{path}: not a gzip stream or truncated/corrupt gzip data: {cause}")]
    Gzip { path: PathBuf, cause: std::io::Error },
    #[error("{path}: not a valid tar archive: {message}")]
    Tar { path: PathBuf, message: String },
    #[error("{path}: no reviews in aclImdb/{missing}/ (expected aclImdb/{{train,test}}/{{pos,neg}}/<id>_<rating>.txt)")]
    MissingSplit { path: PathBuf, missing: String },
    #[error("{path}: bad review file name {name:?} (expected <id>_<rating>.txt): {reason}")]
    BadReviewName { path: PathBuf, name: String, reason: String },
    #[error("{path}: review {name} is empty")]
    EmptyReview { path: PathBuf, name: String },
    #[error("{path}: review {name} is {bytes} bytes; at most {max} bytes allowed")]
    ReviewTooLarge { path: PathBuf, name: String, bytes: u64, max: usize },
    #[error("{path}: review {name} appears twice")]
    DuplicateReview { path: PathBuf, name: String },
    #[error("download of {url} failed: {message}")]
    Download { url: String, message: String },
    #[error(
        "download of {url}: {algorithm} mismatch: expected {expected}, got {actual}; the file was deleted"
    )]
    ChecksumMismatch { url: String, algorithm: &'static str, expected: String, actual: String },
    #[error("cache {path}: {cause}")]
    CacheIo { path: PathBuf, cause: std::io::Error },
    #[error("vocabulary file {path}: {message}")]
    Vocab { path: PathBuf, message: String },
    #[error("subword tokenizer: {message}")]
    Tokenizer { message: String },
    #[error("tokenizer file {path}: {message}")]
    TokenizerFile { path: PathBuf, message: String },
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("shard plan: {0}")]
    Shard(String),
    /// A record of a CSV, TSV, JSONL or fastText file that cannot be used (1-based line).
    #[error("{path}:{line}: {message}")]
    BadRecord { path: PathBuf, line: u64, message: String },
    /// A labelled corpus that cannot be trained on as a whole (no examples, one class, ...).
    #[error("{path}: {message}")]
    BadCorpus { path: PathBuf, message: String },
    #[error("{path}:{line}: label {label:?} is not one of the train data's classes ({classes})")]
    UnknownLabel { path: PathBuf, line: u64, label: String, classes: String },
    #[error(
        "{path}: {rows} examples are not valid UTF-8 (the first at {first}); refused: fix the file, \
         or pass --invalid-utf8 replace (data.invalid_utf8) to decode them with U+FFFD"
    )]
    InvalidUtf8 { path: PathBuf, rows: u64, first: String },
}

pub type Result<T, E = DataError> = std::result::Result<T, E>;

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |cause| DataError::Io { path: path.to_path_buf(), cause }
}

pub(crate) fn write_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |cause| DataError::Write { path: path.to_path_buf(), cause }
}
