//! Hostile or broken peers against the real coordinator and workers on 127.0.0.1: messages
//! at and over the gRPC size limit, a worker of an attempt that a restart ended, session
//! messages with numbers outside the job, an undialable ring address, and strangers at a
//! worker's ring port during a real job. Each gets a clear error; nothing panics or hangs,
//! and the job's result is bitwise what it is without them.
//! (A rank out of range and a second registration under one rank: coordinator_protocol.rs.)

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::Code;
use trainer_proto::v1::coordinator_client::CoordinatorClient;
use trainer_proto::v1::{
    worker_message, ArtifactChunk, Hello, RegisterRequest, RegisterResponse, RendezvousRequest, ShardRequest,
    Split, StepMetrics, WorkerError, WorkerIdentity, WorkerMessage,
};
use trainer_proto::{check_message_size, ClientAuth, JobSecret, MAX_MESSAGE_BYTES, PROTOCOL_VERSION};
use trainer_tests::ExternalCoordinator;

const SECRET: &str = "hostile-test-secret-5ca1ab1e";

type Client = CoordinatorClient<InterceptedService<Channel, ClientAuth>>;

fn start_coordinator(workers: usize, extra: &[&str]) -> ExternalCoordinator {
    let args = [&["--batch-size", "4", "--epochs", "1", "--register-timeout", "120"][..], extra].concat();
    ExternalCoordinator::start(&bin("coordinator"), workers, SECRET, (50, 20), &args)
}

/// A client without the workers' encoding limit (tonic's default is none), as a foreign or
/// broken client would be.
async fn raw_client(coord: &ExternalCoordinator) -> Client {
    let channel = Channel::from_shared(format!("http://{}", coord.addr())).unwrap().connect().await.unwrap();
    CoordinatorClient::with_interceptor(channel, ClientAuth::new(&JobSecret::new(SECRET).unwrap()))
}

fn register_request(pid: u32) -> RegisterRequest {
    RegisterRequest {
        protocol_version: PROTOCOL_VERSION,
        build_version: "test".into(),
        hostname: "test-host".into(),
        pid,
        devices: vec![],
        rank_hint: None,
    }
}

fn identity(r: &RegisterResponse) -> WorkerIdentity {
    WorkerIdentity { rank: r.rank, attempt: r.attempt, worker_token: r.worker_token.clone() }
}

fn message(who: &WorkerIdentity, body: worker_message::Body) -> WorkerMessage {
    WorkerMessage { worker: Some(who.clone()), body: Some(body) }
}

fn hello(who: &WorkerIdentity) -> WorkerMessage {
    message(who, worker_message::Body::Hello(Hello {}))
}

