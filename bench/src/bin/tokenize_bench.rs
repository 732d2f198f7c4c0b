//! Tokenization throughput of a subword `tokenizer.json` over the whole corpus (both splits),
//! as the pipeline runs it (reviews in parallel on every core) and on one thread, beside
//! `basic_english` (tokenize + vocabulary + encode) on the same reviews. Reading the corpus
//! is not timed. `bench/tokenizer_bench.py` runs this and Python's `tokenizers` on the same
//! reviews in one go and prints the ratio.
//!
//! `cargo run --release -p trainer-bench --bin tokenize_bench -- --data $IMDB_DATA --tokenizer runs/x/tokenizer.json`

use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use trainer_core::corpus::{read_corpus, DataSource};
use trainer_core::encode::encode_corpus;
use trainer_core::subword::SubwordTokenizer;

#[derive(Parser)]
struct Args {
    /// The corpus tarball or folder.
    #[arg(long, env = "IMDB_DATA")]
    data: std::path::PathBuf,
    /// A subword run's tokenizer.json.
    #[arg(long)]
    tokenizer: std::path::PathBuf,
    /// Repetitions of each measurement (the median is printed).
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let raw = read_corpus(&DataSource::from_path(&args.data)?).context("reading the corpus")?;
    let tokenizer = SubwordTokenizer::load(&args.tokenizer)?;
    let reviews: Vec<_> = raw.train.iter().chain(&raw.test).cloned().collect();
    let bytes: usize = reviews.iter().map(|r| r.text.len()).sum();
    let runs = args.runs.max(1);

    let mut parallel = Vec::new();
    let mut tokens = 0;
    for _ in 0..runs {
        let t = Instant::now();
        let split = tokenizer.encode_split(&reviews)?;
        parallel.push(t.elapsed().as_secs_f64());
        tokens = split.tokens.len();
    }
    let mut single = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let mut n = 0;
        for r in &reviews {
            n += tokenizer.encode(&r.text)?.len();
        }
        single.push(t.elapsed().as_secs_f64());
        anyhow::ensure!(n == tokens, "one thread gave {n} tokens, the parallel pass {tokens}");
    }
    let mut words = Vec::new();
    let mut word_tokens = 0;
    for _ in 0..runs {
        let t = Instant::now();
        let (corpus, _) = encode_corpus(&raw, 1, 0);
        words.push(t.elapsed().as_secs_f64());
        word_tokens = corpus.train.tokens.len() + corpus.test.tokens.len();
    }
    let report = serde_json::json!({
        "reviews": reviews.len(),
        "bytes": bytes,
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "subword_tokens": tokens,
        "subword_parallel_seconds": median(parallel),
        "subword_one_thread_seconds": median(single),
        "basic_english_tokens": word_tokens,
        "basic_english_parallel_seconds": median(words),
    });
    println!("{report}");
    Ok(())
}
