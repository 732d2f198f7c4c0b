//! Deterministic selection of samples: the per-epoch shard plan across ranks, the seeded
//! validation hold-out, and label-balanced subsets for small runs.
//!
//! The shard plan is a pure function of (corpus size, world size, batch size, seed, epoch):
//! the samples are shuffled with a generator seeded by (seed, epoch), and that order is cut
//! into global batches of `world_size * batch_size` samples; rank `r` takes the `r`-th slice
//! of `batch_size` samples of every global batch. So step `i` of a `W`-rank run sees exactly
//! the samples of step `i` of a one-process run with batch `W * batch_size`, which is what
//! makes the two comparable (and DDP's guarantee). What does not fill a whole global batch
//! (fewer than `world_size * batch_size` samples) is dropped for that epoch; the shuffle
//! changes every epoch, so a different few are dropped each time and no sample is repeated.
//! Every rank therefore runs exactly the same number of steps,
//! and no collective can wait for a rank that ran out of data.
//!
//! With length bucketing ([`ShardPlan::for_epoch`] and `batch_order = "bucketed"`) the same
//! samples are grouped differently: pools of `bucket_pool` global batches are sorted by
//! length, cut into global batches, and the order of the global batches is shuffled. Each
//! global batch is still split across the ranks, so at every step all ranks hold reviews of
//! nearly the same length and finish their compute together instead of waiting for the
//! rank that drew the long reviews.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::config::{BatchOrder, TrainConfig};
use crate::encode::EncodedSplit;
use crate::error::{DataError, Result};

/// A generator for one purpose: distinct streams for (seed, epoch, purpose).
pub fn rng_for(seed: u64, epoch: u64, purpose: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ purpose);
    rng
}

const PURPOSE_SHARD: u64 = 1;
const PURPOSE_VAL: u64 = 2;
const PURPOSE_SUBSET: u64 = 3;
const PURPOSE_BATCHES: u64 = 4;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardPlan {
    pub world_size: usize,
    pub batch_size: usize,
    pub batches_per_rank: usize,
    /// Sample indices per rank, in the order the rank consumes them.
    ranks: Vec<Vec<u32>>,
    /// Samples left out this epoch (fewer than `world_size * batch_size`).
    pub dropped: Vec<u32>,
}

impl ShardPlan {
    pub fn new(
        corpus_size: usize,
        world_size: usize,
        batch_size: usize,
        seed: u64,
        epoch: u64,
    ) -> Result<Self> {
        if world_size == 0 || batch_size == 0 {
            return Err(DataError::Shard(format!(
                "world size ({world_size}) and batch size ({batch_size}) must be at least 1"
            )));
        }
        let per_step = world_size * batch_size;
        let batches_per_rank = corpus_size / per_step;
        if batches_per_rank == 0 {
            return Err(DataError::Shard(format!(
                "{corpus_size} training samples cannot give each of {world_size} ranks one batch of {batch_size}; \
                 use a smaller batch size or fewer workers"
            )));
        }
        let mut order: Vec<u32> = (0..corpus_size as u32).collect();
        order.shuffle(&mut rng_for(seed, epoch, PURPOSE_SHARD));
        let per_rank = batches_per_rank * batch_size;
        let mut ranks: Vec<Vec<u32>> = vec![Vec::with_capacity(per_rank); world_size];
        for global_batch in order.chunks_exact(per_step).take(batches_per_rank) {
            for (rank, slice) in global_batch.chunks_exact(batch_size).enumerate() {
                ranks[rank].extend_from_slice(slice);
            }
        }
        let dropped = order[per_rank * world_size..].to_vec();
        Ok(Self { world_size, batch_size, batches_per_rank, ranks, dropped })
    }

    pub fn rank(&self, rank: usize) -> &[u32] {
        &self.ranks[rank]
    }

