//! Helpers shared by the integration tests: the real binaries, the shared corpus, small
//! synthetic corpora, and a one-file HTTP server on 127.0.0.1.
#![allow(dead_code)]

mod gate;
mod jobs;
#[allow(unused_imports)]
pub use gate::*;
#[allow(unused_imports)]
pub use jobs::*;

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
    coordinator_range(&workers.to_string(), config, out, data, marker)
}

/// [`coordinator`] with `--workers` as given (`N` or `MIN:MAX`).
pub fn coordinator_range(workers: &str, config: &Path, out: &Path, data: &Path, marker: &str) -> Command {
    let mut cmd = scrubbed(Command::new(bin("coordinator")), marker);
    cmd.arg("--workers")
        .arg(workers)
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

/// A job whose last epoch's model is never the best by validation, on any machine: early
/// stopping with patience 1 ends the run at the first epoch whose validation accuracy is not
/// above the best so far, so a run that stops early has its best epoch before its last,
/// whichever epochs those are where float rounding differs (AVX2 vs AVX-512). This small
/// model (lr 0.05, no dropout, 1,600 training reviews) overfits within a few epochs (here:
/// validation 0.71, 0.77, 0.80, 0.80, stopping after epoch 4), far below the 30-epoch cap.
/// A checkpoint every 10 of its 50 steps per epoch, for the restart tests.
pub const OVERFITTING_JOB: &str = r#"
[data]
min_freq = 2
max_vocab = 5000
max_len = 200
truncation = "both"
val_fraction = 0.2
train_subset = 2000
test_subset = 400

[model]
embed_dim = 16
hidden = 16
layers = 1
dropout = 0.0
head = "concat_pool"

[train]
batch_size = 16
epochs = 30
early_stopping_patience = 1
lr = 0.05
batch_order = "bucketed"
bucket_pool = 4
bptt = 0
seed = 5
device = "cpu"
log_every = 5
eval_batch_size = 100

[checkpoint]
every_steps = 10
every_seconds = 0
"#;

/// The JSON lines of a run folder's metrics.jsonl that `pick` accepts.
pub fn metrics_records(out: &Path, pick: impl Fn(&serde_json::Value) -> bool) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .expect("metrics.jsonl")
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a JSON line"))
        .filter(|v| pick(v))
        .collect()
}

/// A distributed run's epoch records (one per epoch, in order).
pub fn epoch_records(out: &Path) -> Vec<serde_json::Value> {
    metrics_records(out, |v| v.get("train_loss").is_some())
}

/// Where a parameter comes in the model's canonical order (worker/src/model.rs, which is
/// PyTorch's): the embedding, the LSTM layer by layer (per direction: weight_ih, weight_hh,
/// bias_ih, bias_hh), then the linear head.
fn canonical_position(name: &str) -> (u32, u32, u32, u32) {
    if name == "embedding.weight" {
        return (0, 0, 0, 0);
    }
    if let Some(rest) = name.strip_prefix("lstm.") {
        let (rest, reverse) = match rest.strip_suffix("_reverse") {
            Some(r) => (r, 1),
            None => (rest, 0),
        };
        let kinds = ["weight_ih_l", "weight_hh_l", "bias_ih_l", "bias_hh_l"];
        for (k, kind) in kinds.iter().enumerate() {
            if let Some(layer) = rest.strip_prefix(kind).and_then(|l| l.parse::<u32>().ok()) {
                return (1, layer, reverse, k as u32);
            }
        }
    }
    match name {
        "fc.weight" => (2, 0, 0, 0),
        "fc.bias" => (2, 0, 0, 1),
        _ => panic!("parameter {name}: not in the canonical order this test knows (worker/src/model.rs)"),
    }
}

