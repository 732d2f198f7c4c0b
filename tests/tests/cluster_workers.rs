//! Workers started the way a cluster starts them, as real processes on 127.0.0.1: an
//! external coordinator with its secret in a file (a mounted Secret), workers that find it
//! through MASTER_ADDR/MASTER_PORT or COORDINATOR_ADDR, ask for their rank with
//! JOB_COMPLETION_INDEX or TRAINER_RANK, advertise their ring address from POD_IP, and a
//! worker "pod" that is killed and started again by its supervisor: the group restarts and
//! the replacement gets the same rank.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// `worker join` with only the variables a pod would have (plus the test marker).
fn worker_pod(marker: &str, env: &[(&str, String)]) -> Child {
    let mut cmd = scrubbed(Command::new(bin("worker")), marker);
    for var in [
        "TRAINER_JOB_SECRET_FILE",
        "TRAINER_RANK",
        "JOB_COMPLETION_INDEX",
        "MASTER_ADDR",
        "MASTER_PORT",
        "POD_IP",
    ] {
        cmd.env_remove(var);
    }
    cmd.arg("join")
        .args(["--ring-listen", "0.0.0.0:0"])
        .env("WORKER_THREADS", "1")
        .env("WORKER_RING_TIMEOUT", "3")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start a worker")
}

#[test]
fn hinted_workers_keep_their_ranks_through_a_replaced_pod() {
    let Some(data) = imdb_data() else { return };
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), RESTARTABLE_JOB);
    let out = dir.path().join("run");
    let secret_file = dir.path().join("job-secret");
    // As `kubectl create secret --from-file` of a file written by echo: a trailing newline.
    std::fs::write(&secret_file, "cluster-test-secret-0badf00d\n").unwrap();
    let marker = format!("cluster-{}", std::process::id());

    let mut coordinator = scrubbed(Command::new(bin("coordinator")), &marker)
        .args(["--workers", "2", "--external-workers", "--listen", "127.0.0.1:0"])
        .arg("--config")
        .arg(&config)
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .args(["--heartbeat-timeout", "3", "--register-timeout", "120"])
        .env("TRAINER_JOB_SECRET_FILE", &secret_file)
        .env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the coordinator");
    let mut log = LogLines::of(&mut coordinator, Duration::from_secs(120));
    let line = log.wait_for("the advertised address", |l| l.contains("advertise="));
    let addr = field(&line, "advertise=").expect("advertise=").to_string();
    let port = addr.rsplit(':').next().unwrap().to_string();

    let secret = secret_file.display().to_string();
    // Pod 1 of an Indexed Job, found through PyTorchJob's variables; started first, so that
    // registration order alone would make it rank 0.
    let pod1_env = [
        ("JOB_COMPLETION_INDEX", "1".to_string()),
        ("MASTER_ADDR", "127.0.0.1".to_string()),
        ("MASTER_PORT", port.clone()),
        ("TRAINER_JOB_SECRET_FILE", secret.clone()),
        ("POD_IP", "127.0.0.1".to_string()),
    ];
    let mut pod1 = worker_pod(&marker, &pod1_env);
    let first = log.wait_for("pod 1's registration", |l| l.contains("worker registered"));
    assert_eq!(field(&first, "rank="), Some("1"), "{first}");
    assert_eq!(field(&first, "pid="), Some(pod1.id().to_string().as_str()), "{first}");
    let pod0_env = [
        ("TRAINER_RANK", "0".to_string()),
        ("COORDINATOR_ADDR", addr.clone()),
        ("TRAINER_JOB_SECRET_FILE", secret.clone()),
        ("POD_IP", "127.0.0.1".to_string()),
    ];
    let mut pod0 = worker_pod(&marker, &pod0_env);

    // Both advertise the pod IP, not a host name, for ring listeners bound to 0.0.0.0.
    for _ in 0..2 {
        let report = log.wait_for("a rendezvous report", |l| l.contains("rendezvous report"));
        assert!(field(&report, "address=").is_some_and(|a| a.starts_with("127.0.0.1:")), "{report}");
    }
    log.wait_for("a checkpoint in epoch 2", |l| {
        l.contains("checkpoint committed") && l.contains("epoch 2, step")
    });
    // The supervisor's view: pod 1 is killed (a node lost) and a new pod 1 is started.
    send_signal(pod1.id(), libc::SIGKILL);
    let status = pod1.wait().expect("reap pod 1");
    assert_eq!(status.code(), None, "killed");
    let mut pod1b = worker_pod(&marker, &pod1_env);
    let again = log.wait_for("the new pod 1's registration", |l| {
        l.contains("worker registered") && l.contains(&format!("pid={}", pod1b.id()))
    });
    assert_eq!(field(&again, "rank="), Some("1"), "{again}");
    assert!(again.contains("attempt=1"), "{again}");

    let status = wait_exit(&mut coordinator, Duration::from_secs(180));
    let text = log.drain();
    assert!(status.success(), "coordinator: {status}\n{text}");
    // Pod 0 restarted in place (it re-executes itself) and kept rank 0.
    assert!(
        text.lines()
            .any(|l| l.contains("worker registered") && l.contains(" rank=0 ") && l.contains("attempt=1")),
        "{text}"
    );
    for pod in [&mut pod0, &mut pod1b] {
        let status = wait_exit(pod, Duration::from_secs(30));
        assert!(status.success(), "a worker pod ended with {status}\n{text}");
    }
    let s = summary(&out);
    assert_eq!(s["world_size"], 2, "{s}");
    assert_eq!(s["restarts"], 1, "{s}");
    let sums = s["replica_checksums"].as_array().expect("replica_checksums");
    assert!(sums.len() == 2 && sums[0] == sums[1], "{sums:?}");
    assert_none_left(&marker);
}

