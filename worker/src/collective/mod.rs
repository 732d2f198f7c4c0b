//! Collectives over the flat gradient buffer: one trait, several backends.
//!
//! Every backend gives bitwise-identical results on every rank, so that replicas that start
//! equal stay equal. Buffers are 1-D, contiguous `f32` tensors.

pub mod check;
pub mod nccl;
pub mod nccl_lib;
pub mod noop;
pub mod ring;

pub use noop::NoopCollective;
pub use ring::{RingCollective, RingListener, RingOptions};

#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    #[error("rank {rank}: {op} timed out after {timeout_ms} ms waiting for peer {peer}")]
    Timeout { rank: usize, op: &'static str, peer: String, timeout_ms: u64 },
    // `cause`, not `source`: the message carries it, so an error chain prints it once.
    #[error("rank {rank}: {op} failed talking to peer {peer}: {cause}")]
    Peer { rank: usize, op: &'static str, peer: String, cause: std::io::Error },
    #[error("rank {rank}: {op}: {message}")]
    Invalid { rank: usize, op: &'static str, message: String },
    #[error("rank {rank}: connect: ring handshake with peer {peer} failed: {message}")]
    Handshake { rank: usize, peer: String, message: String },
    #[error("rank {rank}: {op}: the collective is unusable after an earlier error: {cause}")]
    Poisoned { rank: usize, op: &'static str, cause: String },
    #[error("cannot listen for ring peers on {addr}: {cause}")]
    Bind { addr: std::net::SocketAddr, cause: std::io::Error },
}

/// All-reduce, broadcast and barrier across the ranks of one job.
pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// A short name for logs and summaries: `none`, `ring`, `nccl`.
    fn backend(&self) -> &'static str;
    /// Replaces `buffer` with the element-wise mean over all ranks.
    fn all_reduce_mean(&mut self, buffer: &mut tch::Tensor) -> Result<(), CollectiveError>;
    /// Replaces `buffer` on every rank with its value on `root`.
    fn broadcast(&mut self, buffer: &mut tch::Tensor, root: usize) -> Result<(), CollectiveError>;
    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<(), CollectiveError>;
}
