//! `--profile-steps N`: where a training step's time goes, bucket by bucket.
//!
//! Off (the default) a probe costs one thread-local check, so the train step carries its
//! probes always. On, each bucket is timed between two device synchronisations: CUDA kernels
//! run asynchronously, and without them the time of queued work would land in whichever
//! bucket happens to wait for it. That makes profiled steps slower than real ones; the
//! shares are what to read. Buckets nest: a bucket's time excludes the buckets timed inside
//! it (the backward pass runs inside the forward pass's window loop). The profile is
//! per-thread, like the train step.

use std::cell::RefCell;
use std::time::{Duration, Instant};

use serde::Serialize;
use tch::Device;

/// One part of a training step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bucket {
    /// Host: cutting and padding the batch from the shard.
    Collate,
    /// Host checks and sorting, and the copies of tokens and labels to the device.
    ToDevice,
    /// Clearing the gradients.
    ZeroGrad,
    /// The forward pass (embedding, LSTM, head, loss), without the backward inside it.
    Forward,
    Backward,
    /// Gradients into the flat buffer and back, and the compact embedding rows.
    Flatten,
    /// The collective's calls (all-reduce of the gradient and of the row mask).
    Collective,
    /// The global norm and the clipping.
    Clip,
    /// The optimizer's update.
    Optimizer,
    /// Reading the step's statistics (loss, accuracy, norm) back to the host.
    Stats,
}

pub const BUCKETS: [Bucket; 10] = [
    Bucket::Collate,
    Bucket::ToDevice,
    Bucket::ZeroGrad,
    Bucket::Forward,
    Bucket::Backward,
    Bucket::Flatten,
    Bucket::Collective,
    Bucket::Clip,
    Bucket::Optimizer,
    Bucket::Stats,
];

impl Bucket {
    pub fn name(self) -> &'static str {
        match self {
            Bucket::Collate => "collate (host)",
            Bucket::ToDevice => "to device (checks, sort, copies)",
            Bucket::ZeroGrad => "zero grad",
            Bucket::Forward => "forward",
            Bucket::Backward => "backward",
            Bucket::Flatten => "gradient flatten/unflatten",
            Bucket::Collective => "collective",
            Bucket::Clip => "norm and clip",
            Bucket::Optimizer => "optimizer (Adam)",
            Bucket::Stats => "host reads (loss, accuracy, norm)",
        }
    }

    fn index(self) -> usize {
        BUCKETS.iter().position(|&b| b == self).unwrap_or(0)
    }
}

struct Active {
    device: Device,
    totals: [Duration; BUCKETS.len()],
    /// Per open bucket, the time of the buckets nested in it so far.
    nested: Vec<Duration>,
    steps: u64,
    step_total: Duration,
    tokens: u64,
}

thread_local! {
    static ACTIVE: RefCell<Option<Active>> = const { RefCell::new(None) };
}

