//! An evaluation's counts, summed over the ranks' parts of a split.

#[derive(Debug, Clone, Copy)]
pub struct Eval {
    pub correct: u64,
    pub total: u64,
    pub loss_sum: f64,
}

impl Eval {
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
