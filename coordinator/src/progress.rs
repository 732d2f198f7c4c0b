//! What the user sees: a progress bar (loss, tokens/s, ETA) when stderr is a terminal, plain
//! `tracing` lines otherwise, and the one-screen summary at the end. Log lines and worker
//! output go through [`Output`] so that they never tear the bar.

use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use trainer_proto::v1::StepMetrics;

/// Where lines go: above the bar while one is shown, else straight to stderr.
#[derive(Clone, Default)]
pub struct Output {
    bar: Arc<Mutex<Option<ProgressBar>>>,
}

impl Output {
    fn bar(&self) -> Option<ProgressBar> {
        self.bar.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_bar(&self, bar: Option<ProgressBar>) {
        *self.bar.lock().unwrap_or_else(|p| p.into_inner()) = bar;
    }

    pub fn line(&self, line: &str) {
        self.raw(format!("{line}\n").as_bytes());
    }

    fn raw(&self, bytes: &[u8]) {
        let write = || {
            let mut err = std::io::stderr().lock();
            let _ = err.write_all(bytes);
            let _ = err.flush();
        };
        match self.bar() {
            Some(bar) if !bar.is_finished() => bar.suspend(write),
            _ => write(),
        }
    }
}

/// A `tracing` writer that prints each event through [`Output`].
pub struct OutputWriter {
    output: Output,
    buf: Vec<u8>,
}

impl Write for OutputWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for OutputWriter {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            self.output.raw(&self.buf);
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Output {
    type Writer = OutputWriter;
    fn make_writer(&'a self) -> Self::Writer {
        OutputWriter { output: self.clone(), buf: Vec::new() }
    }
}

/// Running totals of one epoch, over all ranks.
#[derive(Debug, Default, Clone, Copy)]
pub struct EpochTotals {
    pub loss_sum: f64,
    pub samples: u64,
    pub tokens: u64,
    pub step_seconds: f64,
    pub comm_seconds: f64,
}

impl EpochTotals {
    pub fn mean_loss(&self) -> f64 {
        if self.samples == 0 {
            f64::NAN
        } else {
            self.loss_sum / self.samples as f64
        }
    }
}

pub struct Progress {
    output: Output,
    bar: Option<ProgressBar>,
    epochs: usize,
    steps_per_epoch: usize,
    log_every: usize,
    epoch: u64,
    epoch_start: Instant,
    totals: EpochTotals,
    last_plain_log: Instant,
}

impl Progress {
    pub fn new(output: Output, epochs: usize, steps_per_epoch: usize, log_every: usize) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(
                Some((epochs * steps_per_epoch) as u64),
                ProgressDrawTarget::stderr_with_hz(5),
            );
            let style = ProgressStyle::with_template(
                "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} steps  {msg}  ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar.set_prefix("waiting for workers");
            bar.enable_steady_tick(Duration::from_millis(500));
            bar
        });
        output.set_bar(bar.clone());
        Self {
            output,
            bar,
            epochs,
            steps_per_epoch,
            log_every: log_every.max(1),
            epoch: 0,
            epoch_start: Instant::now(),
            totals: EpochTotals::default(),
            last_plain_log: Instant::now(),
        }
    }

    pub fn start_epoch(&mut self, epoch: u64) {
        self.epoch = epoch;
        self.epoch_start = Instant::now();
        self.totals = EpochTotals::default();
        if let Some(bar) = &self.bar {
            bar.set_prefix(format!("epoch {}/{}", epoch + 1, self.epochs));
            bar.set_position(epoch * self.steps_per_epoch as u64);
        } else {
            tracing::info!(epoch = epoch + 1, epochs = self.epochs, "epoch started");
        }
    }

    pub fn tokens_per_second(&self) -> f64 {
        self.totals.tokens as f64 / self.epoch_start.elapsed().as_secs_f64().max(1e-9)
    }

    /// Whether the 0-based `step` of an epoch gets a line in metrics.jsonl: every
    /// `log_every` steps and the epoch's last, as in `worker train`.
    /// A step report from one rank; rank 0's reports move the bar.
    pub fn step(&mut self, rank: usize, m: &StepMetrics) {
        self.totals.loss_sum += m.loss_sum;
        self.totals.samples += m.samples;
        self.totals.tokens += m.tokens;
        self.totals.step_seconds += m.step_seconds;
        self.totals.comm_seconds += m.comm_seconds;
        if rank != 0 || m.epoch != self.epoch {
            return;
        }
        let done = m.step + 1;
        let message = format!("loss {:.4}  {:.0} tok/s", self.totals.mean_loss(), self.tokens_per_second());
        if let Some(bar) = &self.bar {
            bar.set_position(self.epoch * self.steps_per_epoch as u64 + done);
            bar.set_message(message);
        } else if done.is_multiple_of(self.log_every as u64)
            || self.last_plain_log.elapsed() > Duration::from_secs(30)
        {
            self.last_plain_log = Instant::now();
            tracing::info!(
                epoch = self.epoch + 1,
                step = done,
                steps = self.steps_per_epoch,
                loss = format_args!("{:.4}", self.totals.mean_loss()),
                tokens_per_second = format_args!("{:.0}", self.tokens_per_second()),
                "training"
            );
        }
    }

    pub fn status(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.set_prefix(text.to_string()),
            None => tracing::info!("{text}"),
        }
    }

    pub fn line(&self, text: &str) {
        self.output.line(text);
    }

    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        self.output.set_bar(None);
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}
