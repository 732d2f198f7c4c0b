//! All-reduce, broadcast and barrier over a ring of TCP connections, for CPU workers.
//!
//! Forming the ring (the coordinator relays the addresses):
//! 1. every rank binds a [`RingListener`] (e.g. on `127.0.0.1:0`) and reports
//!    [`RingListener::local_addr`];
//! 2. every rank calls [`RingCollective::connect`] with all addresses in rank order. It
//!    connects to the next rank, accepts the previous one, and both check a handshake (job
//!    token, rank, world size), so a stray client, a peer of another job or one left over
//!    from an earlier attempt (the token is new for every attempt) is refused, with the
//!    reason logged, while the wait for the real peer goes on. The listener closes once the
//!    ring is formed. [`wire`] (`trainer_proto::ring_wire`) has the byte layouts and parsers.
//!
//! All-reduce is the bandwidth-optimal ring: `world - 1` reduce-scatter steps, then
//! `world - 1` all-gather steps, each rank sending `2 (world - 1) / world` of the buffer.
//! Segment `k` is summed along the ring starting at rank `k`, always in that order, and
//! divided by the world size on the rank that completes it; the all-gather then only copies
//! those bits. So every rank gets bitwise the same result, and the same bits on every run.
//! Each step is streamed in chunks of [`RingOptions::chunk_bytes`]: a chunk is forwarded
//! as soon as it is reduced, while later chunks are still arriving.
//!
//! Failures: an op that moves no byte for [`RingOptions::timeout`] fails with
//! [`CollectiveError::Timeout`] naming the peer it waits for; a closed connection gives
//! [`CollectiveError::Peer`]. After any failure during an op the ring is closed (so the
//! neighbours fail at once too) and every later call returns [`CollectiveError::Poisoned`].

mod handshake;
#[cfg(test)]
mod hostile_tests;
mod schedule;
#[cfg(test)]
mod tests;
mod transfer;
/// The ring's byte layouts and their parsers (in `trainer-proto`, with no libtorch).
pub use trainer_proto::ring_wire as wire;

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::{Collective, CollectiveError};
use transfer::{Link, Links, OpContext, OpHeader, OpKind};

/// Settings of a ring; every rank of a job must use the same `job_token`.
#[derive(Clone)]
pub struct RingOptions {
    /// Shared by all ranks of one job and checked in the handshake. It crosses the network
    /// in clear: derive it from the job secret (e.g. a hash) rather than using the secret.
    pub job_token: Vec<u8>,
    /// Longest time an op may go without moving a byte before it fails.
    pub timeout: Duration,
    /// Longest time [`RingCollective::connect`] waits for both neighbours.
    pub connect_timeout: Duration,
    /// Pipelining granularity: the most bytes written or read (and reduced) in one go.
    pub chunk_bytes: usize,
}

impl RingOptions {
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
    pub const DEFAULT_CHUNK_BYTES: usize = 256 * 1024;
    /// Largest accepted `chunk_bytes` (each rank keeps one chunk of staging memory).
    pub const MAX_CHUNK_BYTES: usize = 64 * 1024 * 1024;

    /// Options with the default timeouts and chunk size.
    pub fn new(job_token: impl Into<Vec<u8>>) -> Self {
        RingOptions {
            job_token: job_token.into(),
            timeout: Self::DEFAULT_TIMEOUT,
            connect_timeout: Self::DEFAULT_CONNECT_TIMEOUT,
            chunk_bytes: Self::DEFAULT_CHUNK_BYTES,
        }
    }
}

// Written by hand so that the token never reaches a log.
impl std::fmt::Debug for RingOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingOptions")
            .field("job_token", &format_args!("<{} bytes>", self.job_token.len()))
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("chunk_bytes", &self.chunk_bytes)
            .finish()
    }
}

/// A bound, not yet connected ring endpoint: bind it first, publish its address, then
/// hand it to [`RingCollective::connect`].
#[derive(Debug)]
pub struct RingListener {
    listener: TcpListener,
    local_addr: SocketAddr,
}

impl RingListener {
    /// Binds `addr` (port 0 picks a free port).
    pub fn bind(addr: SocketAddr) -> Result<Self, CollectiveError> {
        let bind_error = |cause| CollectiveError::Bind { addr, cause };
        let listener = TcpListener::bind(addr).map_err(bind_error)?;
        let local_addr = listener.local_addr().map_err(bind_error)?;
        Ok(RingListener { listener, local_addr })
    }

