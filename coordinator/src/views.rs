//! The run folder's views of a distributed run: TensorBoard events under `tb/` and
//! `curves.png`. Per-step scalars are the global batch's: loss and accuracy over every
//! rank's samples of the step (so they do not depend on how many ranks share a global
//! batch), the learning rate and gradient norm (the same on every rank), averaged over the
//! `log_every` steps since the last point, with all ranks' tokens over rank 0's step time
//! (tokens/s); per-epoch scalars
//! are the coordinator's epoch records and evaluations. The x axis is the optimizer step
//! everywhere, so that TensorBoard lines every chart up.
//!
//! A failure here never stops training: the view is switched off with one warning.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use trainer_proto::v1::StepMetrics;
use trainer_viz::curves::{setup_text, CURVES_FILE};
use trainer_viz::{plot_runs, EventWriter, RunCurves};

use crate::eval::Eval;
use crate::run_dir::{EpochRecord, StepRecord};

#[derive(Debug, Default)]
struct Window {
    loss_sum: f64,
    correct: u64,
    samples: u64,
    /// All ranks' tokens since the last point.
    tokens: u64,
    /// Rank 0's step time since the last point. The ranks step in lockstep, so this is the
    /// window's training time; the coordinator's own clock is not, because step reports
    /// can arrive in bursts when it is busy.
    step_seconds: f64,
}

/// One step's reports so far, until every rank's has come.
#[derive(Debug, Default)]
struct PartialStep {
    ranks: usize,
    loss_sum: f64,
    correct: u64,
    samples: u64,
    tokens: u64,
    /// Rank 0's report (its step time; its learning rate and norm are every rank's).
    rank0: Option<StepMetrics>,
}

pub struct RunViews {
    run_dir: PathBuf,
    tb: Option<EventWriter>,
    window: Window,
    /// Ranks of the attempt under way: a step is complete when this many have reported it.
    world: usize,
    /// Steps (epoch, step) that some ranks have reported and others not yet.
    partial: BTreeMap<(u64, u64), PartialStep>,
    log_every: u64,
    steps_per_epoch: u64,
    /// The points written this process, for curves.png while metrics.jsonl has no step records.
    loss: Vec<(f64, f64)>,
    tokens_per_second: Vec<(f64, f64)>,
    plot_failed: bool,
}

