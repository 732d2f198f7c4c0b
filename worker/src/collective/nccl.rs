//! NCCL backend: all-reduce and broadcast of libtorch's CUDA memory in place, no host copy.
//!
//! Ordering with libtorch: tch issues its kernels on the legacy default stream of the primary
//! context (it never sets another current stream), and cudarc's `default_stream()` is that
//! same null stream of the same primary context (`CudaContext::new` retains it). The NCCL
//! kernels are therefore queued behind the backward kernels that wrote the gradients and
//! ahead of the optimizer kernels that read them: stream order is the synchronisation, and
//! the host never waits on the device except to enforce the timeout.
//!
//! cudarc's communicator is not `Send`, so it lives on a service thread that owns the CUDA
//! context binding; the `Collective` methods send it a request and wait for the answer with a
//! timeout. The service thread waits for each operation with an event and aborts the
//! communicator when the deadline passes (a rank that stopped answering), which makes the
//! step fail with an error naming the operation instead of hanging.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use cudarc::driver::CudaContext;
use cudarc::nccl::safe::{Comm, Id, ReduceOp};

use super::{Collective, CollectiveError};

/// The NCCL unique id that rank 0 creates and the coordinator relays (128 bytes).
pub fn new_unique_id() -> Result<Vec<u8>, CollectiveError> {
    let id = Id::new().map_err(|e| invalid(0, "nccl unique id", format!("{e:?}")))?;
    Ok(id.internal().iter().map(|&c| c as u8).collect())
}

fn invalid(rank: usize, op: &'static str, message: String) -> CollectiveError {
    CollectiveError::Invalid { rank, op, message }
}

enum Request {
    AllReduceMean { ptr: u64, len: usize },
    Broadcast { ptr: u64, len: usize, root: usize },
    Barrier,
}

type Reply = Result<(), String>;

pub struct NcclCollective {
    rank: usize,
    world_size: usize,
    timeout: Duration,
    requests: mpsc::Sender<(Request, mpsc::Sender<Reply>)>,
    poisoned: Option<String>,
}

impl NcclCollective {
    /// Creates this rank's communicator on CUDA device `ordinal` from the relayed id.
    /// Blocks until every rank has joined, or fails after `timeout`.
    pub fn new(
        ordinal: usize,
        rank: usize,
        world_size: usize,
        unique_id: &[u8],
        timeout: Duration,
    ) -> Result<Self, CollectiveError> {
        let id_bytes: [u8; 128] = unique_id.try_into().map_err(|_| {
            invalid(rank, "nccl init", format!("unique id must be 128 bytes, got {}", unique_id.len()))
        })?;
        let (requests, inbox) = mpsc::channel::<(Request, mpsc::Sender<Reply>)>();
        let (ready_tx, ready_rx) = mpsc::channel::<Reply>();
        std::thread::Builder::new()
            .name(format!("nccl-rank{rank}"))
            .spawn(move || service(ordinal, rank, world_size, id_bytes, timeout, inbox, ready_tx))
            .map_err(|e| invalid(rank, "nccl init", e.to_string()))?;
        match ready_rx.recv_timeout(timeout) {
            Ok(Ok(())) => Ok(Self { rank, world_size, timeout, requests, poisoned: None }),
            Ok(Err(message)) => Err(invalid(rank, "nccl init", message)),
            Err(_) => Err(CollectiveError::Timeout {
                rank,
                op: "nccl init",
                peer: "all ranks".into(),
                timeout_ms: timeout.as_millis() as u64,
            }),
        }
    }

    fn call(&mut self, op: &'static str, request: Request) -> Result<(), CollectiveError> {
        if let Some(reason) = &self.poisoned {
            return Err(invalid(
                self.rank,
                op,
                format!("communicator unusable after an earlier failure: {reason}"),
            ));
        }
        let (reply_tx, reply_rx) = mpsc::channel();
        if self.requests.send((request, reply_tx)).is_err() {
            self.poisoned = Some("the NCCL service thread has exited".into());
            return Err(invalid(self.rank, op, "the NCCL service thread has exited".into()));
        }
        // The service thread enforces the deadline itself; the margin covers its abort.
        let result = match reply_rx.recv_timeout(self.timeout + Duration::from_secs(5)) {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(message)) if message.starts_with("timeout") => CollectiveError::Timeout {
                rank: self.rank,
                op,
                peer: "another rank".into(),
                timeout_ms: self.timeout.as_millis() as u64,
            },
            Ok(Err(message)) => invalid(self.rank, op, message),
            Err(_) => CollectiveError::Timeout {
                rank: self.rank,
                op,
                peer: "another rank".into(),
                timeout_ms: self.timeout.as_millis() as u64,
            },
        };
        self.poisoned = Some(result.to_string());
        Err(result)
    }
}

