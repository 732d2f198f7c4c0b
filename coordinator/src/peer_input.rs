//! What a worker may send: the checks that the gRPC handlers (`service.rs`) run on every
//! request and session message before anything else looks at it. A worker holds the job
//! secret, but a broken or outdated one can still send anything; each check names the field,
//! its value and what is allowed, so the error it gets back (or the reason its session is
//! closed with) says what was wrong. Numbers are bounded by the job, so that what the driver,
//! the metrics and the progress views add up cannot overflow.

use std::net::IpAddr;

use tonic::Status;
use trainer_proto::v1::{worker_message::Body, ArtifactKind, RegisterRequest, Split};
use trainer_proto::PROTOCOL_VERSION;

use crate::job::JobData;

/// Longest host name, build version or ring address accepted.
pub const MAX_TEXT_FIELD: usize = 256;
/// Devices a registration may list.
pub const MAX_DEVICES: usize = 64;
/// Largest artifact an upload may declare.
pub const MAX_ARTIFACT_BYTES: u64 = 64 * 1024 * 1024 * 1024;
pub use trainer_proto::{cut_error_message as cut_message, truncate};

pub fn check_register(req: &RegisterRequest) -> Result<(), Status> {
    if req.protocol_version == 0 {
        return Err(Status::invalid_argument(format!(
            "protocol_version is missing (0); this coordinator speaks protocol version \
             {PROTOCOL_VERSION}"
        )));
    }
    if req.protocol_version != PROTOCOL_VERSION {
        return Err(Status::failed_precondition(format!(
            "protocol version mismatch: the worker speaks protocol version {} (build {:?}), \
             this coordinator speaks protocol version {PROTOCOL_VERSION} (build {}); \
             run workers and coordinator from the same release",
            req.protocol_version,
            truncate(&req.build_version, 64),
            env!("CARGO_PKG_VERSION"),
        )));
    }
    for (name, value) in [("hostname", &req.hostname), ("build_version", &req.build_version)] {
        if value.len() > MAX_TEXT_FIELD {
            return Err(Status::invalid_argument(format!(
                "{name} is {} bytes long; at most {MAX_TEXT_FIELD} allowed",
                value.len()
            )));
        }
    }
    if req.hostname.is_empty() {
        return Err(Status::invalid_argument("hostname is empty"));
    }
    if req.pid == 0 {
        return Err(Status::invalid_argument("pid is missing (0)"));
    }
    if req.devices.len() > MAX_DEVICES {
        return Err(Status::invalid_argument(format!(
            "{} devices listed; at most {MAX_DEVICES} allowed",
            req.devices.len()
        )));
    }
    Ok(())
}

/// A ring address other ranks can dial: `host:port` with a port of 1 to 65535 and a host
/// that is an IP address (IPv6 with or without brackets) or a DNS name.
pub fn check_ring_address(address: &str) -> Result<(), Status> {
    let bad = |why: &str| {
        Status::invalid_argument(format!(
            "ring_address must be host:port, got {:?}: {why}",
            truncate(address, 64)
        ))
    };
    if address.len() > MAX_TEXT_FIELD {
        return Err(bad(&format!("{} bytes long; at most {MAX_TEXT_FIELD} allowed", address.len())));
    }
    let (host, port) = address.rsplit_once(':').ok_or_else(|| bad("no ':' before the port"))?;
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => return Err(bad("the port must be a number from 1 to 65535")),
    }
    let bracketed = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
    let is_ip = |h: &str| h.parse::<IpAddr>().is_ok();
    let is_name = |h: &str| {
        !h.is_empty() && h.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    };
    let ok = match bracketed {
        Some(inner) => inner.parse::<std::net::Ipv6Addr>().is_ok(),
        None => is_ip(host) || is_name(host),
    };
    if !ok {
        return Err(bad("the host must be an IP address or a DNS name"));
    }
    Ok(())
}

/// What the job allows in a session message from one rank.
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    pub epochs: u64,
    pub steps_per_epoch: u64,
    pub batch_size: u64,
    /// Tokens of the whole train split: no step or epoch of one rank processes more.
    pub train_tokens: u64,
    /// Reviews of this rank's validation and test shards.
    pub validation_reviews: u64,
    pub test_reviews: u64,
    /// The model's classes: an evaluation's confusion matrix is classes x classes.
    pub classes: u64,
}