/// The parameter checksum of a model file, computed as the worker computes it for the epoch
/// records (`parameter_checksum` in worker/src/trainer.rs: FNV-1a over each parameter's
/// name and little-endian f32 bytes, in the model's order), as 16 hex digits.
pub fn model_checksum(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let file = safetensors::SafeTensors::deserialize(&bytes).expect("a safetensors file");
    let mut tensors = file.tensors();
    tensors.sort_by_key(|(name, _)| canonical_position(name));
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for &b in bytes {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for (name, view) in &tensors {
        assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
        feed(name.as_bytes());
        feed(view.data());
    }
    format!("{hash:016x}")
}

/// The small job of the external-worker tests (a synthetic corpus, a checkpoint every 5 steps).
pub fn external_job(epochs: usize) -> String {
    format!(
        "[model]\nembed_dim = 8\nhidden = 8\nlayers = 1\ndropout = 0.0\n\n\
         [train]\nbatch_size = 4\nepochs = {epochs}\nseed = 3\ndevice = \"cpu\"\nlog_every = 5\nthreads = 1\n\n\
         [checkpoint]\nevery_steps = 5\nevery_seconds = 0\n"
    )
}

/// `worker join` to the coordinator at `addr` with the job secret, quiet, carrying `marker`.
pub fn join_worker(addr: &str, secret: &str, marker: &str) -> Child {
    scrubbed(Command::new(bin("worker")), marker)
        .arg("join")
        .env("COORDINATOR_ADDR", addr)
        .env("TRAINER_JOB_SECRET", secret)
        .env("WORKER_RING_TIMEOUT", "3")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start a worker")
}

/// Waits (up to 90 s) until the external coordinator's log holds `what`.
pub fn wait_for_log(coord: &trainer_tests::ExternalCoordinator, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while !coord.stderr().contains(what) {
        assert!(Instant::now() < deadline, "no {what:?}:\n{}", coord.stderr());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The world-size tests' job (tests/tests/world_size.rs, elastic.rs): 320 training reviews,
/// global batches of 15, so 21 steps per epoch, shared 8 + 7 by two workers and 5 + 5 + 5 by
/// three; dropout off; a step record for every step and a checkpoint every 3.
pub const GLOBAL_BATCH_JOB: &str = r#"
[data]
min_freq = 1
max_vocab = 2000
max_len = 100
truncation = "head"
val_fraction = 0.2
train_subset = 400
test_subset = 200

[model]
embed_dim = 12
hidden = 12
layers = 1
dropout = 0.0
head = "last"

[train]
global_batch_size = 15
epochs = 2
lr = 5e-3
warmup_steps = 4
schedule = "cosine"
clip_norm = 1.0
bptt = 32
batch_order = "bucketed"
bucket_pool = 4
seed = 7
device = "cpu"
log_every = 1
eval_batch_size = 64
threads = 1

[checkpoint]
every_steps = 3
every_seconds = 0
"#;

/// (global step, loss, gradient norm) of every step record of metrics.jsonl.
pub fn step_records(out: &Path) -> Vec<(u64, f64, f64)> {
    metrics_records(out, |v| v["type"] == "step")
        .iter()
        .map(|v| {
            (
                v["global_step"].as_u64().unwrap(),
                v["loss"].as_f64().unwrap(),
                v["grad_norm"].as_f64().unwrap(),
            )
        })
        .collect()
}

pub fn relative(a: f64, b: f64) -> f64 {
    (a - b).abs() / a.abs().max(b.abs()).max(1e-12)
}

/// Every step of `b` that `a` also logged agrees with it to `tolerance` (relative) in loss
/// and gradient norm; returns how many were compared.
pub fn assert_same_steps(a: &[(u64, f64, f64)], b: &[(u64, f64, f64)], tolerance: f64, what: &str) -> usize {
    let mut compared = 0;
    for &(step, loss, norm) in b {
        let Some(&(_, loss_a, norm_a)) = a.iter().find(|s| s.0 == step) else { continue };
        assert!(
            relative(loss, loss_a) <= tolerance && relative(norm, norm_a) <= tolerance,
            "{what}: step {step}: loss {loss_a} vs {loss}, gradient norm {norm_a} vs {norm}"
        );
        compared += 1;
    }
    compared
}
