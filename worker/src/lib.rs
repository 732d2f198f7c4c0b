//! The worker: a tch replica of the LSTM classifier, its truncated-BPTT training step,
//! collectives, checkpoints, and the single-process training run.
//!
//! - [`model`]: the classifier's parameters and shape.
//! - [`tbptt`]: the forward/backward pass over a batch in windows of K steps.
//! - [`optim`]: Adam, AdamW and SGD, the schedule, clipping.
//! - [`trainer`]: [`Trainer`], the replica: `train_step`, `evaluate`, `broadcast_parameters`,
//!   `parameter_checksum`; the collective point between backward and the optimizer step.
//! - [`checkpoint`]: checkpoints and exported models; [`tensor_file`]: their safetensors I/O.
//! - [`run`]: `worker train`, the single-process loop over the trainer's steps.
//! - [`agent`]: `worker join`, a rank of a distributed job, driven by the coordinator.
//! - [`collective`]: the all-reduce and broadcast between ranks (TCP ring, NCCL).
//! - [`predict`]: `worker predict`.
//! - [`device`]: `auto|cpu|cuda|cuda:N`, with the CUDA library loaded by hand.
//! - [`profile`]: `--profile-steps`, where a training step's time goes.

pub mod agent;
pub mod bench;
pub mod checkpoint;
pub mod collective;
pub mod device;
pub mod error;
pub mod eval_counts;
pub mod model;
pub mod optim;
#[cfg(test)]
mod parser_properties;
pub mod predict;
pub mod profile;
pub mod run;
pub mod tbptt;
pub mod tensor_file;
pub mod trainer;

pub use error::{Result, WorkerError};
pub use trainer::{EvalCounts, StepStats, Trainer};
