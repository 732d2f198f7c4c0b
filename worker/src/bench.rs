//! `worker bench-memory`: one training step on a long synthetic batch, reporting the
//! process's peak resident memory, to show that TBPTT bounds memory by the window K.
//! Peak RSS only grows within a process, so measure each K in a fresh process
//! (bench/tbptt_memory.sh does).

use serde::Serialize;
use tch::Device;
use trainer_core::config::JobConfig;

use crate::collective::NoopCollective;
use crate::error::Result;
use crate::predict::batch_of;
use crate::trainer::Trainer;

#[derive(Debug, Clone)]
pub struct MemoryBenchOptions {
    pub config: JobConfig,
    pub vocab_size: usize,
    pub seq_len: usize,
    pub steps: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct MemoryReport {
    pub bptt: usize,
    pub seq_len: usize,
    pub batch_size: usize,
    pub embed_dim: usize,
    pub hidden: usize,
    pub layers: usize,
    pub vocab_size: usize,
    /// Resident memory after building the model and the batch, before any step (MiB).
    pub rss_before_mib: f64,
    /// The process's peak resident memory (VmHWM) after the steps (MiB).
    pub peak_rss_mib: f64,
    pub step_seconds: f64,
    pub tokens_per_second: f64,
}

/// `VmRSS` and `VmHWM` from /proc/self/status, in MiB (0 where unavailable).
pub fn rss_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |key: &str| -> f64 {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

pub fn bench_memory(options: &MemoryBenchOptions) -> Result<MemoryReport> {
    let c = &options.config;
    let mut trainer = Trainer::new(c, options.vocab_size, Device::Cpu, Box::new(NoopCollective))?;
    // Deterministic pseudo-random ids; every row has the full length.
    let rows: Vec<Vec<u32>> = (0..c.train.batch_size)
        .map(|r| {
            (0..options.seq_len)
                .map(|t| {
                    let x = crate::trainer::mix64((r * 1_000_003 + t) as u64);
                    2 + (x % (options.vocab_size as u64 - 2)) as u32
                })
                .collect()
        })
        .collect();
    let mut batch = batch_of(&rows);
    batch.labels = (0..batch.size as i64).map(|i| i % 2).collect();
    let (rss_before, _) = rss_mib();
    let start = std::time::Instant::now();
    for _ in 0..options.steps.max(1) {
        trainer.train_step(&batch)?;
    }
    let seconds = start.elapsed().as_secs_f64() / options.steps.max(1) as f64;
    let (_, peak) = rss_mib();
    Ok(MemoryReport {
        bptt: c.train.bptt,
        seq_len: options.seq_len,
        batch_size: c.train.batch_size,
        embed_dim: c.model.embed_dim,
        hidden: c.model.hidden,
        layers: c.model.layers,
        vocab_size: options.vocab_size,
        rss_before_mib: rss_before,
        peak_rss_mib: peak,
        step_seconds: seconds,
        tokens_per_second: (batch.size * options.seq_len) as f64 / seconds,
    })
}
