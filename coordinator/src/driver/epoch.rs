//! An epoch of steps: every rank trains on its shard of the epoch (from the resumed step),
//! then the coordinator checks that the replicas are still identical, sums what the ranks
//! report into the epoch's record, and decides early stopping.

use std::time::Instant;

use trainer_proto::v1::{coordinator_message, worker_message::Body, EpochDone, StartEpoch};

use super::{check_checksums, Driver};
use crate::eval::Eval;
use crate::run_dir::{checksum_hex, EpochRecord};

/// What every rank reported at the end of an epoch, in rank order.
pub(super) struct TrainedEpoch {
    done: Vec<EpochDone>,
    /// The coordinator's wall time for the epoch.
    seconds: f64,
}

impl Driver {
    /// Every rank trains epoch `epoch` (0-based) from `first_step`; the replicas must be
    /// identical after it.
    pub(super) async fn train_epoch(&mut self, epoch: u64, first_step: u64) -> anyhow::Result<TrainedEpoch> {
        self.progress.start_epoch(epoch);
        self.shared.telemetry.start_epoch(epoch, first_step);
        self.views.start_epoch();
        let started = Instant::now();
        self.broadcast(coordinator_message::Body::StartEpoch(StartEpoch { epoch, first_step })).await?;
        let all: Vec<usize> = (0..self.world()).collect();
        let done: Vec<EpochDone> = self
            .collect(&all, "the end of the epoch", |b| match b {
                Body::EpochDone(d) if d.epoch == epoch => Some(*d),
                _ => None,
            })
            .await?;
        let seconds = started.elapsed().as_secs_f64();
        let checksums: Vec<u64> = done.iter().map(|d| d.parameter_checksum).collect();
        check_checksums(&checksums, &format!("after epoch {}", epoch + 1))?;
        Ok(TrainedEpoch { done, seconds })
    }

    /// The coordinator's state after the epoch, which the checkpoint carries: the epoch's
    /// record (metrics.jsonl, TensorBoard, curves, progress), the totals and early stopping
    /// on validation accuracy. True when validation improved on the best so far.
    pub(super) fn record_epoch(
        &mut self,
        epoch: u64,
        trained: &TrainedEpoch,
        val: Option<Eval>,
    ) -> anyhow::Result<bool> {
        let data = std::sync::Arc::clone(&self.shared.data);
        let train = &data.config.train;
        let done = &trained.done;
        let seconds = trained.seconds;
        let checksums: Vec<u64> = done.iter().map(|d| d.parameter_checksum).collect();
        let loss_sum: f64 = done.iter().map(|d| d.loss_sum).sum();
        let samples: u64 = done.iter().map(|d| d.samples).sum();
        let epoch_tokens: u64 = done.iter().map(|d| d.tokens).sum();
        let (s, c) = done.iter().fold((0.0, 0.0), |(s, c), d| (s + d.seconds, c + d.comm_seconds));
        let record = EpochRecord {
            epoch: epoch as usize + 1,
            steps: done[0].steps,
            train_loss: if samples > 0 { loss_sum / samples as f64 } else { f64::NAN },
            train_samples: samples,
            train_tokens: epoch_tokens,
            epoch_seconds: seconds,
            tokens_per_second: epoch_tokens as f64 / seconds.max(1e-9),
            comm_share: if s > 0.0 { c / s } else { 0.0 },
            val_loss: val.as_ref().map(|v| v.mean_loss()),
            val_accuracy: val.as_ref().map(|v| v.accuracy()),
            parameter_checksum: checksum_hex(checksums[0]),
        };
        let st = &mut self.state;
        st.train_seconds += seconds;
        st.tokens += epoch_tokens;
        st.step_seconds += s;
        st.comm_seconds += c;
        st.checksums = checksums;
        // Early stopping on validation accuracy; the best model is kept.
        let mut improved = false;
        if let Some(v) = &val {
            let acc = v.accuracy();
            if st.best.is_none_or(|(b, _)| acc > b) {
                st.best = Some((acc, epoch as usize + 1));
                st.epochs_without_gain = 0;
                improved = true;
            } else {
                st.epochs_without_gain += 1;
                st.stopped_early = train.early_stopping_patience > 0
                    && st.epochs_without_gain >= train.early_stopping_patience;
            }
        }
        st.records.push(record.clone());
        self.run_dir.append_metrics(&record)?;
        self.views.epoch_end(&record);
        self.views.plot(self.world(), &self.backend);
        self.progress.line(&format!(
            "epoch {}/{}: train loss {:.4}, {:.0} tokens/s, comm {:.0}%{}",
            record.epoch,
            train.epochs,
            record.train_loss,
            record.tokens_per_second,
            100.0 * record.comm_share,
            val.map_or(String::new(), |v| format!(
                ", val loss {:.4}, val accuracy {:.4}",
                v.mean_loss(),
                v.accuracy()
            ))
        ));
        if self.state.stopped_early {
            self.progress.line(&format!(
                "early stopping: no validation gain for {} epochs",
                self.state.epochs_without_gain
            ));
        }
        Ok(improved)
    }
}