fn synchronize(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

fn device() -> Option<Device> {
    ACTIVE.with(|a| a.borrow().as_ref().map(|a| a.device))
}

/// Starts profiling this thread's steps on `device` (a running profile restarts).
pub fn start(device: Device) {
    ACTIVE.with(|a| {
        *a.borrow_mut() = Some(Active {
            device,
            totals: [Duration::ZERO; BUCKETS.len()],
            nested: Vec::new(),
            steps: 0,
            step_total: Duration::ZERO,
            tokens: 0,
        })
    });
}

pub fn is_active() -> bool {
    device().is_some()
}

/// Runs `f` and, while profiling, adds its time (less the buckets nested in it) to `bucket`.
pub fn time<T>(bucket: Bucket, f: impl FnOnce() -> T) -> T {
    let Some(device) = device() else { return f() };
    synchronize(device);
    ACTIVE.with(|a| a.borrow_mut().as_mut().map(|a| a.nested.push(Duration::ZERO)));
    let started = Instant::now();
    let out = f();
    synchronize(device);
    let elapsed = started.elapsed();
    ACTIVE.with(|a| {
        if let Some(a) = a.borrow_mut().as_mut() {
            let nested = a.nested.pop().unwrap_or_default();
            a.totals[bucket.index()] += elapsed.saturating_sub(nested);
            if let Some(parent) = a.nested.last_mut() {
                *parent += elapsed;
            }
        }
    });
    out
}

/// Runs one whole step `f` (which reports its real tokens) and counts it.
pub fn step<T>(f: impl FnOnce() -> T, tokens: impl FnOnce(&T) -> u64) -> T {
    let Some(device) = device() else { return f() };
    synchronize(device);
    let started = Instant::now();
    let out = f();
    synchronize(device);
    let elapsed = started.elapsed();
    let tokens = tokens(&out);
    ACTIVE.with(|a| {
        if let Some(a) = a.borrow_mut().as_mut() {
            a.steps += 1;
            a.step_total += elapsed;
            a.tokens += tokens;
        }
    });
    out
}

/// Steps profiled so far (0 when off).
pub fn steps() -> u64 {
    ACTIVE.with(|a| a.borrow().as_ref().map_or(0, |a| a.steps))
}

/// One bucket of a finished profile.
#[derive(Debug, Clone, Serialize)]
pub struct BucketTime {
    pub bucket: &'static str,
    pub ms_per_step: f64,
    pub share: f64,
}

/// A finished profile: mean time per step in each bucket.
#[derive(Debug, Clone, Serialize)]
pub struct StepProfile {
    pub device: String,
    pub steps: u64,
    pub warmup_steps: u64,
    pub ms_per_step: f64,
    /// Real tokens per second over the profiled (synchronised, so slower) steps.
    pub tokens_per_second: f64,
    /// Every bucket, then "other (host, untimed)": the step's time outside all buckets.
    pub buckets: Vec<BucketTime>,
}

/// Ends profiling and returns the profile (None when it was off or no step completed).
pub fn finish(warmup_steps: u64) -> Option<StepProfile> {
    let active = ACTIVE.with(|a| a.borrow_mut().take())?;
    if active.steps == 0 {
        return None;
    }
    let steps = active.steps as f64;
    let total_ms = active.step_total.as_secs_f64() * 1e3 / steps;
    let share = |ms: f64| if total_ms > 0.0 { ms / total_ms } else { 0.0 };
    let mut buckets: Vec<BucketTime> = BUCKETS
        .iter()
        .map(|&b| {
            let ms = active.totals[b.index()].as_secs_f64() * 1e3 / steps;
            BucketTime { bucket: b.name(), ms_per_step: ms, share: share(ms) }
        })
        .collect();
    let timed: f64 = buckets.iter().map(|b| b.ms_per_step).sum();
    let other = (total_ms - timed).max(0.0);
    buckets.push(BucketTime { bucket: "other (host, untimed)", ms_per_step: other, share: share(other) });
    Some(StepProfile {
        device: crate::device::device_name(active.device),
        steps: active.steps,
        warmup_steps,
        ms_per_step: total_ms,
        tokens_per_second: active.tokens as f64 / active.step_total.as_secs_f64().max(1e-12),
        buckets,
    })
}

impl StepProfile {
    /// The profile as a table: bucket, ms per step, share.
    pub fn table(&self) -> String {
        let mut out = format!(
            "step profile: {} steps after {} warm-up steps on {} (synchronised per bucket)\n",
            self.steps, self.warmup_steps, self.device
        );
        out += &format!("{:<36} {:>10} {:>7}\n", "bucket", "ms/step", "share");
        for b in &self.buckets {
            out += &format!("{:<36} {:>10.3} {:>6.1}%\n", b.bucket, b.ms_per_step, b.share * 100.0);
        }
        out += &format!("{:<36} {:>10.3} {:>6.1}%\n", "step", self.ms_per_step, 100.0);
        out += &format!("tokens/s over the profiled steps: {:.0}\n", self.tokens_per_second);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_buckets_are_exclusive_and_off_costs_nothing() {
        assert!(!is_active());
        assert_eq!(time(Bucket::Forward, || 7), 7);
        assert!(finish(0).is_none());
        start(Device::Cpu);
        let tokens = step(
            || {
                time(Bucket::Forward, || {
                    std::thread::sleep(Duration::from_millis(20));
                    time(Bucket::Backward, || std::thread::sleep(Duration::from_millis(30)));
                });
                10u64
            },
            |&t| t,
        );
        assert_eq!(tokens, 10);
        let p = finish(2).unwrap();
        assert!(!is_active());
        let ms = |name: &str| p.buckets.iter().find(|b| b.bucket == name).unwrap().ms_per_step;
        assert!((19.0..29.0).contains(&ms("forward")), "{p:?}");
        assert!((29.0..39.0).contains(&ms("backward")), "{p:?}");
        assert_eq!(p.buckets.len(), BUCKETS.len() + 1);
        let table = p.table();
        assert!(BUCKETS.iter().all(|b| table.contains(b.name())) && table.contains("other"), "{table}");
    }
}