impl RunViews {
    pub fn new(
        run_dir: &Path,
        config_toml: &str,
        log_every: usize,
        steps_per_epoch: usize,
        world: usize,
    ) -> Self {
        let tb = match EventWriter::create(run_dir, "coordinator") {
            Ok(mut w) => {
                // Markdown: a fenced block keeps the TOML's lines.
                let text = format!("```toml\n{config_toml}```");
                match w.text(0, "config", &text).and_then(|()| w.flush()) {
                    Ok(()) => Some(w),
                    Err(e) => {
                        tracing::warn!(error = %e, "TensorBoard events are off");
                        None
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "TensorBoard events are off");
                None
            }
        };
        Self {
            run_dir: run_dir.to_path_buf(),
            tb,
            window: Window::default(),
            world: world.max(1),
            partial: BTreeMap::new(),
            log_every: log_every.max(1) as u64,
            steps_per_epoch: steps_per_epoch as u64,
            loss: Vec::new(),
            tokens_per_second: Vec::new(),
            plot_failed: false,
        }
    }

    fn write(&mut self, step: u64, values: &[(&str, f64)]) {
        let Some(tb) = self.tb.as_mut() else { return };
        if let Err(e) = tb.scalars(step, values).and_then(|()| tb.flush()) {
            tracing::warn!(error = %e, "TensorBoard events are off");
            self.tb = None;
        }
    }

    pub fn start_epoch(&mut self) {
        self.window = Window::default();
        self.partial.clear();
    }

    /// The ranks of a new attempt (a resize changes how many share the global batch).
    pub fn set_world(&mut self, world: usize) {
        self.world = world.max(1);
        self.partial.clear();
    }

    /// One rank's step report; returns the point (the metrics.jsonl step record) when one
    /// is due, every `log_every` steps and at the epoch's last, once every rank has
    /// reported the step.
    pub fn step(&mut self, rank: usize, m: &StepMetrics) -> Option<StepRecord> {
        let key = (m.epoch, m.step);
        let part = self.partial.entry(key).or_default();
        part.ranks += 1;
        part.loss_sum += m.loss_sum;
        part.correct += m.correct;
        part.samples += m.samples;
        part.tokens += m.tokens;
        if rank == 0 {
            part.rank0 = Some(*m);
        }
        if part.ranks < self.world || part.rank0.is_none() {
            return None;
        }
        let part = self.partial.remove(&key)?;
        let m = part.rank0?;
        self.window.tokens += part.tokens;
        self.window.loss_sum += part.loss_sum;
        self.window.correct += part.correct;
        self.window.samples += part.samples;
        self.window.step_seconds += m.step_seconds;
        let done = m.step + 1;
        if !(done.is_multiple_of(self.log_every) || done == self.steps_per_epoch) || self.window.samples == 0
        {
            return None;
        }
        let global_step = m.epoch * self.steps_per_epoch + done;
        let w = std::mem::take(&mut self.window);
        let loss = w.loss_sum / w.samples as f64;
        let tokens_per_second =
            if w.step_seconds > 0.0 { w.tokens as f64 / w.step_seconds } else { f64::NAN };
        self.write(
            global_step,
            &[
                ("train/loss", loss),
                ("train/accuracy", w.correct as f64 / w.samples as f64),
                ("train/learning_rate", m.lr),
                ("train/grad_norm", m.grad_norm),
                ("train/tokens_per_second", tokens_per_second),
            ],
        );
        self.loss.push((global_step as f64, loss));
        if tokens_per_second.is_finite() {
            self.tokens_per_second.push((global_step as f64, tokens_per_second));
        }
        Some(StepRecord {
            kind: "step",
            epoch: m.epoch as usize + 1,
            step: done,
            steps_in_epoch: self.steps_per_epoch as usize,
            global_step,
            loss,
            accuracy: w.correct as f64 / w.samples as f64,
            grad_norm: m.grad_norm,
            lr: m.lr,
            tokens_per_second,
        })
    }

    pub fn epoch_end(&mut self, record: &EpochRecord) {
        let step = record.epoch as u64 * self.steps_per_epoch;
        self.write(
            step,
            &[
                ("epoch/train_loss", record.train_loss),
                ("epoch/tokens_per_second", record.tokens_per_second),
                ("epoch/communication_share", record.comm_share),
                ("val/accuracy", record.val_accuracy.unwrap_or(f64::NAN)),
                ("val/loss", record.val_loss.unwrap_or(f64::NAN)),
            ],
        );
    }

    /// A test evaluation after `epochs` epochs of `model`: "last" (the last epoch's model,
    /// charts `test/*`) or "best" (the kept model, `test_best/*`), as `worker train` names them.
    pub fn test(&mut self, epochs: usize, model: &str, test: &Eval, classes: &[String]) {
        let step = epochs as u64 * self.steps_per_epoch;
        let prefix = if model == "best" { "test_best" } else { "test" };
        let mut scalars = vec![
            (format!("{prefix}/accuracy"), test.accuracy()),
            (format!("{prefix}/loss"), test.mean_loss()),
        ];
        if let Some(m) = test.class_metrics(classes) {
            scalars.extend(m.scalars(prefix));
        }
        let named: Vec<(&str, f64)> = scalars.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        self.write(step, &named);
    }

    /// Draws confusion.png in the run folder; a failure is a warning, never the job's end.
    pub fn confusion(&mut self, classes: &[String], confusion: &[Vec<u64>]) {
        let path = self.run_dir.join(trainer_viz::confusion::CONFUSION_FILE);
        if let Err(e) = trainer_viz::confusion::plot_confusion(&path, classes, confusion) {
            tracing::warn!(error = %e, "confusion.png is off");
        }
    }

    /// Redraws curves.png from metrics.jsonl (and summary.json once there is one).
    pub fn plot(&mut self, world_size: usize, backend: &str) {
        if self.plot_failed {
            return;
        }
        let result = RunCurves::load(&self.run_dir).and_then(|mut curves| {
            curves.use_live_steps(&self.loss, &self.tokens_per_second);
            if curves.setup.is_empty() {
                curves.setup = setup_text(world_size, backend);
            }
            plot_runs(&[curves], &self.run_dir.join(CURVES_FILE))
        });
        if let Err(e) = result {
            tracing::warn!(error = %e, "curves.png is off");
            self.plot_failed = true;
        }
    }
}
