//! The coordinator's gRPC surface, from a plain tonic client against the real binary on
//! 127.0.0.1 (--external-workers, so that no worker process joins): health, the job secret,
//! protocol versions, the number of ranks, malformed requests, shards, rendezvous, and the
//! register timeout. A small synthetic corpus keeps these independent of IMDB_DATA.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use trainer_proto::v1::coordinator_client::CoordinatorClient;
use trainer_proto::v1::{
    worker_message, Hello, RegisterRequest, RegisterResponse, RendezvousRequest, ShardRequest, Split,
    WorkerIdentity, WorkerMessage,
};
use trainer_proto::{ClientAuth, JobSecret, PROTOCOL_VERSION};
use trainer_tests::ExternalCoordinator;

const SECRET: &str = "protocol-test-secret-c0ffee";

/// The coordinator with --external-workers on 50 train and 20 test synthetic reviews per
/// label, batch 4, one epoch.
fn start_coordinator(workers: usize, extra: &[&str]) -> ExternalCoordinator {
    let args = [&["--batch-size", "4", "--epochs", "1"][..], extra].concat();
    ExternalCoordinator::start(&common::bin("coordinator"), workers, SECRET, (50, 20), &args)
}

type Client = CoordinatorClient<InterceptedService<Channel, ClientAuth>>;

async fn channel(url: &str) -> Channel {
    Channel::from_shared(url.to_string()).unwrap().connect().await.unwrap()
}

async fn client(url: &str, secret: &str) -> Client {
    CoordinatorClient::with_interceptor(channel(url).await, ClientAuth::new(&JobSecret::new(secret).unwrap()))
}

