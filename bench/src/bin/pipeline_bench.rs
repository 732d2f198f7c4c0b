//! Data-pipeline benchmark: cold (read + tokenize + vocab + encode, no cache) and warm
//! (encoded cache hit) load of the full corpus, repeated, medians printed.
//!
//! `cargo run --release -p trainer-bench --bin pipeline_bench -- --data $IMDB_DATA`

use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use trainer_core::corpus::DownloadSpec;
use trainer_core::pipeline::{prepare, CacheStatus, PrepareOptions};

#[derive(Parser)]
struct Args {
    /// The corpus tarball or folder.
    #[arg(long, env = "IMDB_DATA")]
    data: std::path::PathBuf,
    /// Repetitions of each measurement.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cache = tempfile::tempdir()?;
    let options = |use_cache| PrepareOptions {
        data: Some(args.data.clone()),
        download: DownloadSpec::official(cache.path().to_path_buf()),
        use_cache,
        min_freq: 1,
        max_vocab: 0,
        tokenizer: Default::default(),
        labelled: Default::default(),
    };
    let mut cold = Vec::new();
    let mut stages: Vec<Vec<(String, f64)>> = Vec::new();
    for _ in 0..args.runs {
        let t = Instant::now();
        let (corpus, report) = prepare(&options(false)).context("cold pipeline")?;
        cold.push(t.elapsed().as_secs_f64());
        anyhow::ensure!(corpus.train.len() == 25_000 && corpus.test.len() == 25_000, "not the full corpus");
        stages.push(report.stages);
    }
    // Fill the cache once, then time hits.
    prepare(&options(true))?;
    let mut warm = Vec::new();
    for _ in 0..args.runs {
        let t = Instant::now();
        let (_, report) = prepare(&options(true))?;
        warm.push(t.elapsed().as_secs_f64());
        anyhow::ensure!(report.cache == CacheStatus::Hit, "expected a cache hit, got {:?}", report.cache);
    }
    let stage_medians: Vec<(String, f64)> = stages[0]
        .iter()
        .enumerate()
        .map(|(i, (name, _))| (name.clone(), median(stages.iter().map(|s| s[i].1).collect())))
        .collect();
    let (cold_median, warm_median) = (median(cold), median(warm));
    if args.json {
        let stages: serde_json::Map<String, serde_json::Value> =
            stage_medians.iter().map(|(n, s)| (n.clone(), serde_json::json!(s))).collect();
        println!(
            "{}",
            serde_json::json!({"cold_seconds": cold_median, "warm_seconds": warm_median, "cold_stages": stages, "runs": args.runs})
        );
    } else {
        println!("data pipeline, full corpus (50,000 reviews), median of {} runs", args.runs);
        for (name, secs) in &stage_medians {
            println!("  cold  {name:<28} {secs:>7.3} s");
        }
        println!("  cold  {:<28} {cold_median:>7.3} s   (target < 1.5 s)", "total");
        println!("  warm  {:<28} {warm_median:>7.3} s   (target < 0.2 s)", "cache hit");
    }
    Ok(())
}
