//! Issue 21: the same corpus in every format trains to the same bits. A subset of the shared
//! IMDB corpus (IMDB_DATA) is written at test time as an aclImdb tarball (the reference),
//! as class folders, as CSV (gzipped), as JSONL (with other column names) and in fastText's
//! format, each in the reader's order; every one must encode to the same fingerprint and,
//! trained by `coordinator --workers 2`, end with the same parameter checksum.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use trainer_core::corpus::{read_corpus, DataSource, RawCorpus, Review};

/// A small, fast job: 10 steps per epoch on 320 reviews, one epoch.
const JOB: &str = r#"
[data]
max_vocab = 2000
max_len = 64
val_fraction = 0.2

[model]
embed_dim = 8
hidden = 8
layers = 1
dropout = 0.0

[train]
batch_size = 16
epochs = 1
lr = 0.01
batch_order = "bucketed"
bucket_pool = 4
bptt = 0
seed = 5
device = "cpu"
log_every = 5
eval_batch_size = 100
"#;

/// The first `per_class` reviews of each class of each split, in the reader's order.
fn subset(raw: &RawCorpus, train_per_class: usize, test_per_class: usize) -> (Vec<Review>, Vec<Review>) {
    let pick = |reviews: &[Review], n: usize| -> Vec<Review> {
        (0..2u8).flat_map(|l| reviews.iter().filter(move |r| r.label == l).take(n).cloned()).collect()
    };
    (pick(&raw.train, train_per_class), pick(&raw.test, test_per_class))
}

fn class(label: u8) -> &'static str {
    ["neg", "pos"][usize::from(label)]
}

fn csv_field(text: &str) -> String {
    format!("\"{}\"", text.replace('"', "\"\""))
}

fn json_line(text: &str, label: &str) -> String {
    serde_json::json!({"review": text, "sentiment": label}).to_string()
}

/// Writes every format; returns (name, `--data` and other flags) for each.
fn write_formats(dir: &Path, train: &[Review], test: &[Review]) -> Vec<(&'static str, Vec<String>)> {
    let p = |path: PathBuf| path.display().to_string();
    let mut tar_files = Vec::new();
    for (split, reviews) in [("train", train), ("test", test)] {
        for (i, r) in reviews.iter().enumerate() {
            let name = format!("aclImdb/{split}/{}/{}_{}.txt", class(r.label), r.id, r.rating);
            tar_files.push((name, r.text.as_bytes().to_vec()));
            // Keras-style class folders, named so that name order is the corpus' order.
            let file = dir.join(format!("folders/{split}/{}/{i:05}.txt", class(r.label)));
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(file, &r.text).unwrap();
        }
        let csv: String = std::iter::once("label,text\n".to_string())
            .chain(reviews.iter().map(|r| format!("{},{}\n", class(r.label), csv_field(&r.text))))
            .collect();
        let csv_name = if split == "train" { "train.csv.gz" } else { "test.csv" };
        let bytes = if split == "train" { gzip(csv.as_bytes()) } else { csv.into_bytes() };
        std::fs::write(dir.join(csv_name), bytes).unwrap();
        let jsonl: String = reviews.iter().map(|r| json_line(&r.text, class(r.label)) + "\n").collect();
        std::fs::write(dir.join(format!("{split}.jsonl")), jsonl).unwrap();
        assert!(reviews.iter().all(|r| !r.text.contains('\n')), "a review spans lines");
        let ft: String =
            reviews.iter().map(|r| format!("__label__{} {}\n", class(r.label), r.text)).collect();
        std::fs::write(dir.join(format!("{split}.ft.txt")), ft).unwrap();
    }
    let tarball = write_tarball(dir, "subset.tar.gz", &tar_files);
    let flags = |items: &[&str]| items.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    vec![
        ("tarball", flags(&["--data", &p(tarball)])),
        ("folders", flags(&["--data", &p(dir.join("folders"))])),
        ("csv", flags(&["--data", &p(dir.join("train.csv.gz")), "--test-data", &p(dir.join("test.csv"))])),
        (
            "jsonl",
            flags(&[
                "--data",
                &p(dir.join("train.jsonl")),
                "--test-data",
                &p(dir.join("test.jsonl")),
                "--text-column",
                "review",
                "--label-column",
                "sentiment",
            ]),
        ),
        (
            "fasttext",
            flags(&["--data", &p(dir.join("train.ft.txt")), "--test-data", &p(dir.join("test.ft.txt"))]),
        ),
    ]
}

fn coordinator_job(config: &Path, out: &Path, cache: &Path, flags: &[String], marker: &str) -> Command {
    let mut cmd = scrubbed(Command::new(bin("coordinator")), marker);
    cmd.args(["--workers", "2", "--backend", "ring"])
        .arg("--config")
        .arg(config)
        .arg("--out")
        .arg(out)
        .arg("--cache-dir")
        .arg(cache)
        .arg("--worker-bin")
        .arg(bin("worker"))
        .args(flags);
    cmd
}