impl SessionLimits {
    pub fn new(data: &JobData, rank: usize, world: usize) -> Self {
        let shard = |n: usize| crate::job::eval_shard(n, world, rank).len() as u64;
        Self {
            epochs: data.config.train.epochs as u64,
            steps_per_epoch: data.steps_per_epoch as u64,
            batch_size: trainer_core::shard::share(data.config.train.global_batch(world), world, 0) as u64,
            train_tokens: data.splits.train.tokens.len() as u64,
            validation_reviews: shard(data.splits.val.len()),
            test_reviews: shard(data.splits.test.len()),
            classes: data.config.model.num_classes as u64,
        }
    }
}

/// `field` must be at most `max`.
fn at_most(field: &str, value: u64, max: u64) -> Result<(), String> {
    if value > max {
        return Err(format!("{field} = {value} is out of range (at most {max} in this job)"));
    }
    Ok(())
}

/// An epoch index of this job.
fn epoch(field: &str, value: u64, limits: &SessionLimits) -> Result<(), String> {
    if value >= limits.epochs {
        return Err(format!(
            "{field} = {value} is out of range (this job has epochs 0 to {})",
            limits.epochs - 1
        ));
    }
    Ok(())
}

/// Checks a session message against the job; `Err` is why the session is closed. A
/// worker's error text (an error, a storage failure) longer than [`trainer_proto::MAX_ERROR_MESSAGE`] is
/// cut, not refused.
pub fn check_session_body(body: &mut Body, limits: &SessionLimits) -> Result<(), String> {
    let l = limits;
    match body {
        Body::Hello(_) | Body::Heartbeat(_) => Ok(()),
        Body::Ready(r) => {
            at_most("ready.backend length", r.backend.len() as u64, MAX_TEXT_FIELD as u64)?;
            r.best_epoch.map_or(Ok(()), |e| epoch("ready.best_epoch", e, l))
        }
        Body::Step(m) => {
            epoch("step.epoch", m.epoch, l)?;
            at_most("step.step", m.step, l.steps_per_epoch.saturating_sub(1))?;
            at_most("step.samples", m.samples, l.batch_size)?;
            at_most("step.correct", m.correct, m.samples)?;
            at_most("step.tokens", m.tokens, l.train_tokens)
        }
        Body::EpochDone(d) => {
            epoch("epoch_done.epoch", d.epoch, l)?;
            at_most("epoch_done.steps", d.steps, l.steps_per_epoch)?;
            at_most("epoch_done.samples", d.samples, l.steps_per_epoch.saturating_mul(l.batch_size))?;
            at_most("epoch_done.tokens", d.tokens, l.train_tokens)
        }
        Body::Eval(e) => {
            let shard = match Split::try_from(e.split) {
                Ok(Split::Validation) => l.validation_reviews,
                Ok(Split::Test) => l.test_reviews,
                _ => return Err(format!("eval.split = {} is not validation or test", e.split)),
            };
            epoch("eval.epoch", e.epoch, l)?;
            at_most("eval.total", e.total, shard)?;
            at_most("eval.correct", e.correct, e.total)?;
            let cells = l.classes.saturating_mul(l.classes);
            if !e.confusion.is_empty() && e.confusion.len() as u64 != cells {
                return Err(format!(
                    "eval.confusion has {} counts; this job's {} classes make {cells}",
                    e.confusion.len(),
                    l.classes
                ));
            }
            let counted = e.confusion.iter().try_fold(0u64, |a, &b| a.checked_add(b));
            if !e.confusion.is_empty() && counted != Some(e.total) {
                return Err(format!("eval.confusion counts {counted:?} reviews, eval.total = {}", e.total));
            }
            Ok(())
        }
        Body::ArtifactDone(a) => {
            match ArtifactKind::try_from(a.kind) {
                Ok(ArtifactKind::Model | ArtifactKind::LastModel | ArtifactKind::Checkpoint) => {}
                _ => return Err(format!("artifact_done.kind = {} is not an artifact kind", a.kind)),
            }
            epoch("artifact_done.epoch", a.epoch, l)?;
            at_most("artifact_done.step_in_epoch", a.step_in_epoch, l.steps_per_epoch)?;
            at_most("artifact_done.global_step", a.global_step, l.epochs.saturating_mul(l.steps_per_epoch))?;
            at_most("artifact_done.bytes", a.bytes, MAX_ARTIFACT_BYTES)?;
            cut_message(&mut a.storage_error);
            Ok(())
        }
        Body::BestLoaded(b) => epoch("best_loaded.epoch", b.epoch, l),
        Body::Error(e) => {
            cut_message(&mut e.message);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trainer_proto::v1::{ArtifactDone, EvalResult, StepMetrics, WorkerError};
    use trainer_proto::MAX_ERROR_MESSAGE;

    const LIMITS: SessionLimits = SessionLimits {
        epochs: 3,
        steps_per_epoch: 10,
        batch_size: 4,
        train_tokens: 1000,
        validation_reviews: 5,
        test_reviews: 7,
        classes: 2,
    };

    #[test]
    fn ring_addresses_must_be_dialable() {
        for good in ["127.0.0.1:7000", "pod-1.svc.cluster.local:29500", "[::1]:7000", "::1:7000", "h_1:1"] {
            assert!(check_ring_address(good).is_ok(), "{good}");
        }
        for (bad, why) in [
            ("127.0.0.1", "port"),
            ("127.0.0.1:0", "port"),
            ("127.0.0.1:65536", "port"),
            (":7000", "host"),
            ("a b:7000", "host"),
            ("[::1:7000", "host"),
            ("[not-ip]:7000", "host"),
            ("host\n:7000", "host"),
        ] {
            let e = check_ring_address(bad).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().contains(why), "{bad}: {}", e.message());
        }
        let long = format!("{}:1", "h".repeat(300));
        assert!(check_ring_address(&long).unwrap_err().message().contains("at most 256"));
    }

    #[test]
    fn session_numbers_outside_the_job_are_refused_naming_the_field() {
        let step = |m: StepMetrics| check_session_body(&mut Body::Step(m), &LIMITS);
        let ok =
            StepMetrics { epoch: 2, step: 9, samples: 4, correct: 4, tokens: 1000, ..Default::default() };
        assert_eq!(step(ok), Ok(()));
        let e = step(StepMetrics { epoch: u64::MAX, ..ok }).unwrap_err();
        assert!(e.contains("step.epoch = 18446744073709551615") && e.contains("epochs 0 to 2"), "{e}");
        assert!(step(StepMetrics { step: 10, ..ok }).unwrap_err().contains("step.step = 10"));
        assert!(step(StepMetrics { samples: 5, ..ok }).unwrap_err().contains("step.samples"));
        assert!(step(StepMetrics { correct: 5, samples: 4, ..ok }).unwrap_err().contains("step.correct"));
        assert!(step(StepMetrics { tokens: u64::MAX, ..ok }).unwrap_err().contains("step.tokens"));

        let eval = |e: EvalResult| check_session_body(&mut Body::Eval(e), &LIMITS);
        let ok = EvalResult {
            split: Split::Test as i32,
            epoch: 0,
            correct: 7,
            total: 7,
            loss_sum: 1.0,
            confusion: vec![3, 0, 0, 4],
        };
        assert_eq!(eval(ok.clone()), Ok(()));
        assert!(eval(EvalResult { total: 8, ..ok.clone() }).unwrap_err().contains("eval.total = 8"));
        assert!(eval(EvalResult { split: 0, ..ok.clone() }).unwrap_err().contains("eval.split = 0"));
        assert!(eval(EvalResult { split: Split::Train as i32, ..ok.clone() }).is_err());
        assert!(eval(EvalResult { confusion: vec![7, 0, 0], ..ok.clone() })
            .unwrap_err()
            .contains("eval.confusion"));
        assert!(eval(EvalResult { confusion: vec![1, 0, 0, 4], ..ok })
            .unwrap_err()
            .contains("eval.confusion"));

        let done = |a: ArtifactDone| check_session_body(&mut Body::ArtifactDone(a), &LIMITS);
        let ok = ArtifactDone {
            kind: ArtifactKind::Checkpoint as i32,
            epoch: 2,
            global_step: 30,
            ..Default::default()
        };
        assert_eq!(done(ok.clone()), Ok(()));
        assert!(done(ArtifactDone { global_step: 31, ..ok.clone() })
            .unwrap_err()
            .contains("global_step = 31"));
        assert!(done(ArtifactDone { kind: 9, ..ok }).unwrap_err().contains("kind = 9"));
    }

    #[test]
    fn a_long_worker_error_is_cut_not_refused() {
        let mut body = Body::Error(WorkerError { message: "é".repeat(MAX_ERROR_MESSAGE) });
        assert_eq!(check_session_body(&mut body, &LIMITS), Ok(()));
        let Body::Error(e) = body else { unreachable!() };
        assert!(e.message.len() < MAX_ERROR_MESSAGE + 64, "{}", e.message.len());
        assert!(
            e.message.ends_with(&format!("[... {} more bytes cut]", MAX_ERROR_MESSAGE)),
            "{}",
            &e.message[e.message.len() - 40..]
        );
    }
}
