//! `worker train`: the whole job in one process, as a loop over the [`Trainer`]'s steps.
//!
//! The epoch's batches come from the same shard plan the distributed run uses (world size
//! 1, rank 0) and the step goes through the same collective point (a no-op here), so this
//! is the distributed code path with one rank.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use serde_json::json;
use trainer_core::batch::collate;
use trainer_core::config::JobConfig;
use trainer_core::pipeline::{prepare, PrepareOptions};
use trainer_core::shard::ShardPlan;
use trainer_core::splits::job_splits;
use trainer_core::EncodedSplit;

use crate::checkpoint::{
    load_checkpoint, load_model_weights, save_checkpoint, save_model, vocab_fingerprint, LoopState, Position,
    CHECKPOINT_FILE, LAST_MODEL_FILE, MODEL_FILE,
};
use crate::collective::NoopCollective;
use crate::device::{device_name, resolve_device};
use crate::error::{io_err, Result, WorkerError};
use crate::tbptt::LstmKernel;
use crate::trainer::{EvalCounts, Trainer};
use trainer_core::class_metrics::ClassMetrics;

pub const SUMMARY_FILE: &str = "summary.json";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const CONFIG_FILE: &str = "config.toml";
pub const VOCAB_FILE: &str = trainer_core::vocab::VOCAB_FILE;

/// One single-process training run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub config: JobConfig,
    pub prepare: PrepareOptions,
    /// The run folder.
    pub out: PathBuf,
    /// A run folder whose checkpoint to continue from.
    pub resume: Option<PathBuf>,
    /// Also checkpoint every this many steps inside an epoch (0: at epoch ends only).
    pub checkpoint_every: usize,
    /// Stop once this many epochs are complete, as if interrupted (the checkpoint stays).
    pub stop_after_epoch: Option<usize>,
    /// Stop once this many optimizer steps are done in all, checkpointing there (mid-epoch
    /// if need be), as if interrupted.
    pub stop_after_steps: Option<u64>,
    /// Also measure test accuracy after every epoch (for time-to-accuracy benchmarks).
    pub eval_test_each_epoch: bool,
    /// Override the device's LSTM kernel (same results; for benchmarks).
    pub lstm_kernel: Option<LstmKernel>,
    /// Time this many steps bucket by bucket (after [`PROFILE_WARMUP_STEPS`]), print the
    /// table and write `profile.json` (0: off).
    pub profile_steps: u64,
}

/// Steps run before `--profile-steps` starts timing (allocator, cuDNN plans, caches).
pub const PROFILE_WARMUP_STEPS: u64 = 3;
pub const PROFILE_FILE: &str = "profile.json";

/// summary.json. The coordinator's has the same fields for the kept and the last model.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    /// Test accuracy of the kept model, model.safetensors (None when the run was stopped
    /// before the end).
    pub test_accuracy: Option<f64>,
    pub test_loss: Option<f64>,
    /// Which model is kept in model.safetensors: "best" (the best validation accuracy, the
    /// first epoch of a tie) or "last" (no validation split).
    pub kept_model: String,
    /// The epoch (1-based) of the kept model.
    pub kept_epoch: Option<usize>,
    /// The last epoch's model (model-last.safetensors) on the test split.
    pub last_epoch_test_accuracy: Option<f64>,
    pub last_epoch_test_loss: Option<f64>,
    pub best_val_accuracy: Option<f64>,
    pub best_epoch: Option<usize>,
    /// Epochs completed.
    pub epochs: usize,
    pub steps: u64,
    /// Time in training steps (no evaluation, no checkpointing), over all attempts.
    pub train_seconds: f64,
    pub train_tokens: u64,
    pub tokens_per_second: f64,
    pub eval_seconds: f64,
    pub wall_seconds: f64,
    pub stopped_early: bool,
    pub interrupted: bool,
    pub device: String,
    pub parameters: usize,
    pub vocab_size: usize,
    pub train_examples: usize,
    pub val_examples: usize,
    pub test_examples: usize,
    /// Checksum of the last step's parameters (the last epoch's model when the run ended).
    pub final_parameter_checksum: String,
    /// The class names, in label order (as in labels.json).
    pub classes: Vec<String>,
    /// The kept model's test accuracy, macro-F1, per-class precision and recall, and
    /// confusion matrix (rows: the true class, columns: the predicted one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_metrics: Option<trainer_core::class_metrics::ClassMetrics>,
}