/// Waits until the coordinator's log has a line with `needle`, and returns that line.
fn log_line(coord: &ExternalCoordinator, needle: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        if let Some(line) = coord.stderr().lines().find(|l| l.contains(needle)) {
            return line.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no log line with {needle:?} within {within:?}:\n{}",
            coord.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Bounds a call that must not hang.
async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), f).await.unwrap_or_else(|_| panic!("{what} hung"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_at_and_over_the_size_limit_get_clear_errors() {
    let mut coord = start_coordinator(1, &[]);
    let mut raw = raw_client(&coord).await;
    let limit = MAX_MESSAGE_BYTES.to_string();

    // Over the limit: tonic's own checks answer at once, but say little. A client's encoding
    // limit fails the body of its stream, which HTTP/2 reports as a reset ("h2 protocol
    // error"); the coordinator's decoding limit answers OUT_OF_RANGE naming the limit, and
    // resets the stream the client is still sending on, which the client may report first.
    // trainer_proto::check_message_size says it plainly before anything is sent.
    let huge = RegisterRequest { hostname: "h".repeat(MAX_MESSAGE_BYTES + 1), ..register_request(1) };
    let e = check_message_size("the registration", &huge).unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange);
    assert!(
        e.message().contains("the registration is 67108880 bytes") && e.message().contains(&limit),
        "{}",
        e.message()
    );
    let mut ours = raw.clone().max_encoding_message_size(MAX_MESSAGE_BYTES);
    for client in [&mut ours, &mut raw] {
        let start = Instant::now();
        let e = within("an oversize request", client.register(huge.clone())).await.unwrap_err();
        let named =
            e.code() == Code::OutOfRange && e.message().contains("too large") && e.message().contains(&limit);
        let reset = e.code() == Code::Internal && e.message().contains("h2 protocol error");
        assert!(named || reset, "{e:?}");
        assert!(start.elapsed() < Duration::from_secs(20), "{:?}", start.elapsed());
    }

    // Just under the limit: decoded, and refused by the field check that names the field.
    let near = RegisterRequest { hostname: "h".repeat(MAX_MESSAGE_BYTES - 1024), ..register_request(1) };
    let e = within("a request near the limit", raw.register(near)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("hostname is") && e.message().contains("at most 256"), "{}", e.message());

    // An oversize upload chunk and an oversize session message end those streams alone.
    let r = raw.register(register_request(7)).await.unwrap().into_inner();
    let who = identity(&r);
    let chunk = ArtifactChunk {
        worker: Some(who.clone()),
        kind: 2,
        total_bytes: MAX_MESSAGE_BYTES as u64 * 2,
        data: vec![0u8; MAX_MESSAGE_BYTES + 1],
        ..Default::default()
    };
    let e =
        within("an oversize upload", raw.upload_artifact(tokio_stream::iter(vec![chunk]))).await.unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    let big_error =
        message(&who, worker_message::Body::Error(WorkerError { message: "x".repeat(MAX_MESSAGE_BYTES) }));
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tx.send(hello(&who)).await.unwrap();
    let session = within("a session", raw.session(tokio_stream::wrappers::ReceiverStream::new(rx))).await;
    let mut down = session.expect("the hello opens the session").into_inner();
    tx.send(big_error).await.unwrap();
    // The coordinator closes the session naming the cause, then restarts the group.
    let line = log_line(&coord, "decoded message length too large", Duration::from_secs(30));
    assert!(line.contains("rank 0"), "{line}");
    let _ = within("the end of the session", down.message()).await;
    // Still serving: the next attempt takes registrations.
    log_line(&coord, "restart 1/", Duration::from_secs(30));
    let again = within("a registration", raw.register(register_request(8))).await.unwrap().into_inner();
    assert_eq!((again.rank, again.attempt), (0, 1));
    coord.kill();
    assert!(!coord.stderr().contains("panicked"), "{}", coord.stderr());
}

/// A worker of attempt 0 that is still around after the group restarted: every call it
/// makes is refused with FAILED_PRECONDITION naming both attempts, and it cannot take a
/// rank, a session or a ring slot of the new attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_of_an_ended_attempt_is_refused_everywhere() {
    let mut coord = start_coordinator(1, &["--rendezvous-timeout", "5"]);
    let mut c = raw_client(&coord).await;
    let old = identity(&c.register(register_request(10)).await.unwrap().into_inner());
    // Its session ends (a lost worker): the coordinator restarts the group.
    let session = c.session(tokio_stream::iter(vec![hello(&old)])).await.unwrap();
    drop(session);
    log_line(&coord, "restart 1/", Duration::from_secs(30));
    let new = identity(&c.register(register_request(11)).await.unwrap().into_inner());
    assert_eq!((new.rank, new.attempt), (0, 1));

    let refused = |e: tonic::Status| {
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains("attempt 0 is over; the job is at attempt 1"), "{}", e.message());
    };
    refused(
        c.fetch_shard(ShardRequest { worker: Some(old.clone()), split: Split::Train as i32, epoch: 0 })
            .await
            .unwrap_err(),
    );
    refused(c.session(tokio_stream::iter(vec![hello(&old)])).await.unwrap_err());
    let ring = |who: &WorkerIdentity| RendezvousRequest {
        worker: Some(who.clone()),
        ring_address: "127.0.0.1:7000".into(),
        device: "cpu".into(),
        ..Default::default()
    };
    refused(c.rendezvous(ring(&old)).await.unwrap_err());
    let chunk = ArtifactChunk {
        worker: Some(old.clone()),
        kind: 2,
        total_bytes: 1,
        data: vec![0],
        ..Default::default()
    };
    refused(c.upload_artifact(tokio_stream::iter(vec![chunk])).await.unwrap_err());
    // The new attempt's worker is untouched by all that: its session and rendezvous work.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(hello(&new)).await.unwrap();
    let _down = c.session(tokio_stream::wrappers::ReceiverStream::new(rx)).await.expect("the new session");
    let reply = c.rendezvous(ring(&new)).await.unwrap().into_inner();
    assert_eq!(reply.ring_addresses, ["127.0.0.1:7000"]);
    coord.kill();
    assert!(!coord.stderr().contains("panicked"), "{}", coord.stderr());
}

