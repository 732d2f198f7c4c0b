//! Subword tokenizers through the real binaries (issue 21): a `coordinator --workers 2` job
//! with `data.tokenizer = "bpe"` writes `tokenizer.json`, which Python's `tokenizers` loads
//! and which encodes reviews to exactly the ids that training used; `worker predict` uses
//! the saved file; training it is byte-identical at any thread count.
//!
//! Needs the shared corpus (IMDB_DATA); the Python check needs `tokenizers` in the bench
//! venv (`scripts/tokenizers_env.sh`, which `make test` runs) or in `python3`, and prints a
//! skip line without it.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// test-tiny's model on a small subset, with a BPE tokenizer trained on the whole train split.
const BPE_TINY: &str = r#"
[data]
tokenizer = "bpe"
vocab_size = 2000
max_len = 100
val_fraction = 0.2
train_subset = 400
test_subset = 200

[model]
embed_dim = 12
hidden = 12
layers = 1
dropout = 0.5

[train]
batch_size = 16
epochs = 1
lr = 5e-3
bptt = 32
batch_order = "bucketed"
bucket_pool = 4
seed = 7
device = "cpu"
log_every = 5
eval_batch_size = 64
"#;

/// The bench venv's Python when it has `tokenizers`, else `python3` when it has; None (with
/// a printed skip line) when neither does.
fn python_with_tokenizers() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for python in [root.join(".venv-bench/bin/python"), PathBuf::from("python3")] {
        let ok = Command::new(&python)
            .args(["-c", "import tokenizers"])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return Some(python);
        }
    }
    eprintln!(
        "skipped: Python `tokenizers` is missing (scripts/tokenizers_env.sh installs it into .venv-bench; \
         make test runs it)"
    );
    None
}

const PARITY: &str = r#"
import json, sys
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
n = 0
for line in open(sys.argv[2], encoding="utf-8"):
    r = json.loads(line)
    ids = tok.encode(r["text"]).ids
    if ids != r["ids"]:
        first = next(i for i, (a, b) in enumerate(zip(ids + [-1], r["ids"] + [-1])) if a != b)
        print(f"{r['split']} review {r['id']}: Python and the trainer differ at token {first}: "
              f"{ids[first:first + 8]} vs {r['ids'][first:first + 8]}")
        sys.exit(1)
    n += 1
print(f"parity: {n} reviews, {sum(1 for _ in open(sys.argv[2]))} lines")
"#;