#[test]
fn every_format_of_the_same_corpus_trains_bitwise_equal_to_the_tarball() {
    let Some(data) = imdb_data() else { return };
    let raw = read_corpus(&DataSource::from_path(&data).unwrap()).unwrap();
    let (train, test) = subset(&raw, 200, 100);
    drop(raw);
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let formats = write_formats(dir.path(), &train, &test);
    let config = write_config(dir.path(), JOB);

    let mut fingerprints = Vec::new();
    for (name, flags) in &formats {
        let v = json(&run_ok(coordinator_data(cache.path()).args(flags).arg("--json")));
        assert_eq!(v["classes"], serde_json::json!(["neg", "pos"]), "{name}");
        assert_eq!(v["train"]["per_class"], serde_json::json!([200, 200]), "{name}");
        assert_eq!(v["test"]["per_class"], serde_json::json!([100, 100]), "{name}");
        fingerprints.push((
            name,
            v["encoded_fingerprint"].as_str().unwrap().to_string(),
            v["pipeline"]["checksum"].clone(),
        ));
    }
    // A second look at a file finds the cache without parsing it: only its bytes are hashed.
    let warm = json(&run_ok(coordinator_data(cache.path()).args(&formats[2].1).arg("--json")));
    assert_eq!(warm["pipeline"]["cache"]["status"], "hit");
    let stages: Vec<&str> =
        warm["pipeline"]["stages"].as_array().unwrap().iter().map(|s| s[0].as_str().unwrap()).collect();
    assert_eq!(stages, ["hash", "cache load"]);
    assert_eq!(warm["encoded_fingerprint"].as_str(), Some(fingerprints[0].1.as_str()));
    for (name, fp, checksum) in &fingerprints[1..] {
        assert_eq!(fp, &fingerprints[0].1, "{name}: another encoded corpus than the tarball's");
        assert_ne!(checksum, &fingerprints[0].2, "{name}: the file checksum cannot be the tarball's");
    }

    let mut checksums = Vec::new();
    for (name, flags) in &formats {
        let out = dir.path().join(format!("run-{name}"));
        let marker = format!("corpus-formats-{name}-{}", std::process::id());
        run_ok(&mut coordinator_job(&config, &out, cache.path(), flags, &marker));
        assert_none_left(&marker);
        let s = summary(&out);
        let labels: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("labels.json")).unwrap()).unwrap();
        assert_eq!(labels, serde_json::json!(["neg", "pos"]), "{name}");
        checksums.push((name, s["final_parameter_checksum"].as_str().unwrap().to_string()));
    }
    eprintln!("final parameter checksums: {checksums:?}");
    for (name, c) in &checksums[1..] {
        assert_eq!(c, &checksums[0].1, "{name} trained to other bits than the tarball");
    }
}

/// IMDB's ratings as four classes, built at test time from the shared corpus' file names
/// (`<id>_<rating>.txt`): 1-2, 3-4, 7-8 and 9-10 (IMDB has no 5 or 6), as one CSV with
/// integer-free string labels and a held-out test fraction.
fn write_rating_classes(dir: &Path, raw: &RawCorpus, per_class: usize) -> PathBuf {
    let bucket = |rating: u8| match rating {
        1 | 2 => "1-2",
        3 | 4 => "3-4",
        7 | 8 => "7-8",
        _ => "9-10",
    };
    let mut taken = std::collections::BTreeMap::<&str, usize>::new();
    let mut csv = String::from("text,rating_class\n");
    for r in raw.train.iter().chain(&raw.test) {
        let class = bucket(r.rating);
        let n = taken.entry(class).or_default();
        if *n < per_class {
            *n += 1;
            csv.push_str(&format!("{},{class}\n", csv_field(&r.text)));
        }
    }
    assert!(taken.values().all(|&n| n == per_class), "{taken:?}");
    let path = dir.join("ratings.csv");
    std::fs::write(&path, csv).unwrap();
    path
}

