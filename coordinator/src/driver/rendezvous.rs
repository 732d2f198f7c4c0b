//! The start of an attempt: every rank registers and opens its session, builds its replica
//! (restoring the checkpoint the attempt resumes from, then rank 0's broadcast), and reports
//! ready; the replicas must then be identical and hold the same best model.

use std::time::{Duration, Instant};

use anyhow::bail;
use trainer_proto::v1::worker_message::Body;

use super::sessions::DeadlinePassed;
use super::{check_checksums, Driver};
use crate::run_dir::checksum_hex;
use crate::telemetry::JobState;

impl Driver {
    pub(super) async fn wait_for_workers(&mut self) -> anyhow::Result<()> {
        let world = self.world();
        let timeout = if self.attempt == 0 { self.register_timeout } else { self.fault.rejoin_timeout };
        let flag = if self.attempt == 0 { "--register-timeout" } else { "--rejoin-timeout" };
        let deadline = Instant::now() + timeout;
        // External workers of an elastic job: once MIN are there, the group starts with those
        // that came within --rendezvous-wait (first attempt) or --rejoin-timeout (after a loss).
        let elastic = self.fault.is_elastic() && self.external_workers;
        let (elastic_wait, elastic_flag) = if self.attempt == 0 {
            (self.fault.rendezvous_wait, "--rendezvous-wait")
        } else {
            (timeout, "--rejoin-timeout")
        };
        let mut enough_since: Option<Instant> = None;
        self.shared.telemetry.set_state(JobState::Waiting);
        self.progress.status("waiting for workers");
        while self.registered < world || self.last_seen.iter().any(Option::is_none) {
            if elastic && self.registered >= self.fault.min_world && enough_since.is_none() {
                enough_since = Some(Instant::now());
            }
            // The first attempt waits --rendezvous-wait from when MIN were there; a later one
            // waits out --rejoin-timeout for the replacements.
            let elastic_deadline =
                enough_since
                    .map(|t| if self.attempt == 0 { (t + elastic_wait).min(deadline) } else { deadline });
            // Registrations arrive as events that `next` handles itself: look again every
            // quarter second whether MIN are there.
            let poll = elastic.then(|| Instant::now() + Duration::from_millis(250));
            let until =
                [Some(deadline), elastic_deadline, poll].into_iter().flatten().min().unwrap_or(deadline);
            let next = self
                .next(Some(until), &|d: &Self| {
                    let hint = if d.external_workers {
                        format!(
                            "; start them with `worker join` and {}=<this address>, {}=<the job secret>",
                            trainer_proto::COORDINATOR_ADDR_ENV,
                            trainer_proto::JOB_SECRET_ENV
                        )
                    } else {
                        String::new()
                    };
                    let opened = d.last_seen.iter().filter(|s| s.is_some()).count();
                    format!(
                        "only {} of {world} workers registered and {opened} opened their session \
                         within {:.0} s ({flag}){hint}",
                        d.registered,
                        timeout.as_secs_f64()
                    )
                })
                .await;
            let m = match next {
                Ok(m) => m,
                Err(e) if !e.is::<DeadlinePassed>() => return Err(e),
                // The wait for more is over: go on with the registered ones, in a group of
                // their number (they register again and get its world size).
                Err(_)
                    if elastic_deadline.is_some_and(|t| Instant::now() >= t) && self.registered < world =>
                {
                    let to = self.registered;
                    return Err(super::Resize {
                        at_start: self.attempt == 0 && self.checkpoint.is_none(),
                        to,
                        cause: format!(
                            "{to} of {world} workers registered within {:.0} s ({elastic_flag})",
                            elastic_wait.as_secs_f64()
                        ),
                    }
                    .into());
                }
                Err(e) if Instant::now() >= deadline => {
                    return Err(if elastic { self.fault.below_minimum(self.registered, e) } else { e });
                }
                Err(_) => continue,
            };
            self.pending.push_back(m);
        }
        self.progress.status("building replicas");
        let ready = self
            .collect(&(0..world).collect::<Vec<_>>(), "ready", |b| match b {
                Body::Ready(r) => Some(r.clone()),
                _ => None,
            })
            .await?;
        self.backend = ready[0].backend.clone();
        self.shared.telemetry.set_backend(&self.backend);
        // Every rank built the same model: a count that differs is another build or config,
        // named before any checksum is compared.
        let counts: Vec<u64> = ready.iter().map(|r| r.parameter_count).collect();
        if let Some(rank) = counts.iter().position(|&c| c != counts[0]) {
            bail!(
                "the replicas disagree on the model: rank 0 has {} parameters, rank {rank} has {} \
                 (workers of another build or config?)",
                counts[0],
                counts[rank]
            );
        }
        let checksums: Vec<u64> = ready.iter().map(|r| r.parameter_checksum).collect();
        // Every rank restored the same checkpoint, so the same best model.
        let held: Vec<Option<u64>> = ready.iter().map(|r| r.best_epoch).collect();
        if held.windows(2).any(|w| w[0] != w[1]) {
            bail!("the replicas restored best models of different epochs (0-based, in rank order): {held:?}");
        }
        self.best_held = held[0].map(|e| e as usize + 1);
        let when = if self.checkpoint.is_some() {
            "after restoring the checkpoint and the broadcast"
        } else {
            "after the initial broadcast"
        };
        check_checksums(&checksums, when)?;
        tracing::info!(
            world,
            backend = %self.backend,
            parameters = ready[0].parameter_count,
            checksum = %checksum_hex(checksums[0]),
            attempt = self.attempt,
            "all replicas ready"
        );
        Ok(())
    }
}
