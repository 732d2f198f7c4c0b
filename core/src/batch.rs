//! Forming batches from a rank's shard and collating them into padded id matrices.

use rand::seq::SliceRandom;

use crate::config::{BatchOrder, Truncation};
use crate::encode::EncodedSplit;
use crate::shard::{rng_for, PURPOSE_BATCHES};
use crate::vocab::{PAD_ID, UNK_ID};

/// Groups `samples` (indices into `split`) into batches of `batch_size`.
///
/// `Unsorted` keeps the given order (already shuffled by the shard plan). `Bucketed` sorts
/// by length inside pools of `pool_batches` batches, cuts each pool into batches, then
/// shuffles the order of all batches, so that a batch holds reviews of similar length
/// (little padding) while the sequence of lengths stays random. A last partial batch is kept.
pub fn plan_batches(
    split: &EncodedSplit,
    samples: &[u32],
    batch_size: usize,
    order: BatchOrder,
    pool_batches: usize,
    seed: u64,
    epoch: u64,
) -> Vec<Vec<u32>> {
    let batch_size = batch_size.max(1);
    match order {
        BatchOrder::Unsorted => samples.chunks(batch_size).map(<[u32]>::to_vec).collect(),
        BatchOrder::Bucketed => {
            let pool = batch_size * pool_batches.max(1);
            let mut batches: Vec<Vec<u32>> = Vec::with_capacity(samples.len().div_ceil(batch_size));
            for chunk in samples.chunks(pool) {
                let mut sorted = chunk.to_vec();
                sorted.sort_by_key(|&i| std::cmp::Reverse(split.length(i as usize)));
                batches.extend(sorted.chunks(batch_size).map(<[u32]>::to_vec));
            }
            batches.shuffle(&mut rng_for(seed, epoch, PURPOSE_BATCHES));
            batches
        }
    }
}

/// A padded batch, ready to become tensors: `tokens` is `size x max_len`, row-major,
/// padded with `<pad>` (id 0) after each review's `lengths[i]` tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub tokens: Vec<i64>,
    pub lengths: Vec<i64>,
    pub labels: Vec<i64>,
    pub size: usize,
    pub max_len: usize,
}

impl Batch {
    pub fn num_tokens(&self) -> usize {
        self.lengths.iter().map(|&l| l as usize).sum()
    }
}

/// Applies `--max-len` (0: no limit) to a review's tokens.
pub fn truncate(tokens: &[u32], max_len: usize, mode: Truncation) -> Vec<u32> {
    if max_len == 0 || tokens.len() <= max_len {
        return tokens.to_vec();
    }
    match mode {
        Truncation::Head => tokens[..max_len].to_vec(),
        Truncation::Tail => tokens[tokens.len() - max_len..].to_vec(),
        Truncation::Both => {
            let head = max_len.div_ceil(2);
            let tail = max_len - head;
            let mut out = tokens[..head].to_vec();
            out.extend_from_slice(&tokens[tokens.len() - tail..]);
            out
        }
    }
}

/// Collates reviews of `split` into a padded batch. A review with no tokens at all (a text
/// of only quotes, say) becomes a single `<unk>`, since a sequence needs one step.
pub fn collate(split: &EncodedSplit, samples: &[u32], max_len: usize, mode: Truncation) -> Batch {
    let rows: Vec<Vec<u32>> = samples
        .iter()
        .map(|&i| {
            let t = truncate(split.review(i as usize), max_len, mode);
            if t.is_empty() {
                vec![UNK_ID]
            } else {
                t
            }
        })
        .collect();
    let width = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut tokens = vec![i64::from(PAD_ID); rows.len() * width];
    for (row, ids) in rows.iter().enumerate() {
        for (j, &id) in ids.iter().enumerate() {
            tokens[row * width + j] = i64::from(id);
        }
    }
    Batch {
        tokens,
        lengths: rows.iter().map(|r| r.len() as i64).collect(),
        labels: samples.iter().map(|&i| i64::from(split.labels[i as usize])).collect(),
        size: rows.len(),
        max_len: width,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split_with_lengths(lengths: &[usize]) -> EncodedSplit {
        let mut s = EncodedSplit::default();
        for (i, &len) in lengths.iter().enumerate() {
            let toks: Vec<u32> = (0..len as u32).map(|t| t + 2).collect();
            s.push(i as u32, (i % 2) as u8, 1, &toks);
        }
        s
    }

    #[test]
    fn collate_pads_and_keeps_lengths_and_labels() {
        let s = split_with_lengths(&[3, 1, 0]);
        let b = collate(&s, &[0, 1, 2], 0, Truncation::Head);
        assert_eq!(b.max_len, 3);
        assert_eq!(b.tokens, [2, 3, 4, 2, 0, 0, 1, 0, 0]);
        assert_eq!(b.lengths, [3, 1, 1]);
        assert_eq!(b.labels, [0, 1, 0]);
    }

    #[test]
    fn truncation_modes() {
        let t: Vec<u32> = (0..10).collect();
        assert_eq!(truncate(&t, 4, Truncation::Head), [0, 1, 2, 3]);
        assert_eq!(truncate(&t, 4, Truncation::Tail), [6, 7, 8, 9]);
        assert_eq!(truncate(&t, 5, Truncation::Both), [0, 1, 2, 8, 9]);
        assert_eq!(truncate(&t, 0, Truncation::Both), t);
    }

    #[test]
    fn bucketing_groups_similar_lengths_and_keeps_every_sample() {
        let lengths: Vec<usize> = (0..400).map(|i| (i * 37) % 300 + 1).collect();
        let s = split_with_lengths(&lengths);
        let samples: Vec<u32> = (0..400).collect();
        let unsorted = plan_batches(&s, &samples, 10, BatchOrder::Unsorted, 20, 1, 0);
        let bucketed = plan_batches(&s, &samples, 10, BatchOrder::Bucketed, 20, 1, 0);
        let mut all: Vec<u32> = bucketed.iter().flatten().copied().collect();
        all.sort_unstable();
        assert_eq!(all, samples);
        let padding = |batches: &[Vec<u32>]| -> usize {
            batches
                .iter()
                .map(|b| collate(&s, b, 0, Truncation::Head))
                .map(|b| b.size * b.max_len - b.num_tokens())
                .sum()
        };
        assert!(padding(&bucketed) * 10 < padding(&unsorted), "bucketing should cut padding by >10x");
        assert_ne!(bucketed, plan_batches(&s, &samples, 10, BatchOrder::Bucketed, 20, 1, 1));
    }
}