#[test]
fn four_rating_classes_train_through_two_workers_with_macro_f1_and_a_confusion_matrix() {
    let Some(data) = imdb_data() else { return };
    let raw = read_corpus(&DataSource::from_path(&data).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let csv = write_rating_classes(dir.path(), &raw, 150);
    drop(raw);
    let config = write_config(dir.path(), &JOB.replace("epochs = 1", "epochs = 2"));
    let flags: Vec<String> =
        ["--data", csv.to_str().unwrap(), "--label-column", "rating_class", "--test-fraction", "0.2"]
            .iter()
            .map(|s| s.to_string())
            .collect();

    let stats = json(&run_ok(coordinator_data(cache.path()).args(&flags).arg("--json")));
    assert_eq!(stats["classes"], serde_json::json!(["1-2", "3-4", "7-8", "9-10"]));
    assert_eq!(stats["train"]["per_class"], serde_json::json!([120, 120, 120, 120]));
    assert_eq!(stats["test"]["per_class"], serde_json::json!([30, 30, 30, 30]));
    let table = stdout(&run_ok(coordinator_data(cache.path()).args(&flags)));
    assert!(table.contains("9-10") && table.contains("p50"), "{table}");

    let out = dir.path().join("run");
    let marker = format!("corpus-four-classes-{}", std::process::id());
    let done = run_ok(&mut coordinator_job(&config, &out, cache.path(), &flags, &marker));
    assert_none_left(&marker);
    let screen = stdout(&done);
    assert!(screen.contains("macro-F1") && screen.contains("confusion"), "{screen}");
    let s = summary(&out);
    assert_eq!(s["classes"], serde_json::json!(["1-2", "3-4", "7-8", "9-10"]));
    let m = &s["test_metrics"];
    let confusion: Vec<Vec<u64>> = serde_json::from_value(m["confusion"].clone()).unwrap();
    assert_eq!(confusion.len(), 4);
    assert!(confusion.iter().all(|row| row.len() == 4));
    assert_eq!(confusion.iter().flatten().sum::<u64>(), 120);
    let correct: u64 = (0..4).map(|i| confusion[i][i]).sum();
    assert!((m["accuracy"].as_f64().unwrap() - correct as f64 / 120.0).abs() < 1e-9);
    assert_eq!(s["test_accuracy"], m["accuracy"]);
    let f1 = m["macro_f1"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&f1), "{m}");
    assert_eq!(m["per_class"].as_array().unwrap().len(), 4);
    for class in m["per_class"].as_array().unwrap() {
        assert_eq!(class["support"], 30, "{class}");
        assert!(class["precision"].is_number() && class["recall"].is_number());
    }
    let labels: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("labels.json")).unwrap()).unwrap();
    assert_eq!(labels, stats["classes"]);
    assert!(std::fs::read(out.join("confusion.png")).unwrap().starts_with(b"\x89PNG"));
    // The model's head has four outputs, and predict names the classes.
    let predicted = stdout(&run_ok(
        Command::new(bin("worker"))
            .args(["predict", "--json", "--model"])
            .arg(&out)
            .arg("A dreadful, boring film."),
    ));
    let p: serde_json::Value = serde_json::from_str(predicted.trim()).unwrap();
    let probabilities = p["probabilities"].as_object().unwrap();
    assert_eq!(probabilities.len(), 4, "{p}");
    assert!((probabilities.values().map(|v| v.as_f64().unwrap()).sum::<f64>() - 1.0).abs() < 1e-4);
    assert!(labels.as_array().unwrap().contains(&p["class"]), "{p}");
}

#[test]
fn bad_data_is_refused_by_the_coordinator_before_the_run_folder_exists() {
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), JOB);
    let bad = dir.path().join("bad.csv");
    std::fs::write(&bad, "text,label\ngood film,pos\nbad film,neg,oops\n").unwrap();
    let out = dir.path().join("never");
    let marker = format!("corpus-bad-{}", std::process::id());
    let flags = vec!["--data".to_string(), bad.display().to_string(), "--test-fraction".into(), "0.5".into()];
    let result = run(&mut coordinator_job(&config, &out, cache.path(), &flags, &marker));
    assert_eq!(result.status.code(), Some(4), "{}", stderr(&result));
    let err = stderr(&result);
    assert!(err.contains("bad.csv:3") && err.contains("3 fields"), "{err}");
    assert!(!out.exists(), "the refused job left {}", out.display());
    assert_none_left(&marker);
    // Nothing half-written in the cache either.
    let left: Vec<_> = std::fs::read_dir(cache.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(left.iter().all(|n| !n.to_string_lossy().starts_with("encoded-")), "{left:?}");
    // `coordinator data --sample-out` (IMDB's layout only) names a CSV as another format,
    // rather than failing to read it as a tarball.
    let good = dir.path().join("good.csv");
    std::fs::write(&good, "text,label\ngood film,pos\nbad film,neg\nfine film,pos\ndull film,neg\n").unwrap();
    let sampled = run(Command::new(bin("coordinator"))
        .args(["data", "--config"])
        .arg(&config)
        .arg("--data")
        .arg(&good)
        .args(["--test-fraction", "0.5", "--cache-dir"])
        .arg(cache.path())
        .arg("--sample-out")
        .arg(dir.path().join("samples.jsonl")));
    let err = stderr(&sampled);
    assert!(!sampled.status.success() && err.contains("--sample-out reads IMDB's layout only"), "{err}");
    assert!(!dir.path().join("samples.jsonl").exists());
}