    /// The address the other ranks must connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

/// A connected ring: see the module documentation.
#[derive(Debug)]
pub struct RingCollective {
    rank: usize,
    world_size: usize,
    timeout: Duration,
    chunk_bytes: usize,
    /// `None` for world size 1, which needs no sockets.
    links: Option<Links>,
    /// Ops started so far; every op header carries it, so ranks that fall out of step fail.
    seq: u64,
    /// Where received chunks wait to be reduced into the buffer.
    staging: Vec<f32>,
    /// The first error, once an op has failed.
    poisoned: Option<String>,
}

impl RingCollective {
    /// Joins the ring as `rank` of `world_size`. `peers` holds every rank's listener
    /// address in rank order (this rank's own entry is not used). Waits up to
    /// `options.connect_timeout` for both neighbours.
    pub fn connect(
        listener: RingListener,
        rank: usize,
        world_size: usize,
        peers: &[SocketAddr],
        options: RingOptions,
    ) -> Result<Self, CollectiveError> {
        validate(rank, world_size, peers, &options)?;
        let mut ring = RingCollective {
            rank,
            world_size,
            timeout: options.timeout,
            chunk_bytes: options.chunk_bytes,
            links: None,
            seq: 0,
            staging: Vec::new(),
            poisoned: None,
        };
        if world_size == 1 {
            return Ok(ring);
        }
        let next = (rank + 1) % world_size;
        let prev = (rank + world_size - 1) % world_size;
        let me = handshake::Me {
            rank,
            world_size,
            token: &options.job_token,
            io_timeout: options.timeout,
            connect_timeout: options.connect_timeout,
        };
        let deadline = Instant::now() + options.connect_timeout;
        // Whichever half fails first stops the other one's wait.
        let abort = AtomicBool::new(false);
        let (connected, accepted) = std::thread::scope(|scope| {
            let connector = scope.spawn(|| {
                let result = handshake::connect_next(&me, next, peers[next], deadline, &abort);
                if result.is_err() {
                    abort.store(true, Ordering::Relaxed);
                }
                result
            });
            let accepted =
                handshake::accept_prev(&listener.listener, &me, prev, peers[prev], deadline, &abort);
            if accepted.is_err() {
                abort.store(true, Ordering::Relaxed);
            }
            let connected = connector.join().unwrap_or_else(|_| {
                Err(CollectiveError::Invalid {
                    rank,
                    op: "connect",
                    message: "internal error: the connecting thread panicked".into(),
                })
            });
            (connected, accepted)
        });
        let (to_next, from_prev) = match (connected, accepted) {
            (Ok(to_next), Ok((from_prev, _))) => (to_next, from_prev),
            // Report the root cause, not the other half's "aborted" timeout.
            (Err(e), Err(_)) if !matches!(e, CollectiveError::Timeout { .. }) => return Err(e),
            (_, Err(e)) | (Err(e), _) => return Err(e),
        };
        let links = Links {
            next: Link { stream: to_next, rank: next, addr: peers[next] },
            prev: Link { stream: from_prev, rank: prev, addr: peers[prev] },
        };
        for link in [&links.next, &links.prev] {
            link.stream.set_nodelay(true).and_then(|()| link.stream.set_nonblocking(true)).map_err(
                |cause| CollectiveError::Peer {
                    rank,
                    op: "connect",
                    peer: format!("rank {} ({})", link.rank, link.addr),
                    cause,
                },
            )?;
        }
        tracing::debug!(rank, world_size, %links.next.addr, %links.prev.addr, "ring connected");
        ring.staging = vec![0.0; options.chunk_bytes.div_ceil(4)];
        ring.links = Some(links);
        Ok(ring)
    }

    /// Replaces `buffer` with the element-wise mean over all ranks; every rank must pass a
    /// buffer of the same length.
    pub fn all_reduce_mean_slice(&mut self, buffer: &mut [f32]) -> Result<(), CollectiveError> {
        self.run(OpKind::AllReduceMean, buffer, 0)
    }

