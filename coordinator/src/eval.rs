//! An evaluation's counts, summed over the ranks' parts of a split.

#[derive(Debug, Clone, Default)]
pub struct Eval {
    pub correct: u64,
    pub total: u64,
    pub loss_sum: f64,
    /// Row-major `classes x classes` counts, `[true][predicted]` (empty if a rank sent none).
    pub confusion: Vec<u64>,
}

impl Eval {
    /// Adds a rank's counts.
    pub fn add(&mut self, correct: u64, total: u64, loss_sum: f64, confusion: &[u64]) {
        self.correct += correct;
        self.total += total;
        self.loss_sum += loss_sum;
        if self.confusion.is_empty() && self.total == total {
            self.confusion = confusion.to_vec();
        } else if self.confusion.len() == confusion.len() {
            for (a, b) in self.confusion.iter_mut().zip(confusion) {
                *a += b;
            }
        } else {
            self.confusion.clear();
        }
    }

    /// Accuracy, macro-F1, per-class scores and the confusion matrix, when counted.
    pub fn class_metrics(&self, classes: &[String]) -> Option<trainer_core::class_metrics::ClassMetrics> {
        trainer_core::class_metrics::ClassMetrics::from_confusion(classes, &self.confusion)
    }

    pub fn accuracy(&self) -> f64 {
        if self.total == 0 {
            f64::NAN
        } else {
            self.correct as f64 / self.total as f64
        }
    }
    pub fn mean_loss(&self) -> f64 {
        if self.total == 0 {
            f64::NAN
        } else {
            self.loss_sum / self.total as f64
        }
    }
}
