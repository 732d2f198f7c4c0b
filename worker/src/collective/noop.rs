//! The single-process "collective": world size 1, every operation leaves the buffer as is.

use super::{Collective, CollectiveError};

#[derive(Debug, Default, Clone, Copy)]
pub struct NoopCollective;

impl Collective for NoopCollective {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn backend(&self) -> &'static str {
        "none"
    }
    fn all_reduce_mean(&mut self, _buffer: &mut tch::Tensor) -> Result<(), CollectiveError> {
        Ok(())
    }
    fn broadcast(&mut self, _buffer: &mut tch::Tensor, _root: usize) -> Result<(), CollectiveError> {
        Ok(())
    }
    fn barrier(&mut self) -> Result<(), CollectiveError> {
        Ok(())
    }
}
