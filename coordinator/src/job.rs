//! The job's data as the coordinator serves it: the three splits, the per-epoch train shard
//! plan, the evaluation shards, and the chunking of a shard into stream messages.

use anyhow::Context;
use trainer_core::shard::ShardPlan;
use trainer_core::splits::{job_splits, JobSplits};
use trainer_core::{EncodedCorpus, EncodedSplit, JobConfig};
use trainer_proto::v1::{ShardChunk, Split};
use trainer_proto::SHARD_CHUNK_TOKENS;

/// Everything about the job's samples that does not change while it runs.
#[derive(Debug)]
pub struct JobData {
    pub config: JobConfig,
    /// The most workers the job runs with (`--workers N` or the MAX of `MIN:MAX`); an
    /// attempt's own world size is the driver's and the service's.
    pub max_world: usize,
    /// The class names, sorted; a label is an index into it (`labels.json`).
    pub classes: Vec<String>,
    pub splits: JobSplits,
    pub vocab_size: usize,
    /// The vocabulary's fingerprint, which workers write into checkpoints.
    pub vocab_fingerprint: String,
    /// Steps every rank runs per epoch: the shard plan's batches per rank, capped by
    /// `train.max_steps_per_epoch`.
    pub steps_per_epoch: usize,
}

impl JobData {
    /// The job at up to `max_world` workers. The plan is checked there: the global batch is the
    /// same at every world size, and the largest gives each rank the smallest share.
    pub fn new(corpus: &EncodedCorpus, mut config: JobConfig, max_world: usize) -> anyhow::Result<Self> {
        // The head has one output per class of the data; the workers build it from this
        // config.
        config.model.num_classes = corpus.classes.len();
        config.validate()?;
        let splits = job_splits(corpus, &config.data, config.train.seed);
        // The plan's size does not depend on the epoch: check once that every rank gets a batch.
        let global_batch = config.train.global_batch(max_world);
        let plan = ShardPlan::new(splits.train.len(), max_world, global_batch, config.train.seed, 0)
            .context("cannot shard the training split")?;
        let mut steps_per_epoch = plan.batches_per_rank;
        if config.train.max_steps_per_epoch > 0 {
            steps_per_epoch = steps_per_epoch.min(config.train.max_steps_per_epoch);
        }
        Ok(Self {
            vocab_size: corpus.vocab.len(),
            vocab_fingerprint: corpus.vocab.fingerprint(),
            classes: corpus.classes.clone(),
            config,
            max_world,
            splits,
            steps_per_epoch,
        })
    }

    /// The split and the indices into it that `rank` of `world` ranks gets.
    pub fn shard(
        &self,
        split: Split,
        rank: usize,
        world: usize,
        epoch: u64,
    ) -> anyhow::Result<(&EncodedSplit, Vec<usize>)> {
        match split {
            Split::Train => {
                // In the order the rank consumes it: its batches are consecutive runs of its
                // share of the global batch (shard::share).
                let plan = ShardPlan::for_epoch(
                    &self.splits.train,
                    world,
                    &self.config.train,
                    self.config.data.max_len,
                    epoch,
                )?;
                let indices = plan.rank(rank).iter().map(|&i| i as usize).collect();
                Ok((&self.splits.train, indices))
            }
            Split::Validation => Ok((&self.splits.val, eval_shard(self.splits.val.len(), world, rank))),
            Split::Test => Ok((&self.splits.test, eval_shard(self.splits.test.len(), world, rank))),
            Split::Unspecified => anyhow::bail!("the split is unspecified"),
        }
    }
}

/// Evaluation shards: sample `i` goes to rank `i % world_size`. Counts are summed across
/// ranks, so shards one sample apart in size are fine.
pub fn eval_shard(n: usize, world_size: usize, rank: usize) -> Vec<usize> {
    (rank..n).step_by(world_size.max(1)).collect()
}

// A review longer than SHARD_CHUNK_TOKENS travels alone in one chunk: at most one token
// per byte of its text, at most 5 bytes per token (a varint), and the corpus reader refuses
// reviews over MAX_REVIEW_BYTES. So no chunk can exceed the gRPC message limit.
const _: () = assert!(
    trainer_core::corpus::MAX_REVIEW_BYTES * 5 + SHARD_CHUNK_TOKENS * 5 + (1 << 20)
        <= trainer_proto::MAX_MESSAGE_BYTES
);

/// Cuts the reviews `indices` of `split` into chunks of whole reviews with at most
/// `SHARD_CHUNK_TOKENS` tokens each (one longer review travels alone), calling `emit` for
/// each chunk in order; stops early when `emit` returns false.
pub fn for_each_chunk(
    split: &EncodedSplit,
    indices: &[usize],
    kind: Split,
    epoch: u64,
    mut emit: impl FnMut(ShardChunk) -> bool,
) {
    let total_tokens: u64 = indices.iter().map(|&i| split.length(i) as u64).sum();
    let empty = || ShardChunk {
        split: kind as i32,
        epoch,
        total_reviews: indices.len() as u64,
        total_tokens,
        ..ShardChunk::default()
    };
    let mut chunk = empty();
    for &i in indices {
        let review = split.review(i);
        if !chunk.lengths.is_empty()
            && chunk.tokens.len() + review.len() > SHARD_CHUNK_TOKENS
            && !emit(std::mem::replace(&mut chunk, empty()))
        {
            return;
        }
        chunk.review_ids.push(split.ids[i]);
        chunk.labels.push(split.labels[i]);
        chunk.ratings.push(split.ratings[i]);
        chunk.lengths.push(review.len() as u32);
        chunk.tokens.extend_from_slice(review);
    }
    // An empty shard still sends one chunk, so the receiver learns the totals.
    emit(chunk);
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn split(n: usize, len: usize) -> EncodedSplit {
        let mut s = EncodedSplit::default();
        for i in 0..n {
            let tokens: Vec<u32> = (0..len as u32).map(|t| 2 + (t + i as u32) % 50_000).collect();
            s.push(i as u32, (i % 2) as u8, 7, &tokens);
        }
        s
    }

    #[test]
    fn chunks_rebuild_the_shard_and_stay_small() {
        let s = split(3000, 300);
        let indices: Vec<usize> = (0..3000).rev().step_by(2).collect();
        let mut rebuilt = EncodedSplit::default();
        let mut chunks = 0;
        for_each_chunk(&s, &indices, Split::Train, 3, |c| {
            assert!(c.encoded_len() < 2 * 1024 * 1024, "chunk of {} bytes", c.encoded_len());
            assert_eq!(c.total_reviews, 1500);
            let mut at = 0;
            for (k, &len) in c.lengths.iter().enumerate() {
                let t = &c.tokens[at..at + len as usize];
                rebuilt.push(c.review_ids[k], c.labels[k], c.ratings[k], t);
                at += len as usize;
            }
            chunks += 1;
            true
        });
        assert!(chunks > 1);
        assert_eq!(rebuilt, s.select(&indices));
    }

    #[test]
    fn empty_shards_send_one_chunk_and_eval_shards_partition() {
        let s = split(5, 3);
        let mut seen = 0;
        for_each_chunk(&s, &[], Split::Test, 0, |c| {
            assert_eq!((c.total_reviews, c.lengths.len()), (0, 0));
            seen += 1;
            true
        });
        assert_eq!(seen, 1);
        let mut all: Vec<usize> = (0..3).flat_map(|r| eval_shard(10, 3, r)).collect();
        all.sort_unstable();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        assert_eq!(eval_shard(2, 4, 3), Vec::<usize>::new());
    }
}
