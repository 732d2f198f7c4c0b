//! Evaluation counts: what a rank (or `worker train`) sums over a split, including the
//! confusion matrix that class metrics are computed from.

use tch::{Device, Kind, Tensor};

use crate::error::Result;

/// Evaluation results as sums, so that ranks can add theirs up.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EvalCounts {
    pub correct: u64,
    pub total: u64,
    /// Sum of per-review cross-entropy.
    pub loss_sum: f64,
    /// Row-major `classes x classes` counts, `[true][predicted]`; empty when not counted.
    pub confusion: Vec<u64>,
}

impl EvalCounts {
    pub fn accuracy(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.correct as f64 / self.total as f64
        }
    }

    pub fn mean_loss(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.loss_sum / self.total as f64
        }
    }

    pub fn add(&mut self, other: &EvalCounts) {
        self.correct += other.correct;
        self.total += other.total;
        self.loss_sum += other.loss_sum;
        if self.confusion.is_empty() {
            self.confusion = other.confusion.clone();
        } else if self.confusion.len() == other.confusion.len() {
            for (a, b) in self.confusion.iter_mut().zip(&other.confusion) {
                *a += b;
            }
        }
    }
}

/// The batch's `classes x classes` confusion counts, `[true][predicted]`, in one host read.
pub(crate) fn confusion_of(logits: &Tensor, labels: &Tensor, classes: usize) -> Result<Vec<u64>> {
    let predicted = logits.f_argmax(1, false)?;
    let both = Tensor::f_stack(&[labels.f_to_kind(Kind::Int64)?, predicted], 0)?.f_to_device(Device::Cpu)?;
    let both = Vec::<i64>::try_from(&both.f_flatten(0, -1)?)?;
    let (truth, predicted) = both.split_at(both.len() / 2);
    let mut confusion = vec![0u64; classes * classes];
    for (&t, &p) in truth.iter().zip(predicted) {
        trainer_core::class_metrics::count(&mut confusion, classes, t as usize, p as usize);
    }
    Ok(confusion)
}
