//! Rebuilding a shard from its stream of chunks, checking everything a peer could get wrong.

use trainer_core::EncodedSplit;
use trainer_proto::v1::ShardChunk;

/// Appends the reviews of `chunk` to `split`, after checking that its fields agree with each
/// other, that every token id is below `vocab_size` and every label below `num_classes`. On
/// error nothing is appended.
pub fn append_chunk(
    split: &mut EncodedSplit,
    chunk: &ShardChunk,
    vocab_size: usize,
    num_classes: usize,
) -> Result<(), String> {
    let n = chunk.review_ids.len();
    if chunk.labels.len() != n || chunk.ratings.len() != n || chunk.lengths.len() != n {
        return Err(format!(
            "a chunk has {n} review ids but {} labels, {} ratings and {} lengths",
            chunk.labels.len(),
            chunk.ratings.len(),
            chunk.lengths.len()
        ));
    }
    let declared: u64 = chunk.lengths.iter().map(|&l| u64::from(l)).sum();
    if declared != chunk.tokens.len() as u64 {
        return Err(format!(
            "a chunk's lengths add up to {declared} tokens but it carries {}",
            chunk.tokens.len()
        ));
    }
    if let Some(bad) = chunk.tokens.iter().find(|&&t| t as usize >= vocab_size) {
        return Err(format!("token id {bad} is outside the vocabulary of {vocab_size} words"));
    }
    if let Some(bad) = chunk.labels.iter().find(|&&l| usize::from(l) >= num_classes) {
        return Err(format!("label {bad} is not one of the job's {num_classes} classes"));
    }
    if split.offsets.is_empty() {
        split.offsets.push(0);
    }
    let mut at = 0usize;
    for i in 0..n {
        let len = chunk.lengths[i] as usize;
        split.push(chunk.review_ids[i], chunk.labels[i], chunk.ratings[i], &chunk.tokens[at..at + len]);
        at += len;
    }
    Ok(())
}

/// Checks the rebuilt shard against the totals the chunks announced.
pub fn check_totals(split: &EncodedSplit, reviews: u64, tokens: u64) -> Result<(), String> {
    if split.len() as u64 != reviews || split.num_tokens() as u64 != tokens {
        return Err(format!(
            "the shard stream ended with {} reviews and {} tokens of the announced {reviews} and {tokens}",
            split.len(),
            split.num_tokens()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk() -> ShardChunk {
        ShardChunk {
            review_ids: vec![4, 9],
            labels: vec![0, 1],
            ratings: vec![2, 8],
            lengths: vec![2, 3],
            tokens: vec![5, 6, 7, 8, 9],
            total_reviews: 2,
            total_tokens: 5,
            ..ShardChunk::default()
        }
    }

    #[test]
    fn chunks_rebuild_reviews() {
        let mut s = EncodedSplit::default();
        append_chunk(&mut s, &chunk(), 10, 2).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s.review(1), [7, 8, 9]);
        assert_eq!((s.ids.clone(), s.labels.clone()), (vec![4, 9], vec![0, 1]));
        check_totals(&s, 2, 5).unwrap();
        assert!(check_totals(&s, 3, 5).unwrap_err().contains("announced 3"));
    }

    #[test]
    fn malformed_chunks_are_refused_without_side_effects() {
        let mut s = EncodedSplit::default();
        let mut c = chunk();
        c.lengths = vec![2, 2];
        assert!(append_chunk(&mut s, &c, 10, 2).unwrap_err().contains("add up to 4"));
        let mut c = chunk();
        c.labels.pop();
        assert!(append_chunk(&mut s, &c, 10, 2).unwrap_err().contains("1 labels"));
        assert!(append_chunk(&mut s, &chunk(), 9, 2).unwrap_err().contains("token id 9"));
        let mut c = chunk();
        c.labels[0] = 3;
        assert!(append_chunk(&mut s, &c, 10, 2).unwrap_err().contains("label 3"));
        assert!(s.is_empty());
    }
}
