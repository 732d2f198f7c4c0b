//! The worker: a tch replica of the LSTM classifier, its truncated-BPTT training step,
//! collectives, checkpoints, and the client side of the coordinator's protocol.

pub mod collective;
