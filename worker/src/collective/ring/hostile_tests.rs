//! Strangers and broken peers against a real ring on 127.0.0.1: each is refused with a
//! reason it can read, the real ranks still form the ring without waiting for them, and
//! their all-reduce gives exactly the bits of the documented summation order.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use super::tests::{all_reduce, check_all_reduce, input, localhost, options, TOKEN};
use super::wire::{self, Hello, OpHeader, OpKind, Progress, Reply};
use super::*;

/// Binds `world` listeners, lets `meddle` connect to them (its connections queue before
/// any rank accepts), then forms the ring; returns the rings, what `meddle` returned and how
/// long forming took.
fn ring_after<T>(
    world: usize,
    opts: RingOptions,
    meddle: impl FnOnce(&[SocketAddr]) -> T,
) -> (Vec<RingCollective>, T, Duration) {
    let listeners: Vec<RingListener> = (0..world).map(|_| RingListener::bind(localhost()).unwrap()).collect();
    let peers: Vec<SocketAddr> = listeners.iter().map(RingListener::local_addr).collect();
    let meddled = meddle(&peers);
    let start = Instant::now();
    let rings = thread::scope(|scope| {
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                let (peers, opts) = (&peers, opts.clone());
                scope.spawn(move || RingCollective::connect(listener, rank, world, peers, opts))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap().expect("the real ranks form the ring")).collect()
    });
    (rings, meddled, start.elapsed())
}

/// What a stranger reads back: the refusal's reason, or how the connection ended.
fn answer(stream: &mut TcpStream) -> String {
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut bytes = Vec::new();
    loop {
        let need = match wire::parse_reply(&bytes) {
            Ok(Progress::Complete(Reply::Refused(why))) => return why,
            Ok(Progress::Complete(accepted)) => panic!("a stranger was accepted: {accepted:?}"),
            Err(why) => panic!("not a ring reply: {why}"),
            Ok(Progress::Need(n)) => n,
        };
        let have = bytes.len();
        bytes.resize(have + need, 0);
        match stream.read(&mut bytes[have..]) {
            Ok(0) => return format!("closed after {have} bytes"),
            Ok(n) => bytes.truncate(have + n),
            Err(e) => return format!("error: {e}"),
        }
    }
}

fn connect(addr: SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.write_all(bytes).unwrap();
    stream
}

/// The all-reduce of the formed ring must be the reference bits on every rank.
fn assert_ring_works(rings: &mut [RingCollective]) {
    let world = rings.len();
    let inputs: Vec<Vec<f32>> = (0..world).map(|r| input(r, 4099, 11)).collect();
    check_all_reduce(world, 4099, &all_reduce(rings, &inputs), &inputs);
}

