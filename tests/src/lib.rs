//! Test support shared by the integration tests here and the worker's agent tests: a
//! synthetic corpus in the official layout, and the real coordinator binary started with
//! `--external-workers` on 127.0.0.1, its stderr collected and its gRPC address read from it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where `cargo build --bins` puts the workspace binary `name`: the profile folder
/// (`target/<profile>/`) that holds this test executable's `deps/` folder.
pub fn built_binary_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>");
    profile_dir.join(name)
}

/// The current checkpoint file of a coordinator's run folder, as its `checkpoint.json`
/// names it; None when no checkpoint was committed.
pub fn current_checkpoint(run_dir: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(run_dir.join("checkpoint.json")).ok()?;
    let record: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some(run_dir.join(record["file"].as_str()?))
}

/// Writes `train_per_label` train and `test_per_label` test reviews per label under
/// `dir/aclImdb` (official layout, ratings 8 and 3) and returns that folder. The reviews are
/// 3 to 9 words of a 10-word vocabulary, deterministic.
pub fn write_synthetic_corpus(dir: &Path, train_per_label: usize, test_per_label: usize) -> PathBuf {
    let words = ["good", "bad", "film", "plot", "great", "awful", "actor", "scene", "fine", "dull"];
    for (split, per_label) in [("train", train_per_label), ("test", test_per_label)] {
        for (label, rating) in [("pos", 8), ("neg", 3)] {
            let folder = dir.join("aclImdb").join(split).join(label);
            std::fs::create_dir_all(&folder).expect("create the corpus folder");
            for i in 0..per_label {
                let text: Vec<&str> = (0..3 + i % 7).map(|k| words[(i * 7 + k * 3) % words.len()]).collect();
                std::fs::write(folder.join(format!("{i}_{rating}.txt")), text.join(" "))
                    .expect("write a review");
            }
        }
    }
    dir.join("aclImdb")
}

/// The coordinator binary running with `--external-workers`, killed when dropped.
pub struct ExternalCoordinator {
    child: Child,
    stderr: Arc<Mutex<String>>,
    /// The address it advertised (`host:port`), or None if it printed none within 60 s.
    pub addr: Option<String>,
    /// Its run folder (`--out`), inside a temporary folder that lives as long as this.
    pub out: PathBuf,
    _dir: tempfile::TempDir,
}

impl ExternalCoordinator {
    /// Starts `bin --workers N --external-workers --no-cache --data <synthetic corpus>
    /// --out <tmp>/run ARGS` with `TRAINER_JOB_SECRET=secret` and debug logs, and waits until
    /// it prints its address.
    pub fn start(bin: &Path, workers: usize, secret: &str, corpus: (usize, usize), args: &[&str]) -> Self {
        Self::start_elastic(bin, &workers.to_string(), secret, corpus, args)
    }

    /// [`ExternalCoordinator::start`] with `--workers` as given (`N` or `MIN:MAX`).
    pub fn start_elastic(
        bin: &Path,
        workers: &str,
        secret: &str,
        corpus: (usize, usize),
        args: &[&str],
    ) -> Self {
        let dir = tempfile::tempdir().expect("temporary folder");
        let data = write_synthetic_corpus(dir.path(), corpus.0, corpus.1);
        let out = dir.path().join("run");
        let mut child = Command::new(bin)
            .args(["--workers", workers, "--external-workers", "--no-cache"])
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(&out)
            .args(args)
            .env("TRAINER_JOB_SECRET", secret)
            .env("RUST_LOG", "debug")
            .env_remove("TRAINER_CONFIG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the coordinator");
        let stderr = Arc::new(Mutex::new(String::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let reader = BufReader::new(child.stderr.take().expect("piped stderr"));
        let sink = Arc::clone(&stderr);
        std::thread::spawn(move || {
            for line in reader.lines().map_while(Result::ok) {
                if let Some(at) = line.find("advertise=") {
                    let addr: String = line[at + 10..].split_whitespace().next().unwrap_or("").into();
                    let _ = addr_tx.send(addr);
                }
                sink.lock().expect("stderr buffer").push_str(&(line + "\n"));
            }
        });
        let addr = addr_rx.recv_timeout(Duration::from_secs(60)).ok();
        Self { child, stderr, addr, out, _dir: dir }
    }

    /// The advertised address; panics with the coordinator's stderr when there was none.
    pub fn addr(&self) -> &str {
        match &self.addr {
            Some(addr) => addr,
            None => panic!("the coordinator printed no address:\n{}", self.stderr()),
        }
    }

    /// Waits for the exit (panicking with the end of its log after `limit`) and returns the status
    /// and the time waited.
    pub fn wait(&mut self, limit: Duration) -> (ExitStatus, Duration) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for the coordinator") {
                // Let the reader thread drain the pipe.
                std::thread::sleep(Duration::from_millis(100));
                return (status, start.elapsed());
            }
            if start.elapsed() >= limit {
                // Say what it was doing: the tail of its log.
                let log = self.stderr();
                let lines: Vec<&str> = log.lines().collect();
                let tail = &lines[lines.len().saturating_sub(60)..];
                panic!("coordinator still running after {limit:?}; the end of its log:\n{}", tail.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills it (SIGKILL), as a crash would, and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Everything it has written to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().expect("stderr buffer").clone()
    }
}

impl Drop for ExternalCoordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
