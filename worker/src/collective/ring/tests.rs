//! Rings of real TCP connections on 127.0.0.1, one thread per rank.

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::thread;
use std::time::{Duration, Instant};

use super::*;

pub(super) const TOKEN: &[u8] = b"test-job-token";

pub(super) fn localhost() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

pub(super) fn options(timeout: Duration, chunk_bytes: usize) -> RingOptions {
    RingOptions { timeout, connect_timeout: Duration::from_secs(10), chunk_bytes, ..RingOptions::new(TOKEN) }
}

/// Runs `f(rank, ring)` on every rank at once and returns the results in rank order.
pub(super) fn on_every_rank<R: Send>(
    rings: &mut [RingCollective],
    f: impl Fn(usize, &mut RingCollective) -> R + Sync,
) -> Vec<R> {
    thread::scope(|scope| {
        let f = &f;
        let handles: Vec<_> =
            rings.iter_mut().enumerate().map(|(rank, ring)| scope.spawn(move || f(rank, ring))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Values of mixed signs and magnitudes (1e-3 to 1e3), so that the summation order shows
/// in the low bits: a reordering of the sum would not give the same bits.
pub(super) fn input(rank: usize, len: usize, salt: u64) -> Vec<f32> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ (rank as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407) ^ salt;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let unit = (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
            let scale = [1e-3f32, 1.0, 1e3][(state % 3) as usize];
            unit * scale
        })
        .collect()
}

pub(super) fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

/// All-reduces `inputs` (one per rank) and returns each rank's result.
pub(super) fn all_reduce(rings: &mut [RingCollective], inputs: &[Vec<f32>]) -> Vec<Vec<f32>> {
    on_every_rank(rings, |rank, ring| {
        let mut buffer = inputs[rank].clone();
        ring.all_reduce_mean_slice(&mut buffer).unwrap();
        buffer
    })
}

/// Checks the ring's result against the f64 mean with the error bound of an f32 sum of
/// `world` terms in any order, and against the ring's documented order bit for bit.
pub(super) fn check_all_reduce(world: usize, len: usize, outputs: &[Vec<f32>], inputs: &[Vec<f32>]) {
    let refs: Vec<&[f32]> = inputs.iter().map(Vec::as_slice).collect();
    let exact_order = reference_all_reduce_mean(&refs);
    for (rank, out) in outputs.iter().enumerate() {
        assert_eq!(out.len(), len);
        assert_eq!(bits(out), bits(&outputs[0]), "world {world} len {len}: rank {rank} differs from rank 0");
    }
    assert_eq!(bits(&outputs[0]), bits(&exact_order), "world {world} len {len}: not the ring order");
    for i in 0..len {
        let mean: f64 = inputs.iter().map(|x| x[i] as f64).sum::<f64>() / world as f64;
        let abs_sum: f64 = inputs.iter().map(|x| (x[i] as f64).abs()).sum();
        let tolerance = (world as f64 * abs_sum / world as f64 + mean.abs()) * f32::EPSILON as f64;
        let got = outputs[0][i] as f64;
        assert!(
            (got - mean).abs() <= tolerance,
            "world {world} len {len} element {i}: {got} vs naive mean {mean} (tolerance {tolerance})"
        );
    }
}

#[test]
fn all_reduce_equals_the_naive_mean_for_world_sizes_1_to_8() {
    for world in 1..=8 {
        let mut rings = connect_local_ring(world, options(Duration::from_secs(10), 4096));
        for (salt, len) in [0usize, 1, 7, 1000, 4099].into_iter().enumerate() {
            let inputs: Vec<Vec<f32>> = (0..world).map(|r| input(r, len, salt as u64)).collect();
            let outputs = all_reduce(&mut rings, &inputs);
            check_all_reduce(world, len, &outputs, &inputs);
        }
    }
}

/// Chunks of 10 bytes split elements across reads and writes, which exercises the
/// reassembly of partly received floats in both the reducing and the copying steps.
#[test]
fn all_reduce_with_chunks_that_split_elements() {
    for world in [2, 3, 5] {
        let mut rings = connect_local_ring(world, options(Duration::from_secs(10), 10));
        for len in [3usize, 1000] {
            let inputs: Vec<Vec<f32>> = (0..world).map(|r| input(r, len, 7)).collect();
            let outputs = all_reduce(&mut rings, &inputs);
            check_all_reduce(world, len, &outputs, &inputs);
        }
    }
}

#[test]
fn all_reduce_gives_the_same_bits_on_two_independent_runs() {
    let world = 5;
    let len = 100_003;
    let inputs: Vec<Vec<f32>> = (0..world).map(|r| input(r, len, 42)).collect();
    // Different chunk sizes change the timing and interleaving of every transfer.
    let first = all_reduce(&mut connect_local_ring(world, options(Duration::from_secs(10), 4096)), &inputs);
    let second =
        all_reduce(&mut connect_local_ring(world, options(Duration::from_secs(10), 1 << 20)), &inputs);
    for rank in 0..world {
        assert_eq!(bits(&first[rank]), bits(&second[rank]), "rank {rank}");
    }
    check_all_reduce(world, len, &first, &inputs);
}

#[test]
fn broadcast_copies_the_root_buffer_to_every_rank() {
    for world in [1, 2, 3, 5] {
        let mut rings = connect_local_ring(world, options(Duration::from_secs(10), 1000));
        for root in 0..world {
            for len in [0usize, 3, 4099] {
                let outputs = on_every_rank(&mut rings, |rank, ring| {
                    let mut buffer = input(rank, len, root as u64);
                    ring.broadcast_slice(&mut buffer, root).unwrap();
                    buffer
                });
                let expected = input(root, len, root as u64);
                for (rank, out) in outputs.iter().enumerate() {
                    assert_eq!(bits(out), bits(&expected), "world {world} root {root} rank {rank}");
                }
            }
        }
    }
}

#[test]
fn barrier_returns_only_after_every_rank_arrived() {
    let mut rings = connect_local_ring(3, options(Duration::from_secs(10), 4096));
    let late = Duration::from_millis(300);
    let waited = on_every_rank(&mut rings, |rank, ring| {
        if rank == 2 {
            thread::sleep(late);
        }
        let start = Instant::now();
        ring.barrier().unwrap();
        start.elapsed()
    });
    assert!(waited[0] >= late - Duration::from_millis(50), "{waited:?}");
    assert!(waited[1] >= late - Duration::from_millis(50), "{waited:?}");
    // A second barrier and an all-reduce still work: the barrier left the ring in step.
    let inputs: Vec<Vec<f32>> = (0..3).map(|r| input(r, 10, 1)).collect();
    on_every_rank(&mut rings, |_, ring| ring.barrier().unwrap());
    check_all_reduce(3, 10, &all_reduce(&mut rings, &inputs), &inputs);
}

#[test]
fn world_size_one_needs_no_peer_and_changes_nothing() {
    let listener = RingListener::bind(localhost()).unwrap();
    let addr = listener.local_addr();
    let mut ring =
        RingCollective::connect(listener, 0, 1, &[addr], options(Duration::from_secs(1), 4096)).unwrap();
    let original = input(0, 77, 3);
    let mut buffer = original.clone();
    ring.all_reduce_mean_slice(&mut buffer).unwrap();
    ring.broadcast_slice(&mut buffer, 0).unwrap();
    ring.barrier().unwrap();
    assert_eq!(bits(&buffer), bits(&original));
    assert!(matches!(ring.broadcast_slice(&mut buffer, 1), Err(CollectiveError::Invalid { .. })));
}

/// Rank 2 joins the ring but never calls the op: its neighbours must fail within about the
/// timeout, naming it, and then refuse further calls at once.
#[test]
fn a_stalled_peer_makes_the_op_time_out_naming_it() {
    let timeout = Duration::from_millis(500);
    let mut rings = connect_local_ring(3, options(timeout, 4096));
    let stalled = rings.pop().unwrap();
    let results = on_every_rank(&mut rings, |rank, ring| {
        let mut buffer = input(rank, 1000, 0);
        let start = Instant::now();
        let result = ring.all_reduce_mean_slice(&mut buffer);
        let elapsed = start.elapsed();
        let again = ring.all_reduce_mean_slice(&mut buffer);
        (result, elapsed, again)
    });
    let (result, elapsed, again) = &results[0];
    match result {
        Err(CollectiveError::Timeout { rank, op, peer, timeout_ms }) => {
            assert_eq!((*rank, *op, *timeout_ms), (0, "all_reduce_mean", 500));
            assert!(peer.contains("rank 2"), "{peer}");
        }
        other => panic!("rank 0 should time out waiting for rank 2, got {other:?}"),
    }
    assert!(elapsed >= &(timeout - Duration::from_millis(20)), "{elapsed:?}");
    assert!(elapsed < &(timeout * 3), "{elapsed:?}");
    assert!(matches!(again, Err(CollectiveError::Poisoned { .. })), "{again:?}");
    assert!(result.as_ref().unwrap_err().to_string().contains("timed out"));
    // Rank 1 waits for rank 0 (or sees it close the ring): it must fail too, not hang.
    assert!(results[1].0.is_err());
    assert!(results[1].1 < timeout * 3, "{:?}", results[1].1);
    drop(stalled);
}

/// A stalled receiver of a buffer larger than the socket buffers blocks the sender's
/// writes: that wait must time out too.
#[test]
fn a_stalled_receiver_makes_a_large_send_time_out() {
    let timeout = Duration::from_millis(500);
    let mut rings = connect_local_ring(2, options(timeout, 1 << 20));
    let stalled = rings.pop().unwrap();
    let mut buffer = vec![1.0f32; 8 << 20];
    let start = Instant::now();
    let error = rings[0].all_reduce_mean_slice(&mut buffer).unwrap_err();
    let elapsed = start.elapsed();
    assert!(matches!(error, CollectiveError::Timeout { .. }), "{error}");
    let message = error.to_string();
    assert!(message.contains("rank 1") && message.contains("to receive"), "{message}");
    assert!(elapsed < timeout * 3, "{elapsed:?}");
    drop(stalled);
}

#[test]
fn a_peer_that_disconnects_gives_a_peer_error() {
    let mut rings = connect_local_ring(2, options(Duration::from_secs(10), 4096));
    drop(rings.pop());
    let start = Instant::now();
    let error = rings[0].all_reduce_mean_slice(&mut [1.0; 1000]).unwrap_err();
    assert!(matches!(error, CollectiveError::Peer { .. }), "{error}");
    assert!(error.to_string().contains("rank 1"), "{error}");
    assert!(start.elapsed() < Duration::from_secs(2));
    assert!(rings[0].poisoned().is_some());
}

#[test]
fn ranks_that_disagree_on_the_op_fail_with_a_clear_error() {
    let mut rings = connect_local_ring(2, options(Duration::from_secs(10), 4096));
    let results = on_every_rank(&mut rings, |rank, ring| {
        let mut buffer = vec![1.0f32; 10 + rank * 2];
        ring.all_reduce_mean_slice(&mut buffer).map_err(|e| e.to_string())
    });
    for result in &results {
        let message = result.as_ref().unwrap_err();
        assert!(message.contains("disagree") || message.contains("rank"), "{message}");
    }
    let disagreement = results.iter().filter_map(|r| r.as_ref().err()).any(|m| {
        m.contains("ranks disagree on the op") && m.contains("10 elements") && m.contains("12 elements")
    });
    assert!(disagreement, "{results:?}");
}

#[test]
fn bad_arguments_are_refused_before_any_connection() {
    let opts = options(Duration::from_secs(1), 4096);
    let try_connect = |rank: usize, world: usize, peers: usize, opts: RingOptions| {
        let listener = RingListener::bind(localhost()).unwrap();
        let addrs = vec![listener.local_addr(); peers];
        RingCollective::connect(listener, rank, world, &addrs, opts).unwrap_err().to_string()
    };
    assert!(try_connect(3, 3, 3, opts.clone()).contains("rank 3 is not below the world size 3"));
    assert!(try_connect(0, 3, 2, opts.clone()).contains("2 peer addresses for a world of size 3"));
    assert!(try_connect(0, 0, 0, opts.clone()).contains("world size 0"));
    let no_token = RingOptions { job_token: Vec::new(), ..opts.clone() };
    assert!(try_connect(0, 1, 1, no_token).contains("job token"));
    let tiny_chunk = RingOptions { chunk_bytes: 2, ..opts };
    assert!(try_connect(0, 1, 1, tiny_chunk).contains("chunk_bytes 2"));
}

/// A client of another job connects to rank 1 pretending to be rank 0: it is refused with
/// a reason, and rank 1 keeps waiting for the real rank 0, with which the ring then works.
#[test]
fn a_connection_with_a_wrong_job_token_is_refused() {
    let listeners: Vec<RingListener> = (0..2).map(|_| RingListener::bind(localhost()).unwrap()).collect();
    let peers: Vec<SocketAddr> = listeners.iter().map(RingListener::local_addr).collect();
    let mut listeners = listeners.into_iter();
    let (l0, l1) = (listeners.next().unwrap(), listeners.next().unwrap());
    let opts = options(Duration::from_secs(10), 4096);
    let (stray, mut rings) = thread::scope(|scope| {
        let peers = &peers;
        let rank1 = {
            let opts = opts.clone();
            scope.spawn(move || RingCollective::connect(l1, 1, 2, peers, opts))
        };
        let stranger = handshake::Me {
            rank: 0,
            world_size: 2,
            token: b"another-job-token",
            io_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        let stray = handshake::connect_next(&stranger, 1, peers[1], deadline, &AtomicBool::new(false));
        let rank0 = RingCollective::connect(l0, 0, 2, peers, opts.clone());
        (stray, vec![rank0.unwrap(), rank1.join().unwrap().unwrap()])
    });
    let error = stray.unwrap_err();
    assert!(matches!(error, CollectiveError::Handshake { .. }), "{error}");
    assert!(error.to_string().contains("job token does not match"), "{error}");
    let inputs: Vec<Vec<f32>> = (0..2).map(|r| input(r, 99, 5)).collect();
    check_all_reduce(2, 99, &all_reduce(&mut rings, &inputs), &inputs);
}

/// When only refused clients come, the wait ends at the connect timeout with an error that
/// says what was refused.
#[test]
fn waiting_for_a_peer_that_never_comes_times_out_and_lists_refusals() {
    let listeners: Vec<RingListener> = (0..2).map(|_| RingListener::bind(localhost()).unwrap()).collect();
    let peers: Vec<SocketAddr> = listeners.iter().map(RingListener::local_addr).collect();
    let l1 = listeners.into_iter().nth(1).unwrap();
    let opts = RingOptions {
        connect_timeout: Duration::from_millis(800),
        ..options(Duration::from_millis(500), 4096)
    };
    let start = Instant::now();
    let error = thread::scope(|scope| {
        let peers = &peers;
        let rank1 = scope.spawn(move || RingCollective::connect(l1, 1, 2, peers, opts));
        let stranger = handshake::Me {
            rank: 0,
            world_size: 3,
            token: TOKEN,
            io_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(1),
        };
        let deadline = Instant::now() + Duration::from_secs(1);
        let stray = handshake::connect_next(&stranger, 1, peers[1], deadline, &AtomicBool::new(false));
        assert!(stray.unwrap_err().to_string().contains("world size 3"));
        rank1.join().unwrap().unwrap_err()
    });
    assert!(start.elapsed() < Duration::from_secs(3));
    assert!(matches!(error, CollectiveError::Timeout { .. }), "{error}");
    let message = error.to_string();
    assert!(message.contains("refused 1 other connection"), "{message}");
    assert!(message.contains("world size 3"), "{message}");
}

#[test]
fn tensors_are_reduced_in_place_and_bad_tensors_are_refused() {
    tch::set_num_threads(1);
    let mut rings = connect_local_ring(2, options(Duration::from_secs(10), 4096));
    let inputs: Vec<Vec<f32>> = (0..2).map(|r| input(r, 4099, 9)).collect();
    let outputs = on_every_rank(&mut rings, |rank, ring| {
        let mut tensor = tch::Tensor::from_slice(&inputs[rank]);
        ring.all_reduce_mean(&mut tensor).unwrap();
        let mut out = vec![0.0f32; 4099];
        tensor.copy_data(&mut out, 4099);
        out
    });
    check_all_reduce(2, 4099, &outputs, &inputs);

    // Refused before any byte is sent, so the ring stays usable.
    let ring0 = &mut rings[0];
    let mut doubles = tch::Tensor::zeros([4], (tch::Kind::Double, tch::Device::Cpu));
    let message = ring0.all_reduce_mean(&mut doubles).unwrap_err().to_string();
    assert!(message.contains("must hold f32"), "{message}");
    let mut matrix = tch::Tensor::zeros([2, 2], (tch::Kind::Float, tch::Device::Cpu));
    let message = ring0.broadcast(&mut matrix, 0).unwrap_err().to_string();
    assert!(message.contains("1-D"), "{message}");
    let mut strided = tch::Tensor::zeros([8], (tch::Kind::Float, tch::Device::Cpu)).slice(0, 0, 8, 2);
    let message = ring0.all_reduce_mean(&mut strided).unwrap_err().to_string();
    assert!(message.contains("contiguous"), "{message}");
    assert!(ring0.poisoned().is_none());

    let outputs = on_every_rank(&mut rings, |rank, ring| {
        let mut tensor = tch::Tensor::from_slice(&inputs[rank]);
        ring.broadcast(&mut tensor, 1).unwrap();
        let mut out = vec![0.0f32; 4099];
        tensor.copy_data(&mut out, 4099);
        out
    });
    assert_eq!(bits(&outputs[0]), bits(&inputs[1]));
    assert_eq!(bits(&outputs[1]), bits(&inputs[1]));
}