/// Appends one JSON object per line, flushed at once so that a crash loses nothing.
pub struct MetricsLog {
    file: std::fs::File,
    path: PathBuf,
}

impl MetricsLog {
    pub fn open(path: &Path, append: bool) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(append)
            .write(true)
            .truncate(!append)
            .open(path)
            .map_err(io_err(path))?;
        Ok(Self { file, path: path.to_path_buf() })
    }

    pub fn write(&mut self, value: &serde_json::Value) -> Result<()> {
        writeln!(self.file, "{value}").map_err(io_err(&self.path))?;
        self.file.flush().map_err(io_err(&self.path))
    }
}

/// The batches (sample indices into `split`) of one rank for one epoch: the shard plan's
/// part for `rank` (random or length-bucketed global batches), cut at `max_steps_per_epoch`.
pub fn epoch_batches(
    split: &EncodedSplit,
    config: &JobConfig,
    world_size: usize,
    rank: usize,
    epoch: usize,
) -> Result<Vec<Vec<u32>>> {
    let plan = ShardPlan::for_epoch(split, world_size, &config.train, config.data.max_len, epoch as u64)?;
    let mut batches = plan.rank_batches(rank);
    if config.train.max_steps_per_epoch > 0 {
        batches.truncate(config.train.max_steps_per_epoch);
    }
    Ok(batches)
}

fn all_indices(split: &EncodedSplit) -> Vec<u32> {
    (0..split.len() as u32).collect()
}

/// Runs the job and writes the run folder; returns its summary.
/// Ends `--profile-steps`: the table on stderr (stdout carries the summary), the numbers in
/// the run folder's `profile.json`.
fn report_profile(out: &Path) -> Result<()> {
    let Some(profile) = crate::profile::finish(PROFILE_WARMUP_STEPS) else { return Ok(()) };
    eprint!("{}", profile.table());
    let path = out.join(PROFILE_FILE);
    let json = serde_json::to_string_pretty(&profile)
        .map_err(|e| WorkerError::Invalid(format!("cannot encode the step profile: {e}")))?;
    std::fs::write(&path, json).map_err(io_err(&path))
}