#[test]
fn strangers_with_and_without_a_hello_are_refused_and_change_nothing() {
    // A long I/O timeout: a silent stranger must not cost the real ranks this wait.
    let opts = options(Duration::from_secs(20), 4096);
    let (mut rings, mut strangers, took) = ring_after(3, opts, |peers| {
        let mut huge_token = Hello::new(0, 3, TOKEN).encode();
        huge_token.truncate(wire::HELLO_FIXED_LEN);
        huge_token[21..25].copy_from_slice(&u32::MAX.to_le_bytes());
        // A peer left over from an earlier attempt: right rank and world, the old token.
        let earlier_attempt = Hello::new(0, 3, b"the-token-of-attempt-0").encode();
        let wrong_rank = Hello::new(2, 3, TOKEN).encode();
        vec![
            ("silent", connect(peers[1], b"")),
            ("http", connect(peers[1], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")),
            ("half a hello", connect(peers[1], &Hello::new(0, 3, TOKEN).encode()[..10])),
            ("huge token length", connect(peers[1], &huge_token)),
            ("earlier attempt", connect(peers[1], &earlier_attempt)),
            ("wrong rank", connect(peers[1], &wrong_rank)),
            ("to rank 0", connect(peers[0], b"\x00\x01\x02")),
        ]
    });
    assert!(took < Duration::from_secs(5), "forming the ring took {took:?}");
    let expected = [
        ("silent", "rank 0 connected first"),
        ("http", "not a ring peer"),
        ("half a hello", "rank 0 connected first"),
        ("huge token length", "4294967295 bytes is longer than 1024"),
        ("earlier attempt", "earlier attempt"),
        ("wrong rank", "rank 2 connected, but this rank expects its previous rank 0"),
        ("to rank 0", "not a ring peer"),
    ];
    for ((name, stream), (_, why)) in strangers.iter_mut().zip(expected) {
        let got = answer(stream);
        assert!(got.contains(why), "{name}: {got}");
    }
    assert_ring_works(&mut rings);
}

#[test]
fn more_strangers_than_pending_slots_do_not_lock_the_real_peer_out() {
    let opts = options(Duration::from_secs(20), 4096);
    let (mut rings, strangers, took) =
        ring_after(2, opts, |peers| (0..40).map(|_| connect(peers[1], b"TRN")).collect::<Vec<_>>());
    assert!(took < Duration::from_secs(5), "forming the ring took {took:?}");
    assert_ring_works(&mut rings);
    drop(strangers);
}

/// A client that sends its hello a byte at a time, slower than the I/O timeout allows in
/// all, is dropped when that timeout ends, not when it stops sending.
#[test]
fn a_trickling_stranger_is_dropped_at_the_io_timeout() {
    let listener = RingListener::bind(localhost()).unwrap();
    let addr = listener.local_addr();
    let peers = [localhost(), addr];
    let opts = RingOptions {
        connect_timeout: Duration::from_millis(1500),
        ..options(Duration::from_millis(400), 4096)
    };
    let start = Instant::now();
    let (error, answer) = thread::scope(|scope| {
        let rank1 = scope.spawn(|| RingCollective::connect(listener, 1, 2, &peers, opts));
        let mut stream = TcpStream::connect(addr).unwrap();
        let hello = Hello::new(0, 2, TOKEN).encode();
        // A byte every 50 ms until the refusal comes (writing on after it would reset the
        // connection and lose the reply).
        let refused = |s: &TcpStream| {
            s.set_nonblocking(true).unwrap();
            let ready = s.peek(&mut [0u8; 1]).is_ok();
            s.set_nonblocking(false).unwrap();
            ready
        };
        for byte in &hello[..hello.len() - 1] {
            if refused(&stream) || start.elapsed() > Duration::from_secs(1) {
                break;
            }
            stream.write_all(std::slice::from_ref(byte)).unwrap();
            thread::sleep(Duration::from_millis(50));
        }
        (rank1.join().unwrap().unwrap_err(), answer(&mut stream))
    });
    assert!(answer.contains("no complete hello within 400 ms"), "{answer}");
    let message = error.to_string();
    assert!(
        message.contains("timed out") && message.contains("no complete hello within 400 ms"),
        "{message}"
    );
    assert!(start.elapsed() < Duration::from_secs(3), "{:?}", start.elapsed());
}

#[test]
fn the_ring_port_closes_once_the_ring_is_formed() {
    let (mut rings, peers, _) = ring_after(2, options(Duration::from_secs(10), 4096), <[SocketAddr]>::to_vec);
    for addr in peers {
        assert!(TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_err(), "{addr} still accepts");
    }
    assert_ring_works(&mut rings);
}

/// A fake rank 0 that passes the handshake (it has the token), then runs `send` on its
/// connection to rank 1 in place of an op. Returns rank 1's error for an all-reduce.
fn rank1_against_a_broken_rank0(send: impl FnOnce(&mut TcpStream) + Send) -> CollectiveError {
    let fake = TcpListener::bind(localhost()).unwrap();
    let rank1 = RingListener::bind(localhost()).unwrap();
    let peers = [fake.local_addr().unwrap(), rank1.local_addr()];
    let opts = options(Duration::from_secs(2), 4096);
    thread::scope(|scope| {
        let real = scope.spawn(|| {
            let mut ring = RingCollective::connect(rank1, 1, 2, &peers, opts)?;
            let mut buffer = vec![1.0f32; 1000];
            ring.all_reduce_mean_slice(&mut buffer)
        });
        // Rank 1 connects to us: accept it.
        let (mut from_rank1, _) = fake.accept().unwrap();
        let mut hello = vec![0u8; wire::HELLO_FIXED_LEN + TOKEN.len()];
        from_rank1.read_exact(&mut hello).unwrap();
        from_rank1.write_all(&Reply::encode(0, 2, None)).unwrap();
        // We connect to rank 1 as rank 0.
        let mut to_rank1 = connect(peers[1], &Hello::new(0, 2, TOKEN).encode());
        let mut reply = vec![0u8; wire::REPLY_FIXED_LEN];
        to_rank1.read_exact(&mut reply).unwrap();
        assert_eq!(
            wire::parse_reply(&reply),
            Ok(Progress::Complete(Reply::Accepted { rank: 1, world_size: 2 }))
        );
        send(&mut to_rank1);
        real.join().unwrap().unwrap_err()
    })
}

#[test]
fn an_op_header_with_a_huge_length_fails_the_op_without_allocating_for_it() {
    let error = rank1_against_a_broken_rank0(|s| {
        let header = OpHeader { kind: OpKind::AllReduceMean, seq: 0, len: u64::MAX, root: 0 };
        s.write_all(&header.encode()).unwrap();
        // More than any buffer: none of it may be read as data.
        let _ = s.write_all(&[0xFF; 1 << 16]);
    });
    let message = error.to_string();
    assert!(matches!(error, CollectiveError::Invalid { .. }), "{message}");
    assert!(
        message.contains("ranks disagree on the op")
            && message.contains("18446744073709551615 elements")
            && message.contains("1000 elements"),
        "{message}"
    );
}

#[test]
fn garbage_in_place_of_an_op_header_fails_the_op_naming_the_peer() {
    let error = rank1_against_a_broken_rank0(|s| s.write_all(&[0xAB; wire::HEADER_LEN]).unwrap());
    let message = error.to_string();
    assert!(message.contains("rank 0") && message.contains("not an op header"), "{message}");
}

#[test]
fn a_peer_that_hangs_up_after_the_handshake_fails_the_op_at_once() {
    let start = Instant::now();
    let error = rank1_against_a_broken_rank0(|s| s.shutdown(std::net::Shutdown::Both).unwrap());
    assert!(matches!(error, CollectiveError::Peer { .. }), "{error}");
    assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
}
