//! Helpers shared by the integration tests: the real binaries, the shared corpus, small
//! synthetic corpora, and a one-file HTTP server on 127.0.0.1.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A binary of the workspace, built by `cargo build --bins` (which `make test` runs first)
/// into the same profile folder as this test executable.
pub fn bin(name: &str) -> PathBuf {
    let path = trainer_tests::built_binary_path(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --bins`; `make test` does)",
        path.display()
    );
    path
}

/// The shared corpus from IMDB_DATA, or None (the caller prints a skip line and returns).
pub fn imdb_data() -> Option<PathBuf> {
    match std::env::var_os("IMDB_DATA").map(PathBuf::from) {
        Some(p) if p.exists() => Some(p),
        _ => {
            eprintln!("skipped: IMDB_DATA not set (make test sets it when ../shared/data has the corpus)");
            None
        }
    }
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("spawn")
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `coordinator data ...` with a private cache and no inherited corpus env vars.
pub fn coordinator_data(cache: &Path) -> Command {
    let mut c = Command::new(bin("coordinator"));
    c.arg("data").arg("--cache-dir").arg(cache);
    for var in [
        "IMDB_DATA",
        "IMDB_URL",
        "IMDB_SHA256",
        "IMDB_MD5",
        "IMDB_CACHE_DIR",
        "IMDB_NO_CACHE",
        "TRAINER_CONFIG",
    ] {
        c.env_remove(var);
    }
    c.env("RUST_LOG", "warn");
    c
}

/// Files of a small corpus in the official layout: (archive path, contents).
pub fn small_corpus() -> Vec<(String, Vec<u8>)> {
    let mut files = vec![("aclImdb/README".to_string(), b"readme".to_vec())];
    let texts = [
        ("pos", "A wonderful, moving film. Great acting!"),
        ("pos", "I loved it<br /><br />and would watch it again."),
        ("pos", "Best movie of the year (really)."),
        ("neg", "Terrible plot; awful acting."),
        ("neg", "I \"hated\" it: boring and too long..."),
        ("neg", "Worst film ever? Yes."),
    ];
    for split in ["train", "test"] {
        for (i, (label, text)) in texts.iter().enumerate() {
            let rating = if *label == "pos" { 8 } else { 2 };
            files.push((
                format!("aclImdb/{split}/{label}/{i}_{rating}.txt"),
                format!("{split} {text}").into_bytes(),
            ));
        }
        files.push((format!("aclImdb/{split}/urls_pos.txt"), b"http://x\n".to_vec()));
    }
    files.push(("aclImdb/train/unsup/0_0.txt".to_string(), b"unlabelled".to_vec()));
    files
}

pub fn tar_bytes(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, path, data.as_slice()).expect("tar append");
    }
    builder.into_inner().expect("tar finish")
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(bytes).expect("gzip");
    enc.finish().expect("gzip finish")
}

pub fn write_tarball(dir: &Path, name: &str, files: &[(String, Vec<u8>)]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, gzip(&tar_bytes(files))).expect("write tarball");
    path
}

pub fn write_folder(dir: &Path, files: &[(String, Vec<u8>)]) -> PathBuf {
    for (path, data) in files {
        let p = dir.join(path);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, data).expect("write");
    }
    dir.join("aclImdb")
}

/// Serves `body` for every GET on 127.0.0.1 and counts the requests; stops with the test.
pub struct HttpServer {
    pub url: String,
    pub requests: Arc<AtomicUsize>,
}

pub fn serve(body: Vec<u8>) -> HttpServer {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let requests = Arc::new(AtomicUsize::new(0));
    let counter = requests.clone();
    std::thread::spawn(move || {
        // Bounded: a test makes a handful of requests.
        for stream in listener.incoming().take(16) {
            let Ok(mut stream) = stream else { continue };
            let mut buf = [0u8; 4096];
            let mut seen = Vec::new();
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
            }
            counter.fetch_add(1, Ordering::SeqCst);
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/gzip\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body);
        }
    });
    HttpServer { url: format!("http://{addr}/aclImdb_v1.tar.gz"), requests }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

pub fn md5_hex(bytes: &[u8]) -> String {
    use md5::Digest;
    hex::encode(md5::Md5::digest(bytes))
}

pub fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}\nstderr: {}", stdout(out), stderr(out)))
}

pub fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("job.toml");
    std::fs::write(&path, text).unwrap();
    path
}

pub fn scrubbed(mut cmd: Command, marker: &str) -> Command {
    for var in ["TRAINER_CONFIG", "TRAINER_JOB_SECRET", "COORDINATOR_ADDR", "WORKER_THREADS"] {
        cmd.env_remove(var);
    }
    cmd.env("RUST_LOG", "info").env("DDP_TEST_MARKER", marker);
    cmd
}

pub fn coordinator(workers: usize, config: &Path, out: &Path, data: &Path, marker: &str) -> Command {
    let mut cmd = scrubbed(Command::new(bin("coordinator")), marker);
    cmd.arg("--workers")
        .arg(workers.to_string())
        .arg("--config")
        .arg(config)
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out)
        .arg("--worker-bin")
        .arg(bin("worker"));
    cmd
}

/// Pids of live processes whose environment carries `marker`.
pub fn marked_processes(marker: &str) -> Vec<u32> {
    let needle = format!("DDP_TEST_MARKER={marker}");
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(env) = std::fs::read(entry.path().join("environ")) else { continue };
        let is_zombie = std::fs::read_to_string(entry.path().join("stat"))
            .map(|s| s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'))
            .unwrap_or(true);
        if !is_zombie && env.split(|&b| b == 0).any(|kv| kv == needle.as_bytes()) {
            out.push(pid);
        }
    }
    out
}

pub fn assert_none_left(marker: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = marked_processes(marker);
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "processes left behind: {left:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn summary(out: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(out.join("summary.json")).expect("summary.json");
    serde_json::from_str(&text).expect("summary is JSON")
}

pub fn run_ok(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().expect("spawn");
    assert!(out.status.success(), "failed ({}):\n{}", out.status, stderr(&out));
    out
}

pub fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("coordinator still running after {within:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends `signal` to `pid`.
pub fn send_signal(pid: u32, signal: i32) {
    // SAFETY: kill(2) with a pid this test started; no memory is shared.
    let rc = unsafe { libc::kill(pid as i32, signal) };
    assert_eq!(rc, 0, "kill({pid}, {signal}) failed");
}

/// Three epochs of 25 steps per rank (2 ranks, batch 16), a checkpoint every 10 steps, and
/// dropout on, so that a resumed run must also replay the dropout masks exactly.
pub const RESTARTABLE_JOB: &str = r#"
[data]
max_vocab = 2000
max_len = 64
val_fraction = 0.2
train_subset = 1000
test_subset = 200

[model]
embed_dim = 8
hidden = 8
layers = 1
dropout = 0.3

[train]
batch_size = 16
epochs = 3
lr = 0.01
batch_order = "bucketed"
bucket_pool = 4
bptt = 16
seed = 5
device = "cpu"
log_every = 5
eval_batch_size = 100

[checkpoint]
every_steps = 10
every_seconds = 0
"#;

/// Lines of a child's stderr, read on a thread.
pub fn lines_of(child: &mut Child) -> Receiver<String> {
    let stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// A child's stderr lines as they arrive, and all seen so far (for failure messages).
pub struct LogLines {
    lines: Receiver<String>,
    seen: Vec<String>,
    /// How long [`LogLines::wait_for`] waits before it fails the test.
    within: Duration,
}

impl LogLines {
    pub fn of(child: &mut Child, within: Duration) -> Self {
        Self { lines: lines_of(child), seen: Vec::new(), within }
    }

    /// Waits for a line that `pred` accepts and returns it; panics with everything seen.
    pub fn wait_for(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + self.within;
        while Instant::now() < deadline {
            if let Ok(line) = self.lines.recv_timeout(Duration::from_millis(100)) {
                self.seen.push(line.clone());
                if pred(&line) {
                    return line;
                }
            }
        }
        panic!("no {what} within {:?}:\n{}", self.within, self.seen.join("\n"));
    }

    /// Everything seen, with what arrived since the last wait.
    pub fn drain(&mut self) -> String {
        self.seen.extend(self.lines.try_iter());
        self.seen.join("\n")
    }
}

/// The value after `key` (`rank=`, `pid=`) in a log line's `key=value` fields.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key))
}
