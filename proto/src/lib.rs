//! Generated tonic code for trainer.v1 (to be written).
