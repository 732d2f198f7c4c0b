//! The end of the job: the last epoch's model is tested and exported
//! (model-last.safetensors), then the kept one (model.safetensors: the best by validation,
//! to which every rank switches); the workers are stopped and summary.json is written.

use std::sync::Arc;

use trainer_proto::v1::{coordinator_message, ArtifactKind, Split, Stop};

use super::sessions::command;
use super::{Driver, Outcome};
use crate::run_dir::{checksum_hex, EpochRecord, Summary};
use crate::telemetry::JobState;

impl Driver {
    /// Tests and exports both models, stops the workers and writes the summary.
    pub(super) async fn finish(&mut self) -> anyhow::Result<Outcome> {
        let data = Arc::clone(&self.shared.data);
        let world = self.world();
        let epochs = self.state.records.len();
        let last_epoch = epochs.saturating_sub(1) as u64;
        let (kept_model, kept_epoch) = match self.kept_best() {
            Some(best) => ("best", best),
            None => ("last", epochs),
        };
        // 1. The last epoch's model: tested, and exported as model-last.safetensors.
        self.progress.status("testing the last epoch's model");
        let last_test = self.evaluate(Split::Test, last_epoch).await?;
        self.record_test("last", &last_test)?;
        self.progress.status("exporting the last epoch's model");
        self.export(ArtifactKind::LastModel, last_epoch).await?;
        // 2. The kept model, exported as model.safetensors: when it is another epoch's, every
        //    rank switches to its copy, and it is tested too.
        let test = if kept_epoch == epochs {
            last_test.clone()
        } else {
            self.load_best(kept_epoch).await?;
            self.progress.status(&format!("testing the best model (epoch {kept_epoch})"));
            self.evaluate(Split::Test, kept_epoch.saturating_sub(1) as u64).await?
        };
        self.record_test("best", &test)?;
        self.progress.status("exporting the model");
        self.export(ArtifactKind::Model, kept_epoch.saturating_sub(1) as u64).await?;
        self.finished = true;
        for rank in 0..world {
            self.shared.try_send(
                rank,
                command(coordinator_message::Body::Stop(Stop {
                    success: true,
                    reason: "training finished".to_string(),
                    restart: false,
                })),
            );
        }
        self.progress.finish();
        let st = &self.state;
        let summary = Summary {
            test_accuracy: test.accuracy(),
            test_loss: test.mean_loss(),
            kept_model: kept_model.to_string(),
            kept_epoch,
            last_epoch_test_accuracy: last_test.accuracy(),
            last_epoch_test_loss: last_test.mean_loss(),
            best_val_accuracy: st.best.map(|b| b.0),
            best_epoch: st.best.map(|b| b.1),
            epochs: st.records.len(),
            stopped_early: st.stopped_early,
            train_seconds: st.train_seconds,
            tokens_per_second: st.tokens as f64 / st.train_seconds.max(1e-9),
            comm_share: if st.step_seconds > 0.0 { st.comm_seconds / st.step_seconds } else { 0.0 },
            world_size: world,
            backend: self.backend.clone(),
            replica_checksums: st.checksums.iter().map(|&c| checksum_hex(c)).collect(),
            train_samples: data.splits.train.len(),
            val_samples: data.splits.val.len(),
            test_samples: data.splits.test.len(),
            vocab_size: data.vocab_size,
            restarts: st.restarts,
            steps_lost: st.steps_lost,
            resizes: st.resizes,
            world_sizes: st.world_sizes.clone(),
            final_parameter_checksum: st.checksums.first().map(|&c| checksum_hex(c)).unwrap_or_default(),
            test_metrics: test.class_metrics(&data.classes),
            classes: data.classes.clone(),
        };
        if let Some(metrics) = &summary.test_metrics {
            self.views.confusion(
                &metrics.per_class.iter().map(|s| s.class.clone()).collect::<Vec<_>>(),
                &metrics.confusion,
            );
        }
        self.run_dir.write_summary(&summary)?;
        self.views.plot(world, &self.backend);
        self.shared.telemetry.set_state(JobState::Finished);
        Ok(Outcome { summary })
    }
}

/// The one-screen summary printed at the end.
pub fn render_summary(summary: &Summary, records: &[EpochRecord], run_dir: &std::path::Path) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\nTraining finished: {} workers ({}), {} epochs{} in {:.1} s",
        summary.world_size,
        summary.backend,
        summary.epochs,
        if summary.stopped_early { " (stopped early)" } else { "" },
        summary.train_seconds
    );
    let _ = writeln!(
        s,
        "  data: {} train / {} validation / {} test reviews, vocabulary {}",
        summary.train_samples, summary.val_samples, summary.test_samples, summary.vocab_size
    );
    let _ = writeln!(
        s,
        "  throughput: {:.0} tokens/s, communication {:.1}% of step time",
        summary.tokens_per_second,
        100.0 * summary.comm_share
    );
    let _ = writeln!(s, "  epoch  train loss  val loss  val acc   tokens/s  seconds");
    for r in records {
        let _ = writeln!(
            s,
            "  {:>5}  {:>10.4}  {:>8}  {:>7}  {:>9.0}  {:>7.1}",
            r.epoch,
            r.train_loss,
            r.val_loss.map_or("-".to_string(), |v| format!("{v:.4}")),
            r.val_accuracy.map_or("-".to_string(), |v| format!("{v:.4}")),
            r.tokens_per_second,
            r.epoch_seconds
        );
    }
    if let Some(best) = summary.best_val_accuracy {
        let _ =
            writeln!(s, "  best validation accuracy: {best:.4} (epoch {})", summary.best_epoch.unwrap_or(0));
    }
    let kept = if summary.kept_model == "best" { "the best by validation" } else { "the last epoch's" };
    let _ = writeln!(
        s,
        "  test accuracy: {:.4} (loss {:.4}, {} reviews) with the kept model, {kept} (epoch {}): {}",
        summary.test_accuracy,
        summary.test_loss,
        summary.test_samples,
        summary.kept_epoch,
        crate::run_dir::MODEL_FILE
    );
    let last = if summary.kept_epoch == summary.epochs {
        "the same model".to_string()
    } else {
        format!(
            "test accuracy {:.4} (loss {:.4})",
            summary.last_epoch_test_accuracy, summary.last_epoch_test_loss
        )
    };
    let _ = writeln!(
        s,
        "  last epoch's model (epoch {}): {last}: {}",
        summary.epochs,
        crate::run_dir::LAST_MODEL_FILE
    );
    let _ = writeln!(
        s,
        "  replica checksums: {} ({})",
        summary.replica_checksums.first().map_or("-", String::as_str),
        if summary.replica_checksums.windows(2).all(|w| w[0] == w[1]) { "all ranks equal" } else { "DIFFER" }
    );
    if let Some(metrics) = summary.test_metrics.as_ref().filter(|_| summary.classes.len() > 2) {
        let _ = writeln!(s, "  the kept model on the test split, by class:");
        for line in metrics.render().lines() {
            let _ = writeln!(s, "    {line}");
        }
    }
    let _ = writeln!(s, "  run folder: {}", run_dir.display());
    s
}