pub fn run_training(options: &RunOptions) -> Result<RunSummary> {
    let wall = Instant::now();
    let mut config = options.config.clone();
    config.validate()?;
    if config.train.threads > 0 {
        tch::set_num_threads(config.train.threads as i32);
    }
    let out = &options.out;

    // Data: the corpus (cached), the three splits, the vocabulary in the run folder. The
    // run folder is made once the data is read, so that refused data leaves nothing.
    let (corpus, report) = prepare(&options.prepare)?;
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    // The head has one output per class of the data.
    config.model.num_classes = corpus.classes.len();
    config.validate()?;
    let config = &config;
    trainer_core::pipeline::log_corpus_ready(&corpus, &report);
    let splits = job_splits(&corpus, &config.data, config.train.seed);
    tracing::info!(
        train = splits.train.len(),
        val = splits.val.len(),
        test = splits.test.len(),
        vocab = corpus.vocab.len(),
        "splits"
    );
    trainer_core::pipeline::write_run_files(out, &corpus)?;
    trainer_core::write_atomically(&out.join(CONFIG_FILE), config.to_toml().as_bytes())?;
    let fingerprint = vocab_fingerprint(&corpus.vocab);

    // The replica.
    let device = resolve_device(&config.train.device)?;
    let mut trainer = Trainer::new(config, corpus.vocab.len(), device, Box::new(NoopCollective))?;
    trainer.broadcast_parameters()?;
    if let Some(kernel) = options.lstm_kernel {
        trainer.set_lstm_kernel(kernel);
    }
    let steps_per_epoch = epoch_batches(&splits.train, config, 1, 0, 0)?.len();
    trainer.set_total_steps((steps_per_epoch * config.train.epochs) as u64);
    tracing::info!(
        device = %device_name(device),
        kernel = ?trainer.pass_options().kernel,
        parameters = trainer.model().shape().num_parameters(),
        steps_per_epoch,
        "model ready"
    );

    // Resume: weights, optimizer, position and loop state from the checkpoint.
    let mut position = Position::default();
    let mut state = LoopState::default();
    let mut append_metrics = false;
    if let Some(dir) = &options.resume {
        let path = dir.join(CHECKPOINT_FILE);
        let checkpoint = load_checkpoint(&path)?;
        let theirs = &checkpoint.meta.config;
        if theirs.data != config.data || theirs.train.seed != config.train.seed {
            return Err(WorkerError::Checkpoint {
                path,
                message: "written with other data settings or another seed; a resumed run must \
                          see the same samples in the same order (use the checkpoint's config.toml)"
                    .into(),
            });
        }
        checkpoint.restore_into(&mut trainer, &fingerprint, &path)?;
        position = checkpoint.meta.position;
        state = checkpoint.meta.loop_state.clone();
        let same_folder = std::fs::canonicalize(dir).ok() == std::fs::canonicalize(out).ok();
        append_metrics = same_folder;
        if !same_folder && dir.join(MODEL_FILE).exists() {
            // The best model so far, with its digest, so that the new folder is whole.
            for from in [dir.join(MODEL_FILE), trainer_core::integrity::sidecar_path(&dir.join(MODEL_FILE))] {
                if from.exists() {
                    let name = from.file_name().unwrap_or_default();
                    std::fs::copy(&from, out.join(name)).map_err(io_err(&from))?;
                }
            }
        }
        tracing::info!(
            epoch = position.epoch,
            step_in_epoch = position.step_in_epoch,
            global_step = position.global_step,
            "resumed from {}",
            path.display()
        );
    }
    let mut metrics = MetricsLog::open(&out.join(METRICS_FILE), append_metrics)?;
    let mut views = Views::open(out, &config.to_toml());
    let checkpoint_path = out.join(CHECKPOINT_FILE);
    let model_path = out.join(MODEL_FILE);
    let t = &config.train;
    let mut eval_seconds = 0.0;
    let mut interrupted = false;
    // Steps run by this process (a resumed run counts from its own start).
    let mut steps_here: u64 = 0;
    // The last epoch's model on the test split, when --eval-test-each-epoch measured it.
    let mut last_epoch_test: Option<EvalCounts> = None;

    for epoch in position.epoch..t.epochs {
        if state.stopped_early {
            break;
        }
        let batches = epoch_batches(&splits.train, config, 1, 0, epoch)?;
        let first = if epoch == position.epoch { position.step_in_epoch } else { 0 };
        // Training steps; the clock stops for logging and checkpoints.
        let mut window = StepWindow::default();
        let mut clock = Instant::now();
        for (i, samples) in batches.iter().enumerate().skip(first) {
            if options.profile_steps > 0 && steps_here == PROFILE_WARMUP_STEPS {
                crate::profile::start(trainer.device());
            }
            let stats = crate::profile::step(
                || {
                    let batch = crate::profile::time(crate::profile::Bucket::Collate, || {
                        collate(&splits.train, samples, config.data.max_len, config.data.truncation)
                    });
                    trainer.train_step(&batch)
                },
                |s| s.as_ref().map_or(0, |s| s.tokens as u64),
            )?;
            steps_here += 1;
            if options.profile_steps > 0 && steps_here == PROFILE_WARMUP_STEPS + options.profile_steps {
                report_profile(out)?;
            }
            window.add(&stats);
            state.train_tokens += stats.tokens as u64;
            let log_now = (i + 1) % t.log_every == 0 || i + 1 == batches.len();
            let stop_now = options.stop_after_steps == Some(trainer.global_step());
            let checkpoint_now = stop_now
                || (options.checkpoint_every > 0
                    && (i + 1) % options.checkpoint_every == 0
                    && i + 1 < batches.len());
            if !(log_now || checkpoint_now) {
                continue;
            }
            let seconds = clock.elapsed().as_secs_f64();
            state.train_seconds += seconds;
            window.seconds += seconds;
            if log_now {
                tracing::info!(
                    epoch = epoch + 1,
                    step = i + 1,
                    of = batches.len(),
                    loss = format!("{:.4}", window.mean_loss()),
                    acc = format!("{:.3}", window.accuracy()),
                    tok_s = format!("{:.0}", window.tokens_per_second()),
                    "train"
                );
                metrics.write(&json!({
                    "type": "step",
                    "epoch": epoch + 1,
                    "step": i + 1,
                    "steps_in_epoch": batches.len(),
                    "global_step": trainer.global_step(),
                    "loss": window.mean_loss(),
                    "accuracy": window.accuracy(),
                    "lr": stats.lr,
                    "grad_norm": stats.grad_norm,
                    "tokens_per_second": window.tokens_per_second(),
                    "train_seconds": state.train_seconds,
                }))?;
                views.scalars(
                    trainer.global_step(),
                    &[
                        ("train/loss", window.mean_loss()),
                        ("train/accuracy", window.accuracy()),
                        ("train/learning_rate", stats.lr),
                        ("train/grad_norm", stats.grad_norm),
                        ("train/tokens_per_second", window.tokens_per_second()),
                    ],
                );
                window = StepWindow::default();
            }
            if checkpoint_now {
                let position = Position { epoch, step_in_epoch: i + 1, global_step: trainer.global_step() };
                save_checkpoint(&trainer, &checkpoint_path, position, &state, &fingerprint)?;
            }
            if stop_now {
                interrupted = true;
                break;
            }
            clock = Instant::now();
        }
        if interrupted {
            break;
        }

        // Evaluation; the best model (by validation accuracy) is kept.
        let eval_clock = Instant::now();
        let improved = if splits.val.is_empty() {
            true
        } else {
            let val = trainer.evaluate(&splits.val, &all_indices(&splits.val))?;
            log_eval(
                &mut metrics,
                &mut views,
                trainer.global_step(),
                "val",
                "last",
                epoch + 1,
                &val,
                state.train_seconds,
                &corpus.classes,
            )?;
            let better = state.best_val_accuracy.is_none_or(|b| val.accuracy() > b);
            if better {
                state.best_val_accuracy = Some(val.accuracy());
            }
            better
        };
        if improved {
            state.best_epoch = Some(epoch + 1);
            state.epochs_without_improvement = 0;
            save_model(trainer.model(), config, &model_path)?;
        } else {
            state.epochs_without_improvement += 1;
        }
        last_epoch_test = None;
        if options.eval_test_each_epoch {
            let test = trainer.evaluate(&splits.test, &all_indices(&splits.test))?;
            log_eval(
                &mut metrics,
                &mut views,
                trainer.global_step(),
                "test",
                "last",
                epoch + 1,
                &test,
                state.train_seconds,
                &corpus.classes,
            )?;
            last_epoch_test = Some(test);
        }
        eval_seconds += eval_clock.elapsed().as_secs_f64();
        state.epochs_completed = epoch + 1;
        if t.early_stopping_patience > 0 && state.epochs_without_improvement >= t.early_stopping_patience {
            tracing::info!(
                epoch = epoch + 1,
                patience = t.early_stopping_patience,
                "validation accuracy stopped improving; stopping early"
            );
            state.stopped_early = true;
        }
        let next = Position { epoch: epoch + 1, step_in_epoch: 0, global_step: trainer.global_step() };
        save_checkpoint(&trainer, &checkpoint_path, next, &state, &fingerprint)?;
        views.plot(out);
        if options.stop_after_epoch == Some(epoch + 1) && epoch + 1 < t.epochs {
            interrupted = true;
            break;
        }
    }

    if options.profile_steps > 0 {
        if crate::profile::is_active() {
            report_profile(out)?;
        } else if steps_here <= PROFILE_WARMUP_STEPS {
            tracing::warn!(steps = steps_here, "--profile-steps: the run ended before profiling began");
        }
    }

    // The last epoch's model on the test split, exported as model-last.safetensors; then the
    // kept model (the best by validation, already in model.safetensors).
    let final_checksum = format!("{:016x}", trainer.parameter_checksum()?);
    let kept_model = if splits.val.is_empty() { "last" } else { "best" };
    let (mut test, mut last_test) = (None, None);
    if !interrupted {
        let eval_clock = Instant::now();
        let last = match last_epoch_test.take() {
            Some(counts) => counts,
            None => {
                let counts = trainer.evaluate(&splits.test, &all_indices(&splits.test))?;
                log_eval(
                    &mut metrics,
                    &mut views,
                    trainer.global_step(),
                    "test",
                    "last",
                    state.epochs_completed,
                    &counts,
                    state.train_seconds,
                    &corpus.classes,
                )?;
                counts
            }
        };
        save_model(trainer.model(), config, &out.join(LAST_MODEL_FILE))?;
        let kept = if state.best_epoch != Some(state.epochs_completed) && model_path.exists() {
            load_model_weights(trainer.model_mut(), &model_path)?;
            trainer.evaluate(&splits.test, &all_indices(&splits.test))?
        } else {
            last.clone()
        };
        log_eval(
            &mut metrics,
            &mut views,
            trainer.global_step(),
            "test",
            "best",
            state.epochs_completed,
            &kept,
            state.train_seconds,
            &corpus.classes,
        )?;
        eval_seconds += eval_clock.elapsed().as_secs_f64();
        test = Some(kept);
        last_test = Some(last);
    }
    let test_metrics =
        test.as_ref().and_then(|t| ClassMetrics::from_confusion(&corpus.classes, &t.confusion));
    if let Some(m) = &test_metrics {
        let path = out.join(trainer_viz::confusion::CONFUSION_FILE);
        if let Err(e) = trainer_viz::confusion::plot_confusion(&path, &corpus.classes, &m.confusion) {
            tracing::warn!(error = %e, "confusion.png is off");
        }
        if corpus.classes.len() > 2 {
            eprint!("the kept model on the test split, by class:\n{}", m.render());
        }
    }
    let summary = RunSummary {
        test_accuracy: test.as_ref().map(|t| t.accuracy()),
        test_loss: test.as_ref().map(|t| t.mean_loss()),
        kept_model: kept_model.to_string(),
        kept_epoch: state.best_epoch,
        last_epoch_test_accuracy: last_test.as_ref().map(|t| t.accuracy()),
        last_epoch_test_loss: last_test.as_ref().map(|t| t.mean_loss()),
        best_val_accuracy: state.best_val_accuracy,
        best_epoch: state.best_epoch,
        epochs: state.epochs_completed,
        steps: trainer.global_step(),
        train_seconds: state.train_seconds,
        train_tokens: state.train_tokens,
        tokens_per_second: if state.train_seconds > 0.0 {
            state.train_tokens as f64 / state.train_seconds
        } else {
            0.0
        },
        eval_seconds,
        wall_seconds: wall.elapsed().as_secs_f64(),
        stopped_early: state.stopped_early,
        interrupted,
        device: device_name(device),
        parameters: trainer.model().shape().num_parameters(),
        vocab_size: corpus.vocab.len(),
        train_examples: splits.train.len(),
        val_examples: splits.val.len(),
        test_examples: splits.test.len(),
        final_parameter_checksum: final_checksum,
        classes: corpus.classes.clone(),
        test_metrics,
    };
    let text = serde_json::to_string_pretty(&summary)
        .map_err(|e| WorkerError::Invalid(format!("cannot serialise the summary: {e}")))?;
    trainer_core::write_atomically(&out.join(SUMMARY_FILE), text.as_bytes())?;
    views.plot(out);
    Ok(summary)
}

