//! Watching a job: `/metrics` scraped from a running job and parsed with the Python
//! `prometheus_client` parser, `coordinator status` against the same job (with and without
//! the secret), and the run folder's `tb/` (read back with TensorBoard's own reader and
//! compared with metrics.jsonl) and `curves.png`, for a distributed run and `worker train`.
//!
//! The Python checks live in tests/python/; without the Python package they print a skip line
//! and the Rust-side checks still run.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const SECRET: &str = "observability-test-secret";

fn config() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/test-tiny.toml")
}

fn python_check(script: &str, args: &[&str]) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("python").join(script);
    let out = match Command::new("python3").arg(&path).args(args).output() {
        Ok(out) => out,
        Err(e) => {
            eprintln!("skipped: {script}: python3 cannot run ({e})");
            return;
        }
    };
    let text = format!("{}{}", stdout(&out), stderr(&out));
    if out.status.code() == Some(77) {
        eprintln!("{}", text.trim());
        return;
    }
    assert!(out.status.success(), "{script} failed:\n{text}");
    eprintln!("{}", text.trim());
}

/// GET http://addr/path; returns (status line, body).
fn http_get(addr: &str, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).expect("connect to /metrics");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").expect("request");
    let mut response = String::new();
    s.read_to_string(&mut response).expect("response");
    let (head, body) = response.split_once("\r\n\r\n").expect("HTTP response");
    (head.lines().next().unwrap_or_default().to_string(), body.to_string())
}

fn sample(body: &str, name_and_labels: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(name_and_labels).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{name_and_labels} missing in\n{body}"))
}

#[test]
fn a_running_job_serves_metrics_and_status() {
    let Some(data) = imdb_data() else { return };
    let dir = tempfile::tempdir().unwrap();
    let marker = format!("observe-{}", std::process::id());
    let mut child = coordinator(2, &config(), &dir.path().join("run"), &data, &marker)
        .args(["--epochs", "40", "--train-subset", "4000", "--metrics-listen", "127.0.0.1:0"])
        .env("TRAINER_JOB_SECRET", SECRET)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn coordinator");
    let rx = lines_of(&mut child);
    // The two addresses from the log, then the first training progress line.
    let (mut grpc, mut metrics, mut training) = (None, None, false);
    let mut log = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    while !(grpc.is_some() && metrics.is_some() && training) && Instant::now() < deadline {
        let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) else { continue };
        if line.contains("coordinator listening") {
            grpc = line.split_whitespace().find_map(|w| w.strip_prefix("listen=")).map(str::to_string);
        }
        if let Some(rest) = line.split("http://").nth(1).filter(|_| line.contains("metrics listening")) {
            metrics = rest.split('/').next().map(str::to_string);
        }
        training |= line.contains("training epoch=");
        log.push(line);
    }
    let (Some(grpc), Some(metrics)) = (grpc, metrics) else {
        let _ = child.kill();
        panic!("no addresses in the log:\n{}", log.join("\n"));
    };
    assert!(training, "training never started:\n{}", log.join("\n"));

    let (status_line, first) = http_get(&metrics, "/metrics");
    assert!(status_line.contains("200"), "{status_line}");
    // Let the counters move and the first validation finish (an epoch takes about a second).
    let steps_before = sample(&first, "trainer_steps_total{rank=\"0\"}");
    let mut second = first.clone();
    let until = Instant::now() + Duration::from_secs(60);
    while (sample(&second, "trainer_steps_total{rank=\"1\"}") <= steps_before + 2.0
        || !second.contains("trainer_eval_accuracy{split=\"validation\"}"))
        && Instant::now() < until
    {
        std::thread::sleep(Duration::from_millis(300));
        second = http_get(&metrics, "/metrics").1;
    }
    assert!(second.contains("trainer_epoch "), "{second}");
    assert_eq!(http_get(&metrics, "/nothing").0.split_whitespace().nth(1), Some("404"));
    std::fs::write(dir.path().join("first.txt"), &first).unwrap();
    std::fs::write(dir.path().join("second.txt"), &second).unwrap();
    let (a, b) = (dir.path().join("first.txt"), dir.path().join("second.txt"));
    python_check("check_prometheus.py", &[a.to_str().unwrap(), b.to_str().unwrap(), "2"]);

    // coordinator status: with the secret, the job and both ranks; without it, refused.
    let status =
        Command::new(bin("coordinator")).args(["status", &grpc]).env("TRAINER_JOB_SECRET", SECRET).output();
    let status = status.expect("coordinator status");
    let text = stdout(&status);
    assert!(status.status.success(), "{}{text}", stderr(&status));
    assert!(
        text.contains("job training")
            || text.contains("job evaluating")
            || text.contains("job checkpointing")
    );
    assert!(text.contains("/40") && text.contains("ETA") && text.contains("backend ring"), "{text}");
    for rank in ["0", "1"] {
        let row = text.lines().find(|l| l.split_whitespace().next() == Some(rank)).unwrap_or_default();
        assert!(
            row.contains("cpu") && row.contains("s ago") && row.contains("127.0.0.1:"),
            "rank {rank}: {text}"
        );
    }
    let json = Command::new(bin("coordinator"))
        .args(["status", &grpc, "--json"])
        .env("TRAINER_JOB_SECRET", SECRET)
        .output()
        .expect("coordinator status --json");
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).expect("status JSON");
    assert_eq!(v["world_size"], 2);
    assert_eq!(v["ranks"].as_array().map(Vec::len), Some(2));
    assert!(v["global_step"].as_u64() > Some(0), "{v}");
    let refused = Command::new(bin("coordinator"))
        .args(["status", &grpc])
        .env("TRAINER_JOB_SECRET", "not-the-secret")
        .output()
        .expect("coordinator status");
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("wrong job secret"), "{}", stderr(&refused));

    // Ctrl-C ends the job; nothing is left behind.
    send_signal(child.id(), libc::SIGINT);
    let status = wait_exit(&mut child, Duration::from_secs(20));
    assert_eq!(status.code(), Some(130));
    assert_none_left(&marker);
}

