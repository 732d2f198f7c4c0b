//! `Trainer::train_step` and the global batch (`train.global_batch_size`): a rank trains only
//! on its own share of each global batch, because its gradient's weight assumes that every
//! other rank holds its share too. A batch of another size is refused before any collective
//! call and before the optimizer, so the replica is left as it was.
//!
//! With one rank there is nothing to share (the step never checks), so these tests give the
//! trainer a collective that says it is one rank of two and leaves every buffer as it is: as
//! if the other rank had sent the same gradient.

use tch::Device;
use trainer_core::batch::Batch;
use trainer_core::JobConfig;
use worker::collective::{Collective, CollectiveError};
use worker::predict::batch_of;
use worker::{Trainer, WorkerError};

/// Rank `rank` of `world`, alone: every reduce and broadcast leaves the buffer as is.
struct LoneRank {
    rank: usize,
    world: usize,
}

impl Collective for LoneRank {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn backend(&self) -> &'static str {
        "lone"
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

const VOCAB: usize = 30;

/// A small job with global batches of `global` samples (per-rank `batch_size` 4).
fn config(global: usize) -> JobConfig {
    let text = format!(
        "[model]\nembed_dim = 8\nhidden = 8\nlayers = 1\ndropout = 0.0\n\n\
         [train]\nbatch_size = 4\nglobal_batch_size = {global}\nlr = 0.01\nseed = 11\ndevice = \"cpu\"\nthreads = 1\n"
    );
    JobConfig::from_toml_str(&text, std::path::Path::new("share.toml")).expect("a valid job")
}

fn trainer(global: usize, rank: usize, world: usize) -> Trainer {
    tch::set_num_threads(1);
    let mut t = Trainer::new(&config(global), VOCAB, Device::Cpu, Box::new(LoneRank { rank, world }))
        .expect("a trainer");
    t.set_total_steps(10);
    t
}

/// `n` reviews of 3 to 8 ids, labels alternating.
fn batch(n: usize) -> Batch {
    let rows: Vec<Vec<u32>> = (0..n)
        .map(|r| (0..3 + r % 6).map(|t| 2 + ((r * 13 + t * 7) % (VOCAB - 2)) as u32).collect())
        .collect();
    let mut b = batch_of(&rows);
    b.labels = (0..n as i64).map(|i| i % 2).collect();
    b
}

/// The step is refused with the message that names the batch, the rank and its share, and
/// the replica is left untouched (no optimizer step, the step counter unchanged).
fn assert_refused(t: &mut Trainer, examples: usize, expected: &str) {
    let before = t.parameter_checksum().unwrap();
    let step = t.global_step();
    match t.train_step(&batch(examples)) {
        Err(WorkerError::Invalid(message)) => assert_eq!(message, expected),
        Err(other) => panic!("a batch of {examples}: refused as another error: {other}"),
        Ok(stats) => panic!("a batch of {examples} was trained on ({stats:?}); expected: {expected}"),
    }
    assert_eq!(t.global_step(), step, "a refused batch counted as a step");
    assert_eq!(t.parameter_checksum().unwrap(), before, "a refused batch changed the parameters");
}

#[test]
fn a_batch_that_is_not_this_ranks_share_of_the_global_batch_is_refused() {
    // 15 over 2 ranks: rank 0 holds 8 and rank 1 holds 7.
    let mut rank1 = trainer(15, 1, 2);
    assert_refused(
        &mut rank1,
        8,
        "a batch of 8 samples, but rank 1's share of the global batch of 15 over 2 ranks is 7",
    );
    // Its own per-rank batch_size (4) is not its share either: the global batch decides.
    assert_refused(
        &mut rank1,
        4,
        "a batch of 4 samples, but rank 1's share of the global batch of 15 over 2 ranks is 7",
    );
    let mut rank0 = trainer(15, 0, 2);
    assert_refused(
        &mut rank0,
        7,
        "a batch of 7 samples, but rank 0's share of the global batch of 15 over 2 ranks is 8",
    );
}

#[test]
fn a_batch_of_this_ranks_share_is_trained_on() {
    for (rank, share) in [(0, 8), (1, 7)] {
        let mut t = trainer(15, rank, 2);
        let before = t.parameter_checksum().unwrap();
        let stats = t.train_step(&batch(share)).unwrap_or_else(|e| panic!("rank {rank}, {share}: {e}"));
        assert_eq!(stats.examples, share);
        assert_eq!(t.global_step(), 1);
        assert_ne!(t.parameter_checksum().unwrap(), before, "rank {rank}: no optimizer step");
        // The next global batch's share after a refused one still trains: nothing was left
        // half-done.
        let expected = format!(
            "a batch of {} samples, but rank {rank}'s share of the global batch of 15 over 2 ranks is {share}",
            share + 1
        );
        assert_refused(&mut t, share + 1, &expected);
        t.train_step(&batch(share)).unwrap_or_else(|e| panic!("rank {rank} after a refusal: {e}"));
        assert_eq!(t.global_step(), 2);
    }
}

/// An even global batch (16 over 2): a rank's share is half of it, not its `batch_size`.
#[test]
fn with_equal_shares_only_half_the_global_batch_is_accepted() {
    let mut t = trainer(16, 1, 2);
    assert_refused(
        &mut t,
        4,
        "a batch of 4 samples, but rank 1's share of the global batch of 16 over 2 ranks is 8",
    );
    t.train_step(&batch(8)).expect("a batch of its share");
}
