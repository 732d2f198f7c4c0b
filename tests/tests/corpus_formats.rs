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
