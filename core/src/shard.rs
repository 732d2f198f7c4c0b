//! Deterministic selection of samples: the per-epoch shard plan across ranks, the seeded
//! validation hold-out, and label-balanced subsets for small runs.
//!
//! The shard plan is a pure function of (corpus size, global batch, seed, epoch) in *what*
//! each optimizer step sees, and of the world size only in *who* holds it: the samples are
//! shuffled with a generator seeded by (seed, epoch), and that order is cut into global
//! batches of `global_batch` samples (`train.global_batch_size`, or `world_size *
//! batch_size` when it is unset). Every global batch is then split across the ranks in
//! shares that differ by at most one sample ([`share`]; the first ranks take the remainder),
//! and the trainer weights each rank's gradient by its share, so that a step is the mean over
//! its global batch whatever the world size. So step `i` of a 2-rank run and step `i` of a
//! 3-rank run with the same global batch see the same samples (a resize changes only who
//! holds them), and step `i` of a `W`-rank run is step `i` of a one-process run with batch
//! `global_batch` (DDP's guarantee). What does not fill a whole global batch is dropped for
//! that epoch; the shuffle changes every epoch, so a different few are dropped each time and
//! no sample is repeated. Every rank runs exactly the same number of steps, and no
//! collective can wait for a rank that ran out of data.
//!
//! With length bucketing ([`ShardPlan::for_epoch`] and `batch_order = "bucketed"`) the same
//! samples are grouped differently: pools of `bucket_pool` global batches are sorted by
//! length, cut into global batches, and the order of the global batches is shuffled; none of
//! that depends on the world size either. Each global batch is split across the ranks
//! strided (rank `r` takes its samples `r, r + W, ...`, which is again [`share`] samples),
//! so at every step all ranks hold reviews of nearly the same length and finish their
//! compute together instead of waiting for the rank that drew the long reviews.

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