fn check_run_folder(run: &Path, kind: &str) {
    let png = std::fs::read(run.join("curves.png")).expect("curves.png");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(png.len() > 20_000, "curves.png is only {} bytes", png.len());
    let tb: Vec<_> = std::fs::read_dir(run.join("tb")).expect("tb/").flatten().map(|e| e.path()).collect();
    assert_eq!(tb.len(), 1, "{tb:?}");
    // The Rust reader checks every record's checksums; TensorBoard's reader checks the rest.
    let events = trainer_viz::tensorboard::read_events(&tb[0]).expect("event file");
    assert!(events.len() > 5, "{} events", events.len());
    python_check("check_tensorboard.py", &[run.to_str().unwrap(), kind]);
}

#[test]
fn a_distributed_run_folder_has_tensorboard_events_and_curves() {
    let Some(data) = imdb_data() else { return };
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("dist");
    let marker = format!("tb-{}", std::process::id());
    let out = coordinator(2, &config(), &run, &data, &marker).output().expect("coordinator");
    assert!(out.status.success(), "{}", stderr(&out));
    check_run_folder(&run, "coordinator");

    // worker train writes the same views; `coordinator plot` draws both runs on one figure.
    let single = dir.path().join("single");
    let out = scrubbed(Command::new(bin("worker")), &marker)
        .arg("train")
        .arg("--config")
        .arg(config())
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&single)
        .output()
        .expect("worker train");
    assert!(out.status.success(), "{}", stderr(&out));
    check_run_folder(&single, "worker");
    let compare = dir.path().join("compare.png");
    let out = Command::new(bin("coordinator"))
        .arg("plot")
        .arg(&single)
        .arg(&run)
        .arg("--out")
        .arg(&compare)
        .output()
        .expect("coordinator plot");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(&std::fs::read(&compare).unwrap()[..4], b"\x89PNG");
    let missing = Command::new(bin("coordinator")).args(["plot", "/nonexistent/run"]).output().unwrap();
    assert!(
        !missing.status.success() && stderr(&missing).contains("/nonexistent/run"),
        "{}",
        stderr(&missing)
    );
}
