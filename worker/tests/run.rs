//! `worker train` and `worker predict` end to end, as processes: the run folder, bitwise
//! identical resume, predictions, and clear errors for bad inputs. Tests that need the
//! corpus read IMDB_DATA and skip (saying so) when it is unset.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

const WORKER: &str = env!("CARGO_BIN_EXE_worker");

fn tiny_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/test-tiny.toml")
}

fn imdb_data() -> Option<PathBuf> {
    match std::env::var_os("IMDB_DATA").filter(|v| !v.is_empty()) {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            eprintln!("skipped: IMDB_DATA not set");
            None
        }
    }
}

fn worker(args: &[&str]) -> Output {
    Command::new(WORKER)
        .args(args)
        .env("WORKER_THREADS", "1")
        .env("RUST_LOG", "warn")
        .output()
        .expect("worker binary runs")
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "worker failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fails(out: Output) -> String {
    assert!(!out.status.success(), "worker should have failed: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `worker train` of the tiny config on `data` into `out`, with `extra` flags.
fn train_output(data: &Path, out: &Path, extra: &[&str]) -> Output {
    let config = tiny_config();
    let mut args = vec![
        "train",
        "--config",
        config.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    worker(&args)
}

fn train(data: &Path, out: &Path, extra: &[&str]) -> serde_json::Value {
    serde_json::from_str(&ok(train_output(data, out, extra))).expect("train prints its summary as JSON")
}

fn summary(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("summary.json")).unwrap()).unwrap()
}

/// One finished tiny run, shared by the tests that only read it.
fn finished_run(data: &Path) -> &'static Path {
    static RUN: OnceLock<PathBuf> = OnceLock::new();
    RUN.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        train(data, &dir, &[]);
        dir
    })
}

#[test]
fn train_writes_the_run_folder() {
    let Some(data) = imdb_data() else { return };
    let dir = finished_run(&data);
    for file in [
        "model.safetensors",
        "vocab.txt",
        "config.toml",
        "metrics.jsonl",
        "summary.json",
        "checkpoint.safetensors",
    ] {
        assert!(dir.join(file).is_file(), "{file} missing from the run folder");
    }
    let s = summary(dir);
    for key in ["test_accuracy", "best_val_accuracy", "epochs", "train_seconds", "tokens_per_second"] {
        assert!(s[key].is_number(), "summary.json: {key} = {}", s[key]);
    }
    assert_eq!(s["epochs"], 2);
    assert_eq!(s["test_examples"], 200);
    let acc = s["test_accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));
    // The kept model is the best by validation; the last epoch's is beside it (the same
    // names as the coordinator's summary).
    assert_eq!(s["kept_model"], "best");
    assert_eq!(s["kept_epoch"], s["best_epoch"]);
    assert!(s["last_epoch_test_accuracy"].is_number() && s["last_epoch_test_loss"].is_number(), "{s}");
    assert!(dir.join("model-last.safetensors").is_file());
    // One line per logged step and per evaluation (2 validation + the last and the kept
    // model on the test split).
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let evals: Vec<_> = lines.iter().filter(|l| l["type"] == "eval").collect();
    assert_eq!(evals.len(), 4, "{evals:?}");
    assert_eq!((&evals[2]["model"], &evals[2]["accuracy"]), (&"last".into(), &s["last_epoch_test_accuracy"]));
    assert_eq!((&evals[3]["model"], &evals[3]["accuracy"]), (&"best".into(), &s["test_accuracy"]));
    assert!(lines.iter().filter(|l| l["type"] == "step").all(|l| l["loss"].as_f64().unwrap().is_finite()));
    assert!(lines.iter().any(|l| l["type"] == "step"));
    // The resolved config reads back, and the vocab has the configured size.
    let config: trainer_core::JobConfig =
        toml::from_str(&std::fs::read_to_string(dir.join("config.toml")).unwrap()).unwrap();
    assert_eq!(config.model.hidden, 12);
    let vocab = std::fs::read_to_string(dir.join("vocab.txt")).unwrap();
    assert_eq!(vocab.lines().count(), 2002);
}

#[test]
fn two_epochs_straight_equal_one_epoch_then_resume_bitwise() {
    let Some(data) = imdb_data() else { return };
    let straight = finished_run(&data);
    let dir = tempfile::tempdir().unwrap();
    let first = train(&data, dir.path(), &["--stop-after-epoch", "1"]);
    assert_eq!(first["interrupted"], true);
    assert!(first["test_accuracy"].is_null());
    assert_eq!(first["epochs"], 1);
    let resumed = train(&data, dir.path(), &["--resume", dir.path().to_str().unwrap()]);
    assert_eq!(resumed["epochs"], 2);
    let whole = summary(straight);
    assert_eq!(resumed["final_parameter_checksum"], whole["final_parameter_checksum"]);
    assert_eq!(resumed["steps"], whole["steps"]);
    assert_eq!(resumed["test_accuracy"], whole["test_accuracy"]);
    let (a, b) = (
        std::fs::read(dir.path().join("model.safetensors")).unwrap(),
        std::fs::read(straight.join("model.safetensors")).unwrap(),
    );
    assert!(
        a == b,
        "the best models differ: {} vs {} bytes, headers:\n{}\n{}",
        a.len(),
        b.len(),
        String::from_utf8_lossy(&a[..a.len().min(900)]),
        String::from_utf8_lossy(&b[..b.len().min(900)])
    );
    // The metrics of both attempts are in the one file.
    let evals =
        std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap().matches("\"eval\"").count();
    assert_eq!(evals, 4);
}

#[test]
fn profile_steps_prints_every_bucket_and_changes_nothing() {
    let Some(data) = imdb_data() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = train_output(&data, dir.path(), &["--profile-steps", "3"]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let summary: serde_json::Value = serde_json::from_str(&ok(out)).expect("stdout is still the summary");
    for bucket in worker::profile::BUCKETS.iter().map(|b| b.name()).chain(["other (host, untimed)", "step"]) {
        assert!(stderr.contains(bucket), "bucket {bucket:?} missing from:\n{stderr}");
    }
    assert!(stderr.contains("3 steps after 3 warm-up steps on cpu"), "{stderr}");
    let profile: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("profile.json")).unwrap()).unwrap();
    assert_eq!(profile["steps"], 3);
    assert_eq!(profile["buckets"].as_array().unwrap().len(), worker::profile::BUCKETS.len() + 1);
    // The probes only time: the run ends with the same parameters as an unprofiled one.
    let plain = self::summary(finished_run(&data));
    assert_eq!(summary["final_parameter_checksum"], plain["final_parameter_checksum"]);
}