#[test]
fn bpe_through_the_coordinator_saves_a_tokenizer_that_python_and_predict_agree_with() {
    let Some(data) = imdb_data() else { return };
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let config = write_config(dir.path(), BPE_TINY);
    let out = dir.path().join("run");
    let marker = format!("tokenizer-e2e-{}", std::process::id());

    // A data-parallel job: the coordinator trains the tokenizer once and ships ids.
    let mut job = coordinator(2, &config, &out, &data, &marker);
    job.env("IMDB_CACHE_DIR", &cache);
    let done = run_ok(&mut job);
    assert!(done.status.success());
    assert_none_left(&marker);
    let s = summary(&out);
    assert!(s["test_accuracy"].as_f64().is_some(), "{s}");
    let saved =
        std::fs::read_to_string(out.join("tokenizer.json")).expect("tokenizer.json in the run folder");
    let vocab = std::fs::read_to_string(out.join("vocab.txt")).unwrap();
    assert!(vocab.starts_with("<pad>\n<unk>\n"), "{}", &vocab[..40]);
    assert!(vocab.lines().count() <= 2000);
    assert!(std::fs::read_to_string(out.join("config.toml")).unwrap().contains("tokenizer = \"bpe\""));

    // The same settings hit the cache the job wrote: its tokenizer and the ids training used.
    let samples = dir.path().join("samples.jsonl");
    let tok_out = dir.path().join("tokenizer-data.json");
    let mut data_cmd = coordinator_data(&cache);
    data_cmd.arg("--data").arg(&data).arg("--config").arg(&config).arg("--json");
    data_cmd
        .arg("--tokenizer-out")
        .arg(&tok_out)
        .arg("--sample-out")
        .arg(&samples)
        .args(["--samples", "150"]);
    let stats = json(&run_ok(&mut data_cmd));
    assert_eq!(stats["pipeline"]["cache"]["status"], "hit", "{stats}");
    assert_eq!(std::fs::read_to_string(&tok_out).unwrap(), saved, "the cache's tokenizer is the run's");
    assert_eq!(std::fs::read_to_string(&samples).unwrap().lines().count(), 300);

    // Python's tokenizers loads the run's file and encodes the samples to the same ids.
    if let Some(python) = python_with_tokenizers() {
        let out_py = Command::new(python)
            .args(["-c", PARITY])
            .arg(out.join("tokenizer.json"))
            .arg(&samples)
            .output()
            .unwrap();
        assert!(out_py.status.success(), "{}{}", stdout(&out_py), stderr(&out_py));
        assert!(stdout(&out_py).contains("parity: 300 reviews"), "{}", stdout(&out_py));
    }

    // predict reads the run's tokenizer: a word never seen is pieces, not <unk>.
    let predict = |model: &Path| {
        let mut c = Command::new(bin("worker"));
        c.args(["predict", "--json", "--model"]).arg(model);
        c.arg("An utterly flabbergastingly superb picture.").env("RUST_LOG", "warn");
        run(&mut c)
    };
    let p = predict(&out);
    assert!(p.status.success(), "{}", stderr(&p));
    let line: serde_json::Value = serde_json::from_str(stdout(&p).lines().next().unwrap()).unwrap();
    let (tokens, unknown) = (line["tokens"].as_u64().unwrap(), line["unknown_tokens"].as_u64().unwrap());
    assert!(tokens >= 6 && unknown == 0, "{line}");

    // A missing or corrupt tokenizer.json is a one-line error naming it.
    std::fs::write(out.join("tokenizer.json"), "{\"truncated").unwrap();
    let p = predict(&out);
    assert!(!p.status.success());
    assert!(
        stderr(&p).contains("tokenizer.json") && stderr(&p).contains("not a tokenizers JSON"),
        "{}",
        stderr(&p)
    );
    std::fs::remove_file(out.join("tokenizer.json")).unwrap();
    let p = predict(&out);
    assert!(!p.status.success());
    assert!(stderr(&p).contains("tokenizer.json") && stderr(&p).contains("missing"), "{}", stderr(&p));
    assert!(!stderr(&p).contains("panicked"), "{}", stderr(&p));
}

#[test]
fn bpe_training_on_the_corpus_is_byte_identical_at_any_thread_count() {
    let Some(data) = imdb_data() else { return };
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), BPE_TINY);
    let mut files = Vec::new();
    for (i, threads) in ["1", "3"].into_iter().enumerate() {
        let path = dir.path().join(format!("tokenizer-{threads}.json"));
        let mut c = coordinator_data(&dir.path().join(format!("cache-{i}")));
        c.arg("--no-cache").arg("--data").arg(&data).arg("--config").arg(&config).arg("--json");
        c.arg("--tokenizer-out").arg(&path).env("RAYON_NUM_THREADS", threads);
        run_ok(&mut c);
        files.push(std::fs::read(&path).unwrap());
    }
    assert!(files[0] == files[1], "tokenizer.json differs between 1 and 3 threads");
}

#[test]
fn bad_tokenizer_settings_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let bad_name = write_config(dir.path(), "[data]\ntokenizer = \"wordpiece\"\n");
    let out = run(coordinator_data(&dir.path().join("cache")).arg("--config").arg(&bad_name));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("data.tokenizer must be basic_english, bpe or unigram"),
        "{}",
        stderr(&out)
    );
    let small = write_config(dir.path(), "[data]\ntokenizer = \"bpe\"\nvocab_size = 8\n");
    let out = run(coordinator_data(&dir.path().join("cache")).arg("--config").arg(&small));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("data.vocab_size"), "{}", stderr(&out));
}