fn register_request(version: u32, pid: u32) -> RegisterRequest {
    RegisterRequest {
        protocol_version: version,
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grpc_surface_checks_secrets_versions_ranks_and_input() {
    let mut coord = start_coordinator(2, &["--register-timeout", "120", "--rendezvous-timeout", "20"]);
    let url = format!("http://{}", coord.addr());

    // Health: SERVING to a plain client without any secret (the kubelet's `grpc:` probe
    // sends none), and with one; it reveals nothing else.
    let mut health = HealthClient::new(channel(&url).await);
    let reply = health.check(HealthCheckRequest { service: String::new() }).await.unwrap();
    assert_eq!(reply.into_inner().status, ServingStatus::Serving as i32);
    let reply = health.check(HealthCheckRequest { service: "trainer.v1.Coordinator".into() }).await.unwrap();
    assert_eq!(reply.into_inner().status, ServingStatus::Serving as i32);
    let e = health.check(HealthCheckRequest { service: "no.such.Service".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let reply = HealthClient::with_interceptor(
        channel(&url).await,
        ClientAuth::new(&JobSecret::new("not-the-secret").unwrap()),
    )
    .check(HealthCheckRequest { service: String::new() })
    .await
    .unwrap();
    assert_eq!(reply.into_inner().status, ServingStatus::Serving as i32);

    // Coordinator RPCs: missing and wrong secrets, on every method.
    let e = CoordinatorClient::new(channel(&url).await)
        .register(register_request(PROTOCOL_VERSION, 1))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = client(&url, "not-the-secret")
        .await
        .register(register_request(PROTOCOL_VERSION, 1))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(!e.message().contains(SECRET));
    let e = CoordinatorClient::new(channel(&url).await)
        .fetch_shard(ShardRequest { worker: None, split: Split::Train as i32, epoch: 0 })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");

    let mut c = client(&url, SECRET).await;
    // Another protocol version: refused, and the message states both.
    let other = PROTOCOL_VERSION + 998;
    let e = c.register(register_request(other, 1)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains(&format!("protocol version {other}"))
            && e.message().contains(&format!("protocol version {PROTOCOL_VERSION}")),
        "{}",
        e.message()
    );
    // Malformed registrations.
    for (req, what) in [
        (register_request(0, 1), "protocol_version"),
        (register_request(PROTOCOL_VERSION, 0), "pid"),
        (
            RegisterRequest { hostname: "h".repeat(10_000), ..register_request(PROTOCOL_VERSION, 1) },
            "hostname",
        ),
    ] {
        let e = c.register(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(what), "{}", e.message());
    }

    // Two ranks, in registration order; a third is refused.
    let r0 = c.register(register_request(PROTOCOL_VERSION, 100)).await.unwrap().into_inner();
    let r1 = c.register(register_request(PROTOCOL_VERSION, 101)).await.unwrap().into_inner();
    assert_eq!((r0.rank, r1.rank, r0.world_size), (0, 1, 2));
    assert_ne!(r0.worker_token, r1.worker_token);
    let config: trainer_core::JobConfig = toml_config(&r0.job_config_toml);
    assert_eq!(config.train.batch_size, 4);
    assert!(r0.vocab_size > 2 && r0.heartbeat_timeout_ms > r0.heartbeat_interval_ms);
    let e = c.register(register_request(PROTOCOL_VERSION, 102)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("2 ranks"), "{}", e.message());

    // Shards: equal, disjoint train shards; a stolen rank is refused.
    let mut train = Vec::new();
    for r in [&r0, &r1] {
        let mut stream = c
            .fetch_shard(ShardRequest { worker: Some(identity(r)), split: Split::Train as i32, epoch: 0 })
            .await
            .unwrap()
            .into_inner();
        let mut ids = Vec::new();
        while let Some(chunk) = stream.message().await.unwrap() {
            assert_eq!(chunk.lengths.len(), chunk.review_ids.len());
            assert_eq!(chunk.tokens.len() as u32, chunk.lengths.iter().sum::<u32>());
            assert!(chunk.tokens.iter().all(|&t| t < r0.vocab_size));
            ids.extend(chunk.review_ids.iter().zip(chunk.labels.iter()).map(|(&i, &l)| (i, l)));
        }
        train.push(ids);
    }
    // 100 train reviews, 10% held out: 90, 2 ranks x batch 4 -> 11 batches of 4 each.
    assert_eq!((train[0].len(), train[1].len()), (44, 44));
    assert!(train[0].iter().all(|x| !train[1].contains(x)), "train shards overlap");
    let stolen = WorkerIdentity { rank: 1, attempt: 0, worker_token: r0.worker_token.clone() };
    let e = c
        .fetch_shard(ShardRequest { worker: Some(stolen), split: Split::Test as i32, epoch: 0 })
        .await
        .expect_err("a request with another rank's token must fail");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = c
        .fetch_shard(ShardRequest { worker: Some(identity(&r0)), split: 42, epoch: 0 })
        .await
        .expect_err("an unknown split must fail");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // Rendezvous: both ranks get every address in rank order; a second report is refused.
    let (mut ca, mut cb) = (c.clone(), c.clone());
    let (id0, id1) = (identity(&r0), identity(&r1));
    let a = tokio::spawn(async move {
        ca.rendezvous(RendezvousRequest {
            worker: Some(id0),
            ring_address: "127.0.0.1:7000".into(),
            nccl_unique_id: vec![],
            device: "cpu".into(),
            nccl_available: false,
            nccl_version: String::new(),
        })
        .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let b = cb
        .rendezvous(RendezvousRequest {
            worker: Some(id1),
            ring_address: "127.0.0.1:7001".into(),
            nccl_unique_id: vec![],
            device: "cpu".into(),
            nccl_available: false,
            nccl_version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let a = a.await.unwrap().unwrap().into_inner();
    assert_eq!(a.ring_addresses, ["127.0.0.1:7000", "127.0.0.1:7001"]);
    assert_eq!(a.ring_addresses, b.ring_addresses);
    assert_eq!(a.ring_token, b.ring_token);
    assert!(a.ring_token.len() >= 16);
    // CPU ranks: the coordinator's `auto` picks the ring.
    assert_eq!((a.backend.as_str(), b.backend.as_str()), ("ring", "ring"));
    let e = c
        .rendezvous(RendezvousRequest {
            worker: Some(identity(&r1)),
            ring_address: "127.0.0.1:7002".into(),
            nccl_unique_id: vec![],
            device: "cpu".into(),
            nccl_available: false,
            nccl_version: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");

    // A session must start with a hello.
    let first = WorkerMessage {
        worker: Some(identity(&r0)),
        body: Some(worker_message::Body::Ready(Default::default())),
    };
    let e = c.session(tokio_stream::iter(vec![first])).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // A hello with a forged token is refused too.
    let forged = WorkerIdentity { worker_token: "0".repeat(32), ..identity(&r0) };
    let hello = WorkerMessage { worker: Some(forged), body: Some(worker_message::Body::Hello(Hello {})) };
    let e = c.session(tokio_stream::iter(vec![hello])).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    coord.kill();
    coord.wait(Duration::from_secs(10));
    assert!(!coord.stderr().contains(SECRET), "the secret leaked into the coordinator's log");
}

/// Rank hints: a hinted worker gets its rank whatever the order; an unhinted one the lowest
/// free rank; a duplicate in the same attempt is refused naming the rank (and who holds
/// it); a hint beyond the world size is refused naming the range.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rank_hints_are_honoured_and_duplicates_refused() {
    let mut coord = start_coordinator(3, &["--register-timeout", "60"]);
    let url = format!("http://{}", coord.addr());
    let mut c = client(&url, SECRET).await;
    let hinted = |hint: u32, pid: u32| RegisterRequest {
        rank_hint: Some(hint),
        ..register_request(PROTOCOL_VERSION, pid)
    };

    let r2 = c.register(hinted(2, 200)).await.unwrap().into_inner();
    assert_eq!((r2.rank, r2.world_size), (2, 3));
    let e = c.register(hinted(2, 201)).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert!(
        e.message().contains("rank 2 is already taken") && e.message().contains("pid 200"),
        "{}",
        e.message()
    );
    let e = c.register(hinted(3, 202)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("rank hint 3 is out of range") && e.message().contains("0 to 2"),
        "{}",
        e.message()
    );
    // Without a hint: the lowest free rank.
    let r0 = c.register(register_request(PROTOCOL_VERSION, 203)).await.unwrap().into_inner();
    assert_eq!(r0.rank, 0);
    let e = c.register(hinted(0, 204)).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    let r1 = c.register(hinted(1, 205)).await.unwrap().into_inner();
    assert_eq!(r1.rank, 1);
    let e = c.register(register_request(PROTOCOL_VERSION, 206)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    coord.kill();
}

fn toml_config(text: &str) -> trainer_core::JobConfig {
    // The job config is TOML; go through a file to use the public loader.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, text).unwrap();
    trainer_core::JobConfig::from_toml_file(&path).unwrap()
}

#[test]
fn external_workers_that_never_come_time_out_with_a_clear_message() {
    let mut coord = start_coordinator(3, &["--register-timeout", "2"]);
    let (status, took) = coord.wait(Duration::from_secs(30));
    let stderr = coord.stderr();
    assert!(!status.success());
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(
        stderr.contains("only 0 of 3 workers registered") && stderr.contains("--register-timeout"),
        "{stderr}"
    );
    assert!(!stderr.contains(SECRET));
}

#[test]
fn a_missing_worker_binary_is_refused_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(common::bin("coordinator"))
        .args(["--workers", "2", "--worker-bin"])
        .arg(dir.path().join("no-such-worker"))
        .env_remove("TRAINER_JOB_SECRET")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no-such-worker") && stderr.contains("does not exist"), "{stderr}");
}

#[test]
fn external_workers_need_a_shared_secret() {
    let out = Command::new(common::bin("coordinator"))
        .args(["--workers", "2", "--external-workers"])
        .env_remove("TRAINER_JOB_SECRET")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("TRAINER_JOB_SECRET"), "{stderr}");
}

#[test]
fn an_empty_env_var_counts_as_unset() {
    // As a Makefile or `IMDB_DATA= coordinator ...` leaves it: not "--data with no value".
    let out = Command::new(common::bin("coordinator"))
        .args(["--workers", "2", "--external-workers"])
        .env("IMDB_DATA", "")
        .env("COORDINATOR_WORKER_THREADS", "")
        .env_remove("TRAINER_JOB_SECRET")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("a value is required"), "{stderr}");
    assert!(stderr.contains("TRAINER_JOB_SECRET"), "{stderr}");
}

/// A stand-in worker binary: a shell script (the real `worker join` is tested elsewhere).
fn script(dir: &Path, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("fake-worker");
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn local_coordinator(worker_bin: &Path, extra: &[&str]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let data = trainer_tests::write_synthetic_corpus(dir.path(), 50, 20);
    Command::new(common::bin("coordinator"))
        .args(["--workers", "2", "--batch-size", "4", "--epochs", "1", "--no-cache"])
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(dir.path().join("run"))
        .arg("--worker-bin")
        .arg(worker_bin)
        .args(extra)
        .env_remove("TRAINER_JOB_SECRET")
        .env_remove("TRAINER_CONFIG")
        .output()
        .unwrap()
}

#[test]
fn a_local_worker_that_exits_is_reported_with_its_status() {
    let dir = tempfile::tempdir().unwrap();
    let bin = script(dir.path(), "exit 3");
    let out = local_coordinator(&bin, &["--register-timeout", "60"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("exited with status 3"), "{stderr}");
}

#[test]
fn local_workers_that_never_register_are_killed_on_exit() {
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    // Each fake worker records its pid and the env it got, then hangs.
    let bin = script(
        dir.path(),
        &format!(
            "echo $$ >> {}; [ -n \"$TRAINER_JOB_SECRET\" ] && [ -n \"$COORDINATOR_ADDR\" ] && [ -n \"$WORKER_THREADS\" ] && echo env-ok >> {}; exec sleep 300",
            pids.display(),
            pids.display()
        ),
    );
    let start = Instant::now();
    let out = local_coordinator(&bin, &["--register-timeout", "2"]);
    assert!(start.elapsed() < Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("only 0 of 2 workers registered"), "{stderr}");
    let text = std::fs::read_to_string(&pids).unwrap();
    assert_eq!(text.lines().filter(|l| *l == "env-ok").count(), 2, "{text}");
    for pid in text.lines().filter_map(|l| l.parse::<i32>().ok()) {
        // `sleep` replaced the shell under the same pid; it must be gone (not even a zombie
        // of ours: the coordinator reaped it before exiting).
        let alive = Path::new(&format!("/proc/{pid}")).exists();
        assert!(!alive, "worker pid {pid} was left behind");
    }
}

#[test]
fn ctrl_c_stops_the_local_workers_and_exits_130() {
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    let bin = script(dir.path(), &format!("echo $$ >> {}; exec sleep 300", pids.display()));
    let data = trainer_tests::write_synthetic_corpus(dir.path(), 50, 20);
    let child = Command::new(common::bin("coordinator"))
        .args([
            "--workers",
            "2",
            "--batch-size",
            "4",
            "--epochs",
            "1",
            "--no-cache",
            "--register-timeout",
            "60",
        ])
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(dir.path().join("run"))
        .arg("--worker-bin")
        .arg(&bin)
        .env_remove("TRAINER_JOB_SECRET")
        .env_remove("TRAINER_CONFIG")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while std::fs::read_to_string(&pids).map_or(0, |t| t.lines().count()) < 2 {
        assert!(start.elapsed() < Duration::from_secs(30), "the workers never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    let sent = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(sent.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted by SIGINT"), "{stderr}");
    for pid in std::fs::read_to_string(&pids).unwrap().lines() {
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "worker pid {pid} was left behind");
    }
}