#[test]
fn a_mid_epoch_checkpoint_resumes_bitwise() {
    let Some(data) = imdb_data() else { return };
    let straight = finished_run(&data);
    // 320 training reviews in batches of 16: 20 steps per epoch; stop 7 steps into epoch 2.
    let dir = tempfile::tempdir().unwrap();
    let first = train(&data, dir.path(), &["--stop-after-steps", "27", "--checkpoint-every", "5"]);
    assert_eq!(first["interrupted"], true);
    let checkpoint = worker::checkpoint::load_checkpoint(&dir.path().join("checkpoint.safetensors")).unwrap();
    assert_eq!(checkpoint.meta.position.epoch, 1);
    assert_eq!(checkpoint.meta.position.step_in_epoch, 7);
    assert_eq!(checkpoint.meta.position.global_step, 27);
    let resumed = train(&data, dir.path(), &["--resume", dir.path().to_str().unwrap()]);
    assert_eq!(resumed["final_parameter_checksum"], summary(straight)["final_parameter_checksum"]);
}

#[test]
fn a_checkpoint_of_another_shape_is_refused() {
    let Some(data) = imdb_data() else { return };
    let run = finished_run(&data);
    let dir = tempfile::tempdir().unwrap();
    let wider = dir.path().join("wider.toml");
    let text = std::fs::read_to_string(tiny_config()).unwrap().replace("hidden = 12", "hidden = 16");
    std::fs::write(&wider, text).unwrap();
    let out = dir.path().join("run");
    let err = fails(worker(&[
        "train",
        "--config",
        wider.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--resume",
        run.to_str().unwrap(),
    ]));
    assert!(err.contains("another shape") && err.contains("hidden 12 vs 16"), "{err}");
    let err = fails(worker(&[
        "train",
        "--config",
        tiny_config().to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--resume",
        run.to_str().unwrap(),
        "--max-vocab",
        "1500",
    ]));
    assert!(err.contains("other data settings"), "{err}");
}

#[test]
fn predict_prints_labels_and_json() {
    let Some(data) = imdb_data() else { return };
    let run = finished_run(&data).to_str().unwrap();
    let reviews = ["A wonderful, moving film with a great cast.", "Dull, boring and far too long.", ""];
    let text = ok(worker(&["predict", "--model", run, "--json", reviews[0], reviews[1], reviews[2]]));
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3);
    for (line, review) in lines.iter().zip(reviews) {
        let label = line["label"].as_str().unwrap();
        assert!(label == "positive" || label == "negative", "{line}");
        let p = line["probability"].as_f64().unwrap();
        assert!((0.5..=1.0).contains(&p), "{line}");
        let positive = line["positive_probability"].as_f64().unwrap();
        assert_eq!(label == "positive", positive >= 0.5);
        assert_eq!(line["text"], review);
    }
    // Plain output: one line per review, stdin when no arguments are given.
    let mut child = Command::new(WORKER)
        .args(["predict", "--model", run])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"great film\n\nterrible film\n").unwrap();
    let plain = ok(child.wait_with_output().unwrap());
    assert_eq!(plain.lines().count(), 2, "{plain}");
    assert!(plain.lines().all(|l| l.starts_with("positive\t") || l.starts_with("negative\t")), "{plain}");
}

