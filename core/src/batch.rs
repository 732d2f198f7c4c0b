//! Collating a batch of reviews into a padded id matrix (the shard plan forms the batches).

use crate::config::Truncation;
use crate::encode::EncodedSplit;
use crate::vocab::{PAD_ID, UNK_ID};

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
}