/// Rank `rank`'s share of a global batch of `global_batch` samples over `world_size` ranks:
/// shares differ by at most one sample, and the first `global_batch % world_size` ranks take
/// one more.
pub fn share(global_batch: usize, world_size: usize, rank: usize) -> usize {
    global_batch / world_size + usize::from(rank < global_batch % world_size)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardPlan {
    pub world_size: usize,
    /// Samples per optimizer step over all ranks.
    pub global_batch: usize,
    /// Steps (global batches) in the epoch; every rank runs this many.
    pub batches_per_rank: usize,
    /// Sample indices per rank, in the order the rank consumes them.
    ranks: Vec<Vec<u32>>,
    /// Samples left out this epoch (fewer than `global_batch`).
    pub dropped: Vec<u32>,
}

impl ShardPlan {
    /// The random plan: global batches of the shuffled order, each cut into contiguous shares.
    pub fn new(
        corpus_size: usize,
        world_size: usize,
        global_batch: usize,
        seed: u64,
        epoch: u64,
    ) -> Result<Self> {
        let order = Self::global_order(corpus_size, world_size, global_batch, seed, epoch)?;
        Ok(Self::split(order, corpus_size, world_size, global_batch, false))
    }

    /// The epoch's samples in global-batch order (the world size only checks that every
    /// rank gets a sample of every global batch).
    fn global_order(
        corpus_size: usize,
        world_size: usize,
        global_batch: usize,
        seed: u64,
        epoch: u64,
    ) -> Result<Vec<u32>> {
        if world_size == 0 || global_batch == 0 {
            return Err(DataError::Shard(format!(
                "world size ({world_size}) and global batch ({global_batch}) must be at least 1"
            )));
        }
        if global_batch < world_size {
            return Err(DataError::Shard(format!(
                "a global batch of {global_batch} cannot give each of {world_size} ranks a sample; \
                 raise train.global_batch_size or use fewer workers"
            )));
        }
        let steps = corpus_size / global_batch;
        if steps == 0 {
            return Err(DataError::Shard(format!(
                "{corpus_size} training samples cannot fill one global batch of {global_batch} \
                 ({world_size} ranks); use a smaller batch size or fewer workers"
            )));
        }
        let mut order: Vec<u32> = (0..corpus_size as u32).collect();
        order.shuffle(&mut rng_for(seed, epoch, PURPOSE_SHARD));
        Ok(order)
    }

    /// Cuts `order` into the epoch's global batches and those into the ranks' shares:
    /// contiguous, or strided (`strided`, for length-sorted global batches).
    fn split(order: Vec<u32>, corpus_size: usize, world: usize, global_batch: usize, strided: bool) -> Self {
        let steps = corpus_size / global_batch;
        let mut ranks: Vec<Vec<u32>> =
            (0..world).map(|r| Vec::with_capacity(steps * share(global_batch, world, r))).collect();
        for batch in order.chunks_exact(global_batch).take(steps) {
            let mut start = 0;
            for (rank, samples) in ranks.iter_mut().enumerate() {
                if strided {
                    samples.extend(batch.iter().skip(rank).step_by(world));
                } else {
                    let n = share(global_batch, world, rank);
                    samples.extend_from_slice(&batch[start..start + n]);
                    start += n;
                }
            }
        }
        let dropped = order[steps * global_batch..].to_vec();
        Self { world_size: world, global_batch, batches_per_rank: steps, ranks, dropped }
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
        let global_batch = train.global_batch(world_size);
        let n = split.len();
        let mut order = Self::global_order(n, world_size, global_batch, train.seed, epoch)?;
        match train.batch_order {
            BatchOrder::Unsorted => Ok(Self::split(order, n, world_size, global_batch, false)),
            BatchOrder::Bucketed => {
                let length = |i: u32| {
                    let l = split.length(i as usize);
                    if max_len > 0 {
                        l.min(max_len)
                    } else {
                        l
                    }
                };
                bucket(
                    &mut order,
                    global_batch,
                    n / global_batch,
                    length,
                    train.bucket_pool,
                    train.seed,
                    epoch,
                );
                Ok(Self::split(order, n, world_size, global_batch, true))
            }
        }
    }

    /// A rank's batches for the epoch: its samples in plan order, its share at a time.
    pub fn rank_batches(&self, rank: usize) -> Vec<Vec<u32>> {
        self.ranks[rank]
            .chunks(share(self.global_batch, self.world_size, rank))
            .map(<[u32]>::to_vec)
            .collect()
    }
}

/// Regroups the first `steps` global batches of `order` into length-bucketed ones (module
/// docs): pools of `pool_batches` global batches sorted by length, then the global batches
/// shuffled. The dropped tail stays where it is.
fn bucket(
    order: &mut [u32],
    global_batch: usize,
    steps: usize,
    length: impl Fn(u32) -> usize,
    pool_batches: usize,
    seed: u64,
    epoch: u64,
) {
    let (used, _dropped) = order.split_at_mut(steps * global_batch);
    for pool in used.chunks_mut(global_batch * pool_batches.max(1)) {
        pool.sort_by_key(|&i| std::cmp::Reverse(length(i)));
    }
    let mut batches: Vec<Vec<u32>> = used.chunks_exact(global_batch).map(<[u32]>::to_vec).collect();
    batches.shuffle(&mut rng_for(seed, epoch, PURPOSE_BATCHES));
    for (slot, batch) in used.chunks_exact_mut(global_batch).zip(batches) {
        slot.copy_from_slice(&batch);
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
        fn shards_are_disjoint_within_one_sample_and_cover_all_but_a_remainder(
            n in 1usize..5000, world in 1usize..9, global in 1usize..300, seed in any::<u64>(), epoch in 0u64..5
        ) {
            match ShardPlan::new(n, world, global, seed, epoch) {
                Err(_) => prop_assert!(n < global || global < world),
                Ok(plan) => {
                    let mut seen = HashSet::new();
                    for r in 0..world {
                        let shard = plan.rank(r);
                        // Every rank runs the same steps, with shares one sample apart at most.
                        prop_assert_eq!(shard.len(), plan.batches_per_rank * share(global, world, r));
                        prop_assert!(share(global, world, 0) - share(global, world, r) <= 1);
                        prop_assert_eq!(plan.rank_batches(r).len(), plan.batches_per_rank);
                        for &i in shard {
                            prop_assert!((i as usize) < n);
                            prop_assert!(seen.insert(i), "sample {} in two shards", i);
                        }
                    }
                    prop_assert_eq!((0..world).map(|r| share(global, world, r)).sum::<usize>(), global);
                    // Coverage: only fewer than a global batch is dropped, none repeated.
                    prop_assert!(plan.dropped.len() < global);
                    for &i in &plan.dropped {
                        prop_assert!(seen.insert(i));
                    }
                    prop_assert_eq!(seen.len(), n);
                    // Pure: the same inputs give the same plan.
                    prop_assert_eq!(&plan, &ShardPlan::new(n, world, global, seed, epoch).unwrap());
                }
            }
        }

        #[test]
        fn a_global_batch_is_the_same_samples_at_any_world_size(
            n in 50usize..3000, global in 6usize..50, seed in any::<u64>(), bucketed in any::<bool>()
        ) {
            let lengths: Vec<usize> = (0..n).map(|i| (i * 7919) % 301 + 1).collect();
            let split = split_with_lengths(&lengths);
            let train = TrainConfig {
                global_batch_size: global,
                bucket_pool: 4,
                seed,
                batch_order: if bucketed { BatchOrder::Bucketed } else { BatchOrder::Unsorted },
                ..TrainConfig::default()
            };
            let steps = |world: usize| -> Vec<Vec<u32>> {
                let plan = ShardPlan::for_epoch(&split, world, &train, 0, 1).unwrap();
                let per_rank: Vec<Vec<Vec<u32>>> = (0..world).map(|r| plan.rank_batches(r)).collect();
                (0..plan.batches_per_rank)
                    .map(|step| {
                        let mut union: Vec<u32> = per_rank.iter().flat_map(|b| b[step].clone()).collect();
                        union.sort_unstable();
                        union
                    })
                    .collect()
            };
            let one = steps(1);
            prop_assert_eq!(one.len(), n / global);
            for world in [2, 3, 4, 5] {
                prop_assert_eq!(&steps(world), &one, "world size {}", world);
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
        let multi = ShardPlan::new(n, w, w * b, 3, 2).unwrap();
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
        assert_eq!(train.global_batch(2), 20, "unset: world size times batch_size");
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
        let a = ShardPlan::new(1000, 2, 20, 7, 0).unwrap();
        let b = ShardPlan::new(1000, 2, 20, 7, 1).unwrap();
        assert_ne!(a.rank(0), b.rank(0));
        assert_eq!(a.batches_per_rank, 50);
        let e = ShardPlan::new(10, 4, 12, 0, 0).unwrap_err().to_string();
        assert!(e.contains("cannot fill one global batch of 12"), "{e}");
        let e = ShardPlan::new(100, 4, 3, 0, 0).unwrap_err().to_string();
        assert!(e.contains("cannot give each of 4 ranks a sample"), "{e}");
        // Uneven shares: 10 over 3 ranks is 4, 3, 3.
        let plan = ShardPlan::new(100, 3, 10, 7, 0).unwrap();
        let sizes: Vec<usize> = (0..3).map(|r| plan.rank_batches(r)[0].len()).collect();
        assert_eq!(sizes, [4, 3, 3]);
    }
}
