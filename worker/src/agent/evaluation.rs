//! Evaluation on this rank: the coordinator names the split (validation or test), the
//! replica evaluates this rank's part of it, and the counts go up to be summed over ranks.

use anyhow::{anyhow, Context};
use trainer_core::EncodedSplit;
use trainer_proto::v1::{EvalResult, Split};

use super::Replica;

/// The split an Evaluate command names; anything but validation or test is a protocol error.
pub(super) fn split_to_evaluate(split: i32) -> anyhow::Result<Split> {
    Split::try_from(split)
        .ok()
        .filter(|s| matches!(s, Split::Validation | Split::Test))
        .ok_or_else(|| anyhow!("the coordinator asked to evaluate split {split}"))
}

/// Evaluates this rank's part (`data`) of `split` after epoch `epoch`.
pub(super) fn evaluate(
    replica: &mut dyn Replica,
    split: Split,
    epoch: u64,
    data: &EncodedSplit,
) -> anyhow::Result<EvalResult> {
    replica
        .evaluate(data)
        .map(|c| EvalResult {
            split: split as i32,
            epoch,
            correct: c.correct,
            total: c.total,
            loss_sum: c.loss_sum,
            confusion: c.confusion,
        })
        .with_context(|| format!("evaluation on {} failed", split.as_str_name()))
}