/// A rank beyond the world in a worker identity is refused; session messages whose numbers
/// no job of this size can produce close that session with a protocol error naming the
/// field (before, an epoch of u64::MAX overflowed the driver's step arithmetic); a ring
/// address nobody can dial is refused at the rendezvous.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_session_messages_and_bad_ring_addresses_are_refused() {
    let mut coord = start_coordinator(1, &[]);
    let mut c = raw_client(&coord).await;
    let who = identity(&c.register(register_request(20)).await.unwrap().into_inner());
    // A rank beyond the world in a worker identity: not registered, whatever its token.
    let beyond = WorkerIdentity { rank: u32::MAX, ..who.clone() };
    let e = c
        .fetch_shard(ShardRequest { worker: Some(beyond), split: Split::Test as i32, epoch: 0 })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("rank 4294967295 is not registered (1 of 1 ranks are)"), "{}", e.message());
    for address in ["a b:7000", "127.0.0.1:0", "127.0.0.1", "[fe80::1:7000"] {
        let e = c
            .rendezvous(RendezvousRequest {
                worker: Some(who.clone()),
                ring_address: address.into(),
                device: "cpu".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{address}: {e:?}");
        assert!(e.message().contains("ring_address must be host:port"), "{}", e.message());
    }
    let step = StepMetrics { epoch: u64::MAX, step: u64::MAX, samples: 1, tokens: 1, ..Default::default() };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(hello(&who)).await.unwrap();
    let _down = c.session(tokio_stream::wrappers::ReceiverStream::new(rx)).await.expect("a session");
    tx.send(message(&who, worker_message::Body::Step(step))).await.unwrap();
    let line = log_line(&coord, "restart 1/", Duration::from_secs(30));
    assert!(
        line.contains("protocol error: rank 0 sent step.epoch = 18446744073709551615 is out of range"),
        "{line}"
    );
    coord.kill();
    assert!(!coord.stderr().contains("panicked"), "{}", coord.stderr());
}

/// A free port on 127.0.0.1 (bound, then released for the worker to take).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

const RING_JOB: &str = r#"
[data]
val_fraction = 0.2
[model]
embed_dim = 8
hidden = 8
layers = 1
dropout = 0.2
[train]
batch_size = 4
epochs = 2
lr = 0.01
seed = 11
device = "cpu"
log_every = 5
eval_batch_size = 50
"#;

fn ring_worker(coord: &ExternalCoordinator, rank: usize, port: u16, marker: &str) -> Child {
    scrubbed(Command::new(bin("worker")), marker)
        .args(["join", "--ring-listen", &format!("127.0.0.1:{port}")])
        .env("COORDINATOR_ADDR", coord.addr())
        .env("TRAINER_JOB_SECRET", SECRET)
        .env("TRAINER_RANK", rank.to_string())
        .env("WORKER_THREADS", "1")
        .env("WORKER_RING_TIMEOUT", "20")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start a worker")
}

/// What strangers send to a ring port: nothing, HTTP, a hello of another attempt (the
/// right shape, a stale token), a hello whose token length is 4 GiB.
fn stranger_payloads() -> Vec<Vec<u8>> {
    let hello = |token: &[u8], len: u32| {
        let mut h = b"TRNRING1".to_vec();
        h.extend_from_slice(&1u32.to_le_bytes());
        h.push(if cfg!(target_endian = "little") { 1 } else { 2 });
        h.extend_from_slice(&2u32.to_le_bytes());
        h.extend_from_slice(&1u32.to_le_bytes());
        h.extend_from_slice(&len.to_le_bytes());
        h.extend_from_slice(token);
        h
    };
    vec![Vec::new(), b"GET / HTTP/1.1\r\n\r\n".to_vec(), hello(&[7u8; 32], 32), hello(&[], u32::MAX)]
}

/// Runs the 2-worker ring job; with `strangers`, they connect to rank 0's ring port after it
/// reported it and before rank 1 starts (so they queue ahead of the real peer), and keep
/// connecting until the job ends. Returns the replica checksums and rank 0's log.
fn ring_job(strangers: bool) -> (Vec<serde_json::Value>, String, usize) {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), RING_JOB);
    let marker = format!("hostile-ring-{}-{strangers}", std::process::id());
    let args = ["--config", config.to_str().unwrap(), "--rendezvous-timeout", "60"];
    let mut coord = ExternalCoordinator::start(&bin("coordinator"), 2, SECRET, (60, 20), &args);
    let ports = [free_port(), free_port()];
    let mut rank0 = ring_worker(&coord, 0, ports[0], &marker);
    let rank0_log = LogLines::of(&mut rank0, Duration::from_secs(120));
    let stop = Arc::new(AtomicBool::new(false));
    let mut stranger = None;
    if strangers {
        log_line(&coord, &format!("address=127.0.0.1:{}", ports[0]), Duration::from_secs(60));
        let target = SocketAddr::from(([127, 0, 0, 1], ports[0]));
        let mut held = Vec::new();
        for payload in stranger_payloads() {
            let mut s = TcpStream::connect(target).expect("the ring port listens");
            s.write_all(&payload).unwrap();
            held.push(s);
        }
        let stop = Arc::clone(&stop);
        // Bounded: at most 200 more connections, 5 ms apart, until the job ends.
        stranger = Some(std::thread::spawn(move || {
            let mut count = held.len();
            for payload in stranger_payloads().iter().cycle().take(200) {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                if let Ok(mut s) = TcpStream::connect_timeout(&target, Duration::from_millis(200)) {
                    let _ = s.write_all(payload);
                    count += 1;
                    held.push(s);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            count
        }));
    }
    let mut rank1 = ring_worker(&coord, 1, ports[1], &marker);
    let (status, _) = coord.wait(Duration::from_secs(180));
    stop.store(true, Ordering::Relaxed);
    let connections = stranger.map_or(0, |t| t.join().unwrap());
    let mut rank0_log = rank0_log;
    for w in [&mut rank0, &mut rank1] {
        assert!(wait_exit(w, Duration::from_secs(30)).success(), "a worker failed");
    }
    let log = rank0_log.drain();
    assert!(status.success(), "coordinator: {status}\n{}\nrank 0:\n{log}", coord.stderr());
    let s = summary(&coord.out);
    assert_none_left(&marker);
    (s["replica_checksums"].as_array().expect("replica_checksums").clone(), log, connections)
}

#[test]
fn strangers_at_a_ring_port_are_refused_and_change_no_bit_of_the_result() {
    let (clean, _, _) = ring_job(false);
    let (meddled, log, connections) = ring_job(true);
    assert!(connections >= 4, "{connections}");
    assert_eq!(clean.len(), 2);
    assert_eq!(clean[0], clean[1]);
    assert_eq!(meddled, clean, "strangers changed the result");
    for why in ["not a ring peer", "earlier attempt", "4294967295 bytes"] {
        assert!(
            log.lines().any(|l| l.contains("refused a ring connection") && l.contains(why)),
            "rank 0 logged no refusal for {why:?}:\n{log}"
        );
    }
    assert!(!log.contains("panicked"), "{log}");
}