#[test]
fn bad_inputs_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let err = fails(worker(&["predict", "--model", missing.to_str().unwrap(), "text"]));
    assert!(err.contains("does not exist"), "{err}");
    let err = fails(worker(&["predict", "--model", dir.path().to_str().unwrap(), "text"]));
    assert!(err.contains("config.toml is missing"), "{err}");

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[model]\nhiden = 3\n").unwrap();
    let out = dir.path().join("run");
    let err = fails(worker(&["train", "--config", bad.to_str().unwrap(), "--out", out.to_str().unwrap()]));
    assert!(err.contains("hiden"), "{err}");
    let err = fails(worker(&[
        "train",
        "--config",
        tiny_config().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--lr",
        "0",
    ]));
    assert!(err.contains("train.lr"), "{err}");
    let err = fails(worker(&[
        "train",
        "--config",
        tiny_config().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--data",
        missing.to_str().unwrap(),
    ]));
    assert!(err.contains("nope"), "{err}");
    if !worker::device::cuda_available() {
        let err =
            fails(worker(&["predict", "--model", dir.path().to_str().unwrap(), "--device", "cuda", "x"]));
        assert!(err.contains("CUDA was requested"), "{err}");
    }
    let Some(data) = imdb_data() else { return };
    let err = fails(worker(&[
        "train",
        "--config",
        tiny_config().to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--resume",
        dir.path().to_str().unwrap(),
    ]));
    assert!(err.contains("no checkpoint here"), "{err}");
    let err = fails(worker(&[
        "train",
        "--config",
        tiny_config().to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--amp",
        "true",
    ]));
    assert!(err.contains("needs a CUDA device"), "{err}");
}

/// Three made-up classes whose words differ, as JSONL with integer-free labels.
fn three_class_corpus(dir: &Path) -> PathBuf {
    let words = [
        ("food", "tasty soup bread cheese"),
        ("sport", "goal match team score"),
        ("tech", "chip code disk screen"),
    ];
    let mut text = String::new();
    for i in 0..150 {
        for (label, vocab) in &words {
            let w: Vec<&str> = vocab.split(' ').collect();
            let body = format!("{} {} and {} {}", w[i % 4], w[(i / 4) % 4], w[(i + 1) % 4], i % 7);
            text.push_str(&serde_json::json!({"body": body, "topic": label}).to_string());
            text.push('\n');
        }
    }
    let path = dir.join("topics.jsonl");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn worker_train_reads_any_number_of_classes_and_predict_names_them() {
    let dir = tempfile::tempdir().unwrap();
    let data = three_class_corpus(dir.path());
    let out = dir.path().join("run");
    let cache = dir.path().join("cache");
    let flags = ["--text-column", "body", "--label-column", "topic", "--test-fraction", "0.2"];
    let mut extra = vec!["--cache-dir", cache.to_str().unwrap()];
    extra.extend_from_slice(&flags);
    let s = train(&data, &out, &extra);
    assert_eq!(s["classes"], serde_json::json!(["food", "sport", "tech"]));
    let m = &s["test_metrics"];
    let confusion: Vec<Vec<u64>> = serde_json::from_value(m["confusion"].clone()).unwrap();
    assert_eq!(confusion.iter().flatten().sum::<u64>(), 90, "{m}");
    assert!(m["macro_f1"].as_f64().unwrap() > 0.5, "the classes are easy: {m}");
    assert_eq!(summary(&out)["test_metrics"], *m);
    assert!(std::fs::read(out.join("confusion.png")).unwrap().starts_with(b"\x89PNG"));
    let labels: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("labels.json")).unwrap()).unwrap();
    assert_eq!(labels, s["classes"]);
    let p = ok(worker(&["predict", "--model", out.to_str().unwrap(), "--json", "tasty soup and cheese"]));
    let p: serde_json::Value = serde_json::from_str(p.trim()).unwrap();
    assert_eq!(p["class"], p["label"]);
    assert_eq!(p["probabilities"].as_object().unwrap().len(), 3, "{p}");
    let plain = ok(worker(&["predict", "--model", out.to_str().unwrap(), "goal match team"]));
    assert!(plain.contains("food=") && plain.contains("sport=") && plain.contains("tech="), "{plain}");

    // Refused data leaves no run folder.
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"body\": \"x\", \"topic\": \"a\"}\nnot json\n").unwrap();
    let never = dir.path().join("never");
    let err = fails(train_output(&bad, &never, &extra));
    assert!(err.contains("bad.jsonl:2") && err.contains("not JSON"), "{err}");
    assert!(!never.exists());
}