    /// The plan for one epoch as the train config asks: random global batches, or
    /// length-bucketed ones (by the length after `max_len` truncation, 0 = none).
    pub fn for_epoch(
        split: &EncodedSplit,
        world_size: usize,
        train: &TrainConfig,
        max_len: usize,
        epoch: u64,
    ) -> Result<Self> {
        let plan = Self::new(split.len(), world_size, train.batch_size, train.seed, epoch)?;
        match train.batch_order {
            BatchOrder::Unsorted => Ok(plan),
            BatchOrder::Bucketed => {
                let length = |i: u32| {
                    let l = split.length(i as usize);
                    if max_len > 0 {
                        l.min(max_len)
                    } else {
                        l
                    }
                };
                Ok(plan.bucketed(length, train.bucket_pool, train.seed, epoch))
            }
        }
    }

    /// Regroups the same samples into length-bucketed global batches (module docs).
    fn bucketed(self, length: impl Fn(u32) -> usize, pool_batches: usize, seed: u64, epoch: u64) -> Self {
        let (world, batch) = (self.world_size, self.batch_size);
        let per_step = world * batch;
        // The samples in their global-batch order, as `new` laid them out.
        let mut order: Vec<u32> = Vec::with_capacity(self.batches_per_rank * per_step);
        for step in 0..self.batches_per_rank {
            for rank in 0..world {
                order.extend_from_slice(&self.ranks[rank][step * batch..(step + 1) * batch]);
            }
        }
        let mut global: Vec<&[u32]> = Vec::with_capacity(self.batches_per_rank);
        for pool in order.chunks_mut(per_step * pool_batches.max(1)) {
            pool.sort_by_key(|&i| std::cmp::Reverse(length(i)));
        }
        global.extend(order.chunks_exact(per_step));
        global.shuffle(&mut rng_for(seed, epoch, PURPOSE_BATCHES));
        let mut ranks: Vec<Vec<u32>> = vec![Vec::with_capacity(self.batches_per_rank * batch); world];
        // Strided within a (sorted) global batch, so every rank's longest review is as long as
        // the others' to within one neighbour.
        for global_batch in global {
            for (rank, samples) in ranks.iter_mut().enumerate() {
                samples.extend(global_batch.iter().skip(rank).step_by(world));
            }
        }
        Self { ranks, ..self }
    }

    /// A rank's batches for the epoch: its samples in plan order, `batch_size` at a time.
    pub fn rank_batches(&self, rank: usize) -> Vec<Vec<u32>> {
        self.ranks[rank].chunks(self.batch_size).map(<[u32]>::to_vec).collect()
    }
}

/// Splits `0..n` into (train, validation) indices, holding out `round(n * fraction)` samples
/// chosen by `seed`; both lists are sorted.
pub fn train_val_split(n: usize, fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rng_for(seed, 0, PURPOSE_VAL));
    let n_val = ((n as f64) * fraction).round() as usize;
    let (val, train) = order.split_at(n_val.min(n));
    let (mut train, mut val) = (train.to_vec(), val.to_vec());
    train.sort_unstable();
    val.sort_unstable();
    (train, val)
}

/// A seeded subset of `k` samples with both labels as equal as possible (sorted indices);
/// `k == 0` or `k >= labels.len()` keeps everything.
pub fn balanced_subset(labels: &[u8], k: usize, seed: u64) -> Vec<usize> {
    if k == 0 || k >= labels.len() {
        return (0..labels.len()).collect();
    }
    let mut rng = rng_for(seed, 0, PURPOSE_SUBSET);
    if labels.iter().any(|&l| l > 1) {
        return balanced_subset_of_many(labels, k, &mut rng);
    }
    let mut by_label: [Vec<usize>; 2] = [Vec::new(), Vec::new()];
    for (i, &l) in labels.iter().enumerate() {
        by_label[usize::from(l.min(1))].push(i);
    }
    for group in &mut by_label {
        group.shuffle(&mut rng);
    }
    let half = k / 2;
    let take_pos = (k - half).min(by_label[1].len());
    let take_neg = (k - take_pos).min(by_label[0].len());
    let take_pos = (k - take_neg).min(by_label[1].len());
    let mut out: Vec<usize> =
        by_label[0][..take_neg].iter().chain(&by_label[1][..take_pos]).copied().collect();
    out.sort_unstable();
    out
}