/// `model`: `last` (the weights after that epoch) or `best` (the kept model: the best by
/// validation, or the last epoch's without a validation split).
#[allow(clippy::too_many_arguments)]
fn log_eval(
    metrics: &mut MetricsLog,
    views: &mut Views,
    global_step: u64,
    split: &str,
    model: &str,
    epoch: usize,
    counts: &EvalCounts,
    train_seconds: f64,
    classes: &[String],
) -> Result<()> {
    tracing::info!(
        split,
        model,
        epoch,
        accuracy = format!("{:.4}", counts.accuracy()),
        loss = format!("{:.4}", counts.mean_loss()),
        "evaluation"
    );
    // TensorBoard: the best model's test result is its own chart.
    let prefix = if model == "best" { format!("{split}_best") } else { split.to_string() };
    let mut scalars = vec![
        (format!("{prefix}/accuracy"), counts.accuracy()),
        (format!("{prefix}/loss"), counts.mean_loss()),
    ];
    if let Some(m) = ClassMetrics::from_confusion(classes, &counts.confusion) {
        scalars.extend(m.scalars(&prefix));
    }
    views.scalars(global_step, &scalars.iter().map(|(k, v)| (k.as_str(), *v)).collect::<Vec<_>>());
    metrics.write(&json!({
        "type": "eval",
        "split": split,
        "model": model,
        "epoch": epoch,
        "accuracy": counts.accuracy(),
        "loss": counts.mean_loss(),
        "examples": counts.total,
        "train_seconds": train_seconds,
    }))
}