    /// Replaces `buffer` on every rank with its value on `root`.
    pub fn broadcast_slice(&mut self, buffer: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        if root >= self.world_size {
            return Err(CollectiveError::Invalid {
                rank: self.rank,
                op: OpKind::Broadcast.name(),
                message: format!("root {root} is not a rank of this world of size {}", self.world_size),
            });
        }
        self.run(OpKind::Broadcast, buffer, root)
    }

    /// The error that made this ring unusable, if any.
    pub fn poisoned(&self) -> Option<&str> {
        self.poisoned.as_deref()
    }

    fn run(&mut self, kind: OpKind, buffer: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        let op = kind.name();
        if let Some(cause) = &self.poisoned {
            return Err(CollectiveError::Poisoned { rank: self.rank, op, cause: cause.clone() });
        }
        let Some(links) = self.links.as_mut() else {
            // World size 1: the mean of one buffer and a broadcast from rank 0 are no-ops.
            return Ok(());
        };
        let steps = match kind {
            OpKind::AllReduceMean | OpKind::Barrier => {
                schedule::all_reduce_steps(buffer.len(), self.world_size, self.rank)
            }
            OpKind::Broadcast => schedule::broadcast_steps(buffer.len(), self.world_size, self.rank, root),
        };
        let header = OpHeader { kind, seq: self.seq, len: buffer.len() as u64, root: root as u32 };
        self.seq += 1;
        let ctx = OpContext { rank: self.rank, op, timeout: self.timeout, chunk_bytes: self.chunk_bytes };
        let result = transfer::run_op(links, &ctx, header, buffer, &steps, &mut self.staging);
        if let Err(error) = &result {
            tracing::warn!(rank = self.rank, %error, "ring collective failed; closing the ring");
            links.shutdown();
            self.poisoned = Some(error.to_string());
        }
        result
    }
}

fn validate(
    rank: usize,
    world_size: usize,
    peers: &[SocketAddr],
    options: &RingOptions,
) -> Result<(), CollectiveError> {
    let invalid = |message: String| Err(CollectiveError::Invalid { rank, op: "connect", message });
    if world_size == 0 || world_size > u32::MAX as usize {
        return invalid(format!("world size {world_size} is out of range"));
    }
    if rank >= world_size {
        return invalid(format!("rank {rank} is not below the world size {world_size}"));
    }
    if peers.len() != world_size {
        return invalid(format!("{} peer addresses for a world of size {world_size}", peers.len()));
    }
    if options.job_token.is_empty() || options.job_token.len() > handshake::MAX_TOKEN_LEN {
        return invalid(format!(
            "the job token must have 1 to {} bytes, it has {}",
            handshake::MAX_TOKEN_LEN,
            options.job_token.len()
        ));
    }
    if options.timeout.is_zero() || options.connect_timeout.is_zero() {
        return invalid("timeouts must be longer than zero".into());
    }
    if !(4..=RingOptions::MAX_CHUNK_BYTES).contains(&options.chunk_bytes) {
        return invalid(format!(
            "chunk_bytes {} is outside 4..={}",
            options.chunk_bytes,
            RingOptions::MAX_CHUNK_BYTES
        ));
    }
    Ok(())
}

/// Test support: binds `world` listeners on 127.0.0.1 and connects them all into one ring,
/// one thread per rank; the ranks in rank order.
#[cfg(test)]
pub(crate) fn connect_local_ring(world: usize, options: RingOptions) -> Vec<RingCollective> {
    let localhost = SocketAddr::from(([127, 0, 0, 1], 0));
    let listeners: Vec<RingListener> =
        (0..world).map(|_| RingListener::bind(localhost).expect("bind")).collect();
    let peers: Vec<SocketAddr> = listeners.iter().map(RingListener::local_addr).collect();
    std::thread::scope(|scope| {
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                let (peers, options) = (&peers, options.clone());
                scope.spawn(move || RingCollective::connect(listener, rank, world, peers, options))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("rank thread").expect("connect")).collect()
    })
}

/// The exact result [`RingCollective::all_reduce_mean_slice`] gives for `inputs` (one
/// buffer per rank, in rank order, all of one length), computed in this process with the
/// ring's summation order. For tests and checks.
pub fn reference_all_reduce_mean(inputs: &[&[f32]]) -> Vec<f32> {
    schedule::reference_mean(inputs)
}