/// Checks that a tensor is a contiguous f32 CUDA buffer and returns its pointer and length.
fn cuda_buffer(rank: usize, op: &'static str, t: &tch::Tensor) -> Result<(u64, usize), CollectiveError> {
    if t.kind() != tch::Kind::Float || !t.device().is_cuda() || !t.is_contiguous() {
        return Err(invalid(
            rank,
            op,
            format!("needs a contiguous f32 CUDA tensor, got {:?} on {:?}", t.kind(), t.device()),
        ));
    }
    Ok((t.data_ptr() as u64, t.numel()))
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world_size
    }
    fn backend(&self) -> &'static str {
        "nccl"
    }
    fn all_reduce_mean(&mut self, buffer: &mut tch::Tensor) -> Result<(), CollectiveError> {
        let (ptr, len) = cuda_buffer(self.rank, "all_reduce", buffer)?;
        self.call("all_reduce", Request::AllReduceMean { ptr, len })
    }
    fn broadcast(&mut self, buffer: &mut tch::Tensor, root: usize) -> Result<(), CollectiveError> {
        let (ptr, len) = cuda_buffer(self.rank, "broadcast", buffer)?;
        self.call("broadcast", Request::Broadcast { ptr, len, root })
    }
    fn barrier(&mut self) -> Result<(), CollectiveError> {
        self.call("barrier", Request::Barrier)
    }
}

/// The thread that owns the communicator. It answers `ready` once, then one reply per request.
fn service(
    ordinal: usize,
    rank: usize,
    world_size: usize,
    id_bytes: [u8; 128],
    timeout: Duration,
    inbox: mpsc::Receiver<(Request, mpsc::Sender<Reply>)>,
    ready: mpsc::Sender<Reply>,
) {
    let setup = (|| -> Result<_, String> {
        let ctx = CudaContext::new(ordinal).map_err(|e| format!("CUDA device {ordinal}: {e:?}"))?;
        let stream = ctx.default_stream();
        let id = Id::uninit(id_bytes.map(|b| b as std::ffi::c_char));
        let comm = Comm::from_rank(stream.clone(), rank, world_size, id)
            .map_err(|e| format!("ncclCommInitRank: {e:?}"))?;
        // Two NCCLs in one process initialise fine and fail at the first operation with
        // "corrupted comm object": refuse here, naming both, instead.
        super::nccl_lib::verify_single_nccl().map_err(|e| e.to_string())?;
        let barrier_buf = stream.alloc_zeros::<f32>(1).map_err(|e| format!("barrier buffer: {e:?}"))?;
        Ok((ctx, stream, comm, barrier_buf))
    })();
    let (ctx, stream, comm, mut barrier_buf) = match setup {
        Ok(parts) => {
            let _ = ready.send(Ok(()));
            parts
        }
        Err(message) => {
            let _ = ready.send(Err(message));
            return;
        }
    };
    for (request, reply) in inbox {
        let enqueued: Result<(), String> = match request {
            Request::AllReduceMean { ptr, len } => {
                // SAFETY: `ptr` is a live, contiguous f32 allocation of `len` elements owned by
                // libtorch on this device; the caller blocks until we reply, so the tensor
                // outlives the operation. `leak` hands the memory back without freeing it.
                let mut slice = unsafe { stream.upgrade_device_ptr::<f32>(ptr, len) };
                let r = comm.all_reduce_in_place(&mut slice, &ReduceOp::Avg).map(|_| ());
                slice.leak();
                r.map_err(|e| format!("ncclAllReduce: {e:?}"))
            }
            Request::Broadcast { ptr, len, root } => {
                // SAFETY: as above.
                let mut slice = unsafe { stream.upgrade_device_ptr::<f32>(ptr, len) };
                let r = comm.broadcast_in_place(&mut slice, root as i32).map(|_| ());
                slice.leak();
                r.map_err(|e| format!("ncclBroadcast: {e:?}"))
            }
            Request::Barrier => comm
                .all_reduce_in_place(&mut barrier_buf, &ReduceOp::Sum)
                .map(|_| ())
                .map_err(|e| format!("ncclAllReduce (barrier): {e:?}")),
        };
        let outcome = enqueued.and_then(|()| wait_for_stream(&ctx, &stream, timeout));
        let failed = outcome.is_err();
        let _ = reply.send(outcome);
        if failed {
            // Dropping the communicator aborts it, which also stops its kernels.
            break;
        }
    }
    drop(comm);
}

/// Waits until the work queued so far on `stream` is done, or `timeout` passes.
fn wait_for_stream(
    ctx: &std::sync::Arc<CudaContext>,
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    timeout: Duration,
) -> Result<(), String> {
    let event = ctx.new_event(None).map_err(|e| format!("cuEventCreate: {e:?}"))?;
    event.record(stream).map_err(|e| format!("cuEventRecord: {e:?}"))?;
    let deadline = Instant::now() + timeout;
    // Short pauses: the step waits here, and a 2 ms oversleep was 5% of a seed-recipe step
    // on a GPU (about 35 ms); 100 us costs little CPU on a core that only feeds one GPU.
    let mut pause = Duration::from_micros(10);
    while !event.is_complete() {
        if Instant::now() >= deadline {
            return Err(format!("timeout after {} ms", timeout.as_millis()));
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_micros(100));
    }
    Ok(())
}
