//! What a run folder shows besides `metrics.jsonl`: TensorBoard event files under `tb/`
//! ([`tensorboard`]) and the `curves.png` plot ([`curves`]). Shared by the coordinator and
//! `worker train`, so it must not link libtorch.

pub mod confusion;
pub mod curves;
pub mod tensorboard;

pub use curves::{plot_runs, RunCurves};
pub use tensorboard::EventWriter;

#[derive(Debug, thiserror::Error)]
pub enum VizError {
    #[error("{path}: {source}")]
    Io { path: std::path::PathBuf, source: std::io::Error },
    #[error("{path}: line {line}: {message}")]
    Metrics { path: std::path::PathBuf, line: usize, message: String },
    #[error("cannot draw {path}: {message}")]
    Plot { path: std::path::PathBuf, message: String },
}

pub type Result<T> = std::result::Result<T, VizError>;

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> VizError + '_ {
    move |source| VizError::Io { path: path.to_path_buf(), source }
}