/// A pod whose secret file is missing, or whose rank hint is beyond the world size, exits at
/// once with the usage code (2): a podFailurePolicy fails the job instead of retrying.
#[test]
fn a_bad_secret_file_or_rank_hint_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let marker = format!("cluster-bad-{}", std::process::id());
    let secret = "cluster-test-secret-abc";
    let coord = trainer_tests::ExternalCoordinator::start(
        &bin("coordinator"),
        2,
        secret,
        (40, 10),
        &["--batch-size", "4", "--epochs", "1", "--register-timeout", "60"],
    );
    let addr = coord.addr().to_string();
    let missing = dir.path().join("no-such-secret");
    let mut pod = worker_pod(
        &marker,
        &[("COORDINATOR_ADDR", addr.clone()), ("TRAINER_JOB_SECRET_FILE", missing.display().to_string())],
    );
    assert_eq!(wait_exit(&mut pod, Duration::from_secs(30)).code(), Some(2));

    let file = dir.path().join("secret");
    std::fs::write(&file, format!("{secret}\n")).unwrap();
    let mut pod = worker_pod(
        &marker,
        &[
            ("COORDINATOR_ADDR", addr.clone()),
            ("TRAINER_JOB_SECRET_FILE", file.display().to_string()),
            ("TRAINER_RANK", "5".to_string()),
        ],
    );
    assert_eq!(wait_exit(&mut pod, Duration::from_secs(30)).code(), Some(2));
    // No address at all: neither COORDINATOR_ADDR nor MASTER_ADDR.
    let mut pod = worker_pod(&marker, &[("TRAINER_JOB_SECRET_FILE", file.display().to_string())]);
    assert_eq!(wait_exit(&mut pod, Duration::from_secs(30)).code(), Some(2));
    let stderr = coord.stderr();
    assert!(!stderr.contains("worker registered"), "{stderr}");
    assert_none_left(&marker);
}

/// A coordinator name that does not resolve yet (its pod is not created) is retried, not
/// fatal, until --connect-timeout; then the worker exits 75 (retryable) naming the address.
#[test]
fn an_unresolvable_coordinator_is_retried_until_the_connect_timeout() {
    let marker = format!("cluster-dns-{}", std::process::id());
    let start = Instant::now();
    let mut cmd = scrubbed(Command::new(bin("worker")), &marker);
    let out = cmd
        .args(["join", "--connect-timeout", "3"])
        .env("COORDINATOR_ADDR", "job-coordinator-0.no-such-service.invalid:50051")
        .env("TRAINER_JOB_SECRET", "s3cret")
        .env("RUST_LOG", "debug")
        .output()
        .expect("run the worker");
    let waited = start.elapsed();
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(75), "{text}");
    assert!(waited >= Duration::from_secs(3), "gave up after {waited:?}\n{text}");
    assert!(text.contains("no-such-service.invalid:50051") && text.contains("retrying"), "{text}");
}

/// Workers on machines whose math libraries take different code paths still make the same
/// optimizer steps. MKL (inside libtorch) picks its vector-math path for the processor at
/// run time, and ATen its kernels (AVX2 or AVX-512); `MKL_CBWR` and `ATEN_CPU_CAPABILITY`
/// force them, as an older CPU in the node pool would. Adam's square root went through MKL's
/// path, so two such workers drifted apart from the first step and the job stopped at the
/// first epoch's checksum check. Clipping is on at every step, so the global norm counts too.
#[test]
fn workers_whose_math_library_takes_different_paths_keep_identical_replicas() {
    let dir = tempfile::tempdir().unwrap();
    let marker = format!("cluster-mkl-{}", std::process::id());
    let secret = "cluster-test-secret-mkl";
    let config = write_config(
        dir.path(),
        "[model]\nembed_dim = 16\nhidden = 16\nlayers = 1\ndropout = 0.0\n\n\
         [train]\nbatch_size = 8\nepochs = 2\nlr = 0.02\nclip_norm = 0.05\nseed = 5\ndevice = \"cpu\"\nlog_every = 5\nthreads = 1\n",
    );
    let config = config.display().to_string();
    let mut coord = trainer_tests::ExternalCoordinator::start(
        &bin("coordinator"),
        2,
        secret,
        (200, 20),
        &["--config", &config, "--register-timeout", "60"],
    );
    let addr = coord.addr().to_string();
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, secret).unwrap();
    let pod = |rank: &str, paths: &[(&'static str, &str)]| {
        let mut env = vec![
            ("COORDINATOR_ADDR", addr.clone()),
            ("TRAINER_JOB_SECRET_FILE", secret_file.display().to_string()),
            ("TRAINER_RANK", rank.to_string()),
        ];
        env.extend(paths.iter().map(|(k, v)| (*k, v.to_string())));
        worker_pod(&marker, &env)
    };
    // MKL's generic path and ATen's AVX2 kernels on one; on the other, the processor's own
    // (AVX-512 on the machines this runs on; the same as the first's where there is none).
    let mut pods = [
        pod("0", &[("MKL_CBWR", "COMPATIBLE"), ("ATEN_CPU_CAPABILITY", "avx2")]),
        pod("1", &[("MKL_CBWR", "AUTO")]),
    ];
    let (status, _) = coord.wait(Duration::from_secs(240));
    let log = coord.stderr();
    assert!(status.success(), "coordinator: {status}\n{log}");
    for pod in &mut pods {
        assert!(wait_exit(pod, Duration::from_secs(30)).success(), "{log}");
    }
    let s = summary(&coord.out);
    let sums = s["replica_checksums"].as_array().expect("replica_checksums");
    assert!(sums.len() == 2 && sums[0] == sums[1], "{sums:?}");
    assert_none_left(&marker);
}
