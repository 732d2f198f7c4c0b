//! Evaluation and the kept model: validation after every epoch and the test at the end,
//! each summed over the ranks' parts of the split; the copy of the best model every rank
//! keeps (KeepBest) and switches to at the end (LoadBest).

use anyhow::bail;
use trainer_proto::v1::{coordinator_message, worker_message::Body, Evaluate, KeepBest, LoadBest, Split};

use super::{check_checksums, Driver};
use crate::eval::Eval;
use crate::run_dir::{checksum_hex, EvalRecord};
use crate::telemetry::JobState;

impl Driver {
    /// Validation after epoch `epoch` (0-based); None without a validation split.
    pub(super) async fn validate(&mut self, epoch: u64) -> anyhow::Result<Option<Eval>> {
        if self.shared.data.splits.val.is_empty() {
            return Ok(None);
        }
        self.progress.status(&format!("epoch {}: validating", epoch + 1));
        Ok(Some(self.evaluate(Split::Validation, epoch).await?))
    }

    /// Every rank evaluates its part of `split`; the counts summed.
    pub(super) async fn evaluate(&mut self, split: Split, epoch: u64) -> anyhow::Result<Eval> {
        self.shared.telemetry.set_state(JobState::Evaluating);
        self.broadcast(coordinator_message::Body::Evaluate(Evaluate { split: split as i32, epoch })).await?;
        let ranks: Vec<usize> = (0..self.world()).collect();
        let results = self
            .collect(&ranks, &format!("{} results", split.as_str_name()), |b| match b {
                Body::Eval(e) if e.split == split as i32 && e.epoch == epoch => Some(e.clone()),
                _ => None,
            })
            .await?;
        let mut eval = Eval::default();
        for e in &results {
            eval.add(e.correct, e.total, e.loss_sum, &e.confusion);
        }
        let name = if split == Split::Test { "test" } else { "validation" };
        self.shared.telemetry.eval(name, eval.accuracy(), eval.mean_loss());
        Ok(eval)
    }

    /// Every rank keeps a copy of its parameters as the best model (after `epoch`, 0-based);
    /// rank 0's checkpoints carry it from now on.
    pub(super) async fn keep_best(&mut self, epoch: u64) -> anyhow::Result<()> {
        self.broadcast(coordinator_message::Body::KeepBest(KeepBest { epoch })).await?;
        self.best_held = Some(epoch as usize + 1);
        Ok(())
    }

    /// The epoch (1-based) of the model to keep: the best by validation, when the replicas
    /// hold its copy. None (the last epoch's model is kept) without a validation split, or
    /// when the job resumed from a checkpoint written before best models were kept and no
    /// later epoch did better.
    pub(super) fn kept_best(&mut self) -> Option<usize> {
        let kept = kept_best(self.state.best, self.best_held);
        if let (Some((_, best)), None) = (self.state.best, kept) {
            self.progress.line(&format!(
                "the best model by validation (epoch {best}) was not kept: the checkpoint this job \
                 resumed from was written before best models were kept; keeping the last epoch's model"
            ));
        }
        kept
    }

    /// Every rank makes its copy of the best model (of `epoch`, 1-based) its parameters; they
    /// must be the parameters the ranks reported after that epoch.
    pub(super) async fn load_best(&mut self, epoch: usize) -> anyhow::Result<()> {
        self.progress.status(&format!("switching to the best model (epoch {epoch})"));
        let index = epoch.saturating_sub(1) as u64;
        self.broadcast(coordinator_message::Body::LoadBest(LoadBest { epoch: index })).await?;
        let ranks: Vec<usize> = (0..self.world()).collect();
        let checksums = self
            .collect(&ranks, "the best model loaded", |b| match b {
                Body::BestLoaded(l) if l.epoch == index => Some(l.parameter_checksum),
                _ => None,
            })
            .await?;
        check_checksums(&checksums, &format!("after switching to the best model (epoch {epoch})"))?;
        let reported =
            self.state.records.iter().find(|r| r.epoch == epoch).map(|r| r.parameter_checksum.clone());
        let loaded = checksum_hex(checksums[0]);
        if reported.as_deref() != Some(loaded.as_str()) {
            bail!(
                "the best model the ranks kept of epoch {epoch} has checksum {loaded}, but after that \
                 epoch they reported {}",
                reported.as_deref().unwrap_or("nothing")
            );
        }
        Ok(())
    }

    /// A test result in metrics.jsonl and TensorBoard: `model` is "last" or "best" (the kept
    /// model), as `worker train` writes them.
    pub(super) fn record_test(&mut self, model: &'static str, test: &Eval) -> anyhow::Result<()> {
        let epochs = self.state.records.len();
        self.views.test(epochs, model, test, &self.shared.data.classes);
        self.run_dir.append_metrics(&EvalRecord {
            kind: "eval",
            split: "test",
            model,
            epoch: epochs,
            accuracy: test.accuracy(),
            loss: test.mean_loss(),
            examples: test.total,
            train_seconds: self.state.train_seconds,
        })
    }
}

/// The epoch (1-based) of the model to keep: the best by validation (`best`: accuracy,
/// epoch) when the replicas hold a copy of it (`held`); None keeps the last epoch's model.
fn kept_best(best: Option<(f64, usize)>, held: Option<usize>) -> Option<usize> {
    best.map(|(_, epoch)| epoch).filter(|&epoch| held == Some(epoch))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_best_model_is_kept_when_the_replicas_hold_it() {
        assert_eq!(kept_best(Some((0.8, 3)), Some(3)), Some(3));
        // No validation split: the last epoch's model.
        assert_eq!(kept_best(None, None), None);
        // Resumed from a checkpoint without the best model's copy, and nothing better since.
        assert_eq!(kept_best(Some((0.8, 3)), None), None);
        assert_eq!(kept_best(Some((0.8, 3)), Some(2)), None);
    }
}