/// TensorBoard events under `tb/` and `curves.png`, as the coordinator writes them. Neither
/// may stop training: a failure switches the view off with one warning.
struct Views {
    tb: Option<trainer_viz::EventWriter>,
    plot_failed: bool,
}

impl Views {
    fn open(out: &Path, config_toml: &str) -> Self {
        let tb = trainer_viz::EventWriter::create(out, "worker").and_then(|mut w| {
            w.text(0, "config", &format!("```toml\n{config_toml}```"))?;
            w.flush()?;
            Ok(w)
        });
        let tb = tb.map_err(|e| tracing::warn!(error = %e, "TensorBoard events are off")).ok();
        Self { tb, plot_failed: false }
    }

    fn scalars(&mut self, step: u64, values: &[(&str, f64)]) {
        let Some(tb) = self.tb.as_mut() else { return };
        if let Err(e) = tb.scalars(step, values).and_then(|()| tb.flush()) {
            tracing::warn!(error = %e, "TensorBoard events are off");
            self.tb = None;
        }
    }

    fn plot(&mut self, out: &Path) {
        if self.plot_failed {
            return;
        }
        let result = trainer_viz::RunCurves::load(out)
            .and_then(|c| trainer_viz::plot_runs(&[c], &out.join(trainer_viz::curves::CURVES_FILE)));
        if let Err(e) = result {
            tracing::warn!(error = %e, "curves.png is off");
            self.plot_failed = true;
        }
    }
}

/// Running sums between two log lines.
#[derive(Debug, Default)]
struct StepWindow {
    loss_sum: f64,
    correct: usize,
    examples: usize,
    tokens: usize,
    seconds: f64,
}

impl StepWindow {
    fn add(&mut self, s: &crate::trainer::StepStats) {
        self.loss_sum += s.loss * s.examples as f64;
        self.correct += s.correct;
        self.examples += s.examples;
        self.tokens += s.tokens;
    }
    fn mean_loss(&self) -> f64 {
        self.loss_sum / self.examples.max(1) as f64
    }
    fn accuracy(&self) -> f64 {
        self.correct as f64 / self.examples.max(1) as f64
    }
    fn tokens_per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.tokens as f64 / self.seconds
        } else {
            0.0
        }
    }
}