/// The tensor's memory as a slice, after checking that it is a defined, dense, contiguous,
/// 1-D f32 CPU tensor.
fn tensor_as_mut_slice<'t>(
    tensor: &'t mut tch::Tensor,
    rank: usize,
    op: &'static str,
) -> Result<&'t mut [f32], CollectiveError> {
    let invalid = |message: String| CollectiveError::Invalid { rank, op, message };
    if !tensor.defined() {
        return Err(invalid("the buffer is an undefined tensor".into()));
    }
    if tensor.is_sparse() || tensor.is_mkldnn() {
        return Err(invalid("the buffer must be a dense (strided) tensor".into()));
    }
    let kind = tensor.f_kind().map_err(|e| invalid(format!("cannot read the buffer's element type: {e}")))?;
    if kind != tch::Kind::Float {
        return Err(invalid(format!("the buffer must hold f32, it holds {kind:?}")));
    }
    let device = tensor.device();
    if device != tch::Device::Cpu {
        return Err(invalid(format!("the TCP ring reduces CPU memory, the buffer is on {device:?}")));
    }
    if tensor.dim() != 1 {
        return Err(invalid(format!("the buffer must be 1-D, its shape is {:?}", tensor.size())));
    }
    if !tensor.is_contiguous() {
        return Err(invalid("the buffer must be contiguous".into()));
    }
    let numel = tensor.numel();
    if numel == 0 {
        return Ok(&mut []);
    }
    let data = tensor.data_ptr().cast::<f32>();
    if data.is_null() || !data.is_aligned() {
        return Err(invalid("the buffer's data pointer is null or misaligned".into()));
    }
    // SAFETY: a defined, dense, contiguous 1-D f32 CPU tensor stores its `numel` elements
    // back to back from `data_ptr()` (which already includes the storage offset), and the
    // pointer was checked to be non-null and aligned. The slice borrows the tensor
    // mutably for its whole life, so no other Rust code can reach the tensor meanwhile, and
    // libtorch runs CPU ops synchronously, so it does not touch the memory on its own.
    // Other tensors that share the storage (views) could alias it; as with tch's in-place
    // ops, the caller must not use such views from another thread during the call.
    Ok(unsafe { std::slice::from_raw_parts_mut(data, numel) })
}

/// Runs `op` on a CPU tensor: `buffer` itself, or for a GPU buffer (a ring job on GPUs, for
/// instance more workers than GPUs) a host copy that is written back afterwards.
fn through_host(
    buffer: &mut tch::Tensor,
    rank: usize,
    op: &'static str,
    run: impl FnOnce(&mut tch::Tensor) -> Result<(), CollectiveError>,
) -> Result<(), CollectiveError> {
    if buffer.device() == tch::Device::Cpu {
        return run(buffer);
    }
    let invalid =
        |e: tch::TchError| CollectiveError::Invalid { rank, op, message: format!("host staging: {e}") };
    let mut host = buffer.f_to_device(tch::Device::Cpu).map_err(invalid)?.f_contiguous().map_err(invalid)?;
    run(&mut host)?;
    buffer.f_copy_(&host).map_err(invalid)?;
    Ok(())
}

impl Collective for RingCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn backend(&self) -> &'static str {
        "ring"
    }

    fn all_reduce_mean(&mut self, buffer: &mut tch::Tensor) -> Result<(), CollectiveError> {
        let rank = self.rank;
        let op = OpKind::AllReduceMean.name();
        through_host(buffer, rank, op, |host| {
            let slice = tensor_as_mut_slice(host, rank, op)?;
            self.all_reduce_mean_slice(slice)
        })
    }

    fn broadcast(&mut self, buffer: &mut tch::Tensor, root: usize) -> Result<(), CollectiveError> {
        let rank = self.rank;
        let op = OpKind::Broadcast.name();
        through_host(buffer, rank, op, |host| {
            let slice = tensor_as_mut_slice(host, rank, op)?;
            self.broadcast_slice(slice, root)
        })
    }

    /// An all-reduce of one element per rank: no rank can finish it before every rank has
    /// sent its element, that is, before every rank has called `barrier`.
    fn barrier(&mut self) -> Result<(), CollectiveError> {
        let mut token = vec![0.0f32; self.world_size];
        self.run(OpKind::Barrier, &mut token, 0)
    }
}