/// [`balanced_subset`] for more than two classes: `k / classes` of each (the first classes
/// take one more of the remainder), and what a small class cannot give is taken from the
/// others, in class order.
fn balanced_subset_of_many(labels: &[u8], k: usize, rng: &mut ChaCha8Rng) -> Vec<usize> {
    let classes = labels.iter().map(|&l| usize::from(l) + 1).max().unwrap_or(0);
    let mut by_label: Vec<Vec<usize>> = vec![Vec::new(); classes];
    for (i, &l) in labels.iter().enumerate() {
        by_label[usize::from(l)].push(i);
    }
    for group in &mut by_label {
        group.shuffle(rng);
    }
    let mut take: Vec<usize> =
        (0..classes).map(|c| (k / classes + usize::from(c < k % classes)).min(by_label[c].len())).collect();
    let mut left = k - take.iter().sum::<usize>();
    for c in 0..classes {
        let more = left.min(by_label[c].len() - take[c]);
        take[c] += more;
        left -= more;
    }
    let mut out: Vec<usize> = by_label.iter().zip(&take).flat_map(|(g, &n)| g[..n].iter().copied()).collect();
    out.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn subsets_of_many_classes_are_balanced() {
        let labels: Vec<u8> = (0..1000).map(|i| [0, 1, 2, 3, 3, 3][i % 6]).collect();
        let s = balanced_subset(&labels, 101, 3);
        assert_eq!(s.len(), 101);
        let count = |c: u8| s.iter().filter(|&&i| labels[i] == c).count();
        assert_eq!((count(0), count(1), count(2), count(3)), (26, 25, 25, 25));
        assert_eq!(s, balanced_subset(&labels, 101, 3));
        // A small class gives what it has; the others make up the rest.
        let labels: Vec<u8> = (0..100).map(|i| if i < 3 { 0 } else { 2 + (i % 2) as u8 }).collect();
        let s = balanced_subset(&labels, 30, 1);
        assert_eq!(s.len(), 30);
        assert_eq!(s.iter().filter(|&&i| labels[i] == 0).count(), 3);
    }
    use std::collections::HashSet;

    proptest! {
        #[test]
        fn shards_are_disjoint_equal_and_cover_all_but_a_remainder(
            n in 1usize..5000, world in 1usize..9, batch in 1usize..64, seed in any::<u64>(), epoch in 0u64..5
        ) {
            match ShardPlan::new(n, world, batch, seed, epoch) {
                Err(_) => prop_assert!(n < world * batch),
                Ok(plan) => {
                    let mut seen = HashSet::new();
                    for r in 0..world {
                        let shard = plan.rank(r);
                        // Equal batch counts: every rank has exactly batches_per_rank full batches.
                        prop_assert_eq!(shard.len(), plan.batches_per_rank * batch);
                        for &i in shard {
                            prop_assert!((i as usize) < n);
                            prop_assert!(seen.insert(i), "sample {} in two shards", i);
                        }
                    }
                    // Coverage: only fewer than world*batch samples are dropped, none repeated.
                    prop_assert!(plan.dropped.len() < world * batch);
                    for &i in &plan.dropped {
                        prop_assert!(seen.insert(i));
                    }
                    prop_assert_eq!(seen.len(), n);
                    // Pure: the same inputs give the same plan.
                    prop_assert_eq!(&plan, &ShardPlan::new(n, world, batch, seed, epoch).unwrap());
                }
            }
        }

        #[test]
        fn subsets_are_balanced_and_val_split_partitions(n in 2usize..3000, k in 1usize..3000, seed in any::<u64>()) {
            let labels: Vec<u8> = (0..n).map(|i| (i % 2) as u8).collect();
            let s = balanced_subset(&labels, k, seed);
            prop_assert_eq!(s.len(), k.min(n));
            let pos = s.iter().filter(|&&i| labels[i] == 1).count();
            prop_assert!(pos.abs_diff(s.len() - pos) <= 1);
            let (train, val) = train_val_split(n, 0.1, seed);
            prop_assert_eq!(train.len() + val.len(), n);
            let all: HashSet<usize> = train.iter().chain(&val).copied().collect();
            prop_assert_eq!(all.len(), n);
        }
    }

    #[test]
    fn step_i_of_w_ranks_is_step_i_of_one_rank_with_w_times_the_batch() {
        let (n, w, b) = (1000, 4, 8);
        let multi = ShardPlan::new(n, w, b, 3, 2).unwrap();
        let single = ShardPlan::new(n, 1, w * b, 3, 2).unwrap();
        assert_eq!(multi.batches_per_rank, single.batches_per_rank);
        for step in 0..multi.batches_per_rank {
            let mut union: Vec<u32> =
                (0..w).flat_map(|r| multi.rank(r)[step * b..(step + 1) * b].to_vec()).collect();
            let mut expected = single.rank(0)[step * w * b..(step + 1) * w * b].to_vec();
            union.sort_unstable();
            expected.sort_unstable();
            assert_eq!(union, expected, "step {step}");
        }
    }

    fn split_with_lengths(lengths: &[usize]) -> EncodedSplit {
        let mut s = EncodedSplit::default();
        for (i, &len) in lengths.iter().enumerate() {
            s.push(i as u32, (i % 2) as u8, 1, &vec![2; len]);
        }
        s
    }

    #[test]
    fn bucketing_balances_ranks_cuts_padding_and_keeps_every_sample_once() {
        let lengths: Vec<usize> = (0..2000).map(|i| (i * 7919) % 997 + 1).collect();
        let split = split_with_lengths(&lengths);
        let mut train = TrainConfig { batch_size: 10, bucket_pool: 20, seed: 5, ..TrainConfig::default() };
        let unsorted = ShardPlan::for_epoch(&split, 2, &train, 0, 1).unwrap();
        train.batch_order = BatchOrder::Bucketed;
        let bucketed = ShardPlan::for_epoch(&split, 2, &train, 0, 1).unwrap();
        let all = |p: &ShardPlan| {
            let mut v: Vec<u32> = (0..2).flat_map(|r| p.rank(r).to_vec()).collect();
            v.sort_unstable();
            v
        };
        assert_eq!(all(&unsorted), all(&bucketed), "the same samples, regrouped");
        assert_eq!(bucketed.rank_batches(0).len(), unsorted.batches_per_rank);
        // Padding inside batches and the length gap between ranks at each step both shrink.
        let cost = |p: &ShardPlan| {
            let (mut padding, mut imbalance) = (0usize, 0usize);
            let (b0, b1) = (p.rank_batches(0), p.rank_batches(1));
            for (x, y) in b0.iter().zip(&b1) {
                let longest = |b: &Vec<u32>| b.iter().map(|&i| lengths[i as usize]).max().unwrap_or(0);
                for b in [x, y] {
                    padding += b.iter().map(|&i| longest(b) - lengths[i as usize]).sum::<usize>();
                }
                imbalance += longest(x).abs_diff(longest(y));
            }
            (padding, imbalance)
        };
        let (pad_u, gap_u) = cost(&unsorted);
        let (pad_b, gap_b) = cost(&bucketed);
        assert!(pad_b * 10 < pad_u, "padding {pad_b} vs {pad_u}");
        assert!(gap_b * 10 < gap_u, "rank imbalance {gap_b} vs {gap_u}");
        // Step i on 2 ranks is step i of one rank with twice the batch, bucketed too.
        let single =
            ShardPlan::for_epoch(&split, 1, &TrainConfig { batch_size: 20, ..train.clone() }, 0, 1).unwrap();
        for (step, whole) in single.rank_batches(0).iter().enumerate() {
            let mut union =
                [bucketed.rank_batches(0)[step].clone(), bucketed.rank_batches(1)[step].clone()].concat();
            let mut whole = whole.clone();
            union.sort_unstable();
            whole.sort_unstable();
            assert_eq!(union, whole, "step {step}");
        }
        assert_ne!(bucketed, ShardPlan::for_epoch(&split, 2, &train, 0, 2).unwrap(), "reshuffled per epoch");
    }

    #[test]
    fn epochs_reshuffle_and_too_small_corpus_is_refused() {
        let a = ShardPlan::new(1000, 2, 10, 7, 0).unwrap();
        let b = ShardPlan::new(1000, 2, 10, 7, 1).unwrap();
        assert_ne!(a.rank(0), b.rank(0));
        assert_eq!(a.batches_per_rank, 50);
        let e = ShardPlan::new(10, 4, 3, 0, 0).unwrap_err().to_string();
        assert!(e.contains("cannot give each of 4 ranks"), "{e}");
    }
}
