//! The data side of the trainer: corpus sources, torchtext's `basic_english` tokenizer, the
//! vocabulary, the encoded-corpus cache, the shard plan, batching and the job configuration.
//! No tch and no tokio here: the coordinator links this crate without libtorch.

pub mod batch;
pub mod cache;
pub mod class_metrics;
pub mod cli;
pub mod config;
pub mod corpus;
pub mod data_kinds;
pub mod encode;
pub mod error;
pub mod exit;
pub mod integrity;
pub mod labelled;
pub mod model_shape;
#[cfg(test)]
mod parser_properties;
pub mod pipeline;
pub mod shard;
pub mod splits;
pub mod stats;
pub mod subword;
pub mod tokenizer;
pub mod vocab;

pub use config::JobConfig;
pub use encode::{EncodedCorpus, EncodedSplit};
pub use error::{ConfigError, DataError};
pub use vocab::Vocab;

use std::io::Write;
use std::path::Path;

/// Writes `bytes` to a temporary file beside `path`, syncs it, renames it over `path` and
/// syncs the directory, so that a reader sees the old file or the new one, never a
/// half-written one, and the new one survives a crash of the machine once this returns.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), DataError> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(error::write_err(dir))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(error::write_err(dir))?;
    tmp.write_all(bytes).map_err(error::write_err(path))?;
    tmp.as_file().sync_all().map_err(error::write_err(path))?;
    tmp.persist(path).map_err(|e| error::write_err(path)(e.error))?;
    integrity::sync_dir(dir).map_err(error::write_err(dir))?;
    Ok(())
}
