//! The job's three splits from the encoded corpus and the data config: the (optional)
//! train subset, the seeded validation hold-out carved from it, and the (optional) test
//! subset. The coordinator and the single-process worker call the same function, so that
//! both see the same samples.

use crate::config::DataConfig;
use crate::encode::{EncodedCorpus, EncodedSplit};
use crate::shard::{balanced_subset, train_val_split};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobSplits {
    pub train: EncodedSplit,
    pub val: EncodedSplit,
    pub test: EncodedSplit,
}

/// `data.train_subset` (balanced, seeded) of the train split, then `data.val_fraction` of
/// it held out (seeded); `data.test_subset` (balanced, seeded) of the test split.
pub fn job_splits(corpus: &EncodedCorpus, data: &DataConfig, seed: u64) -> JobSplits {
    let subset = balanced_subset(&corpus.train.labels, data.train_subset, seed);
    let (train_pos, val_pos) = train_val_split(subset.len(), data.val_fraction, seed);
    let pick = |positions: &[usize]| -> Vec<usize> { positions.iter().map(|&p| subset[p]).collect() };
    JobSplits {
        train: corpus.train.select(&pick(&train_pos)),
        val: corpus.train.select(&pick(&val_pos)),
        test: corpus.test.select(&balanced_subset(&corpus.test.labels, data.test_subset, seed)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocab::Vocab;

    fn corpus(n: usize) -> EncodedCorpus {
        let mut train = EncodedSplit::default();
        let mut test = EncodedSplit::default();
        for i in 0..n {
            train.push(i as u32, (i % 2) as u8, 1, &[2 + i as u32]);
            test.push(i as u32, (i % 2) as u8, 1, &[2]);
        }
        EncodedCorpus {
            vocab: Vocab::from_counts([("a", 1u64)], 1, 0),
            train,
            test,
            checksum: String::new(),
            tokenizer_json: None,
            classes: crate::corpus::imdb_classes(),
        }
    }

    #[test]
    fn subsets_and_hold_out_are_disjoint_and_seeded() {
        let c = corpus(1000);
        let data =
            DataConfig { train_subset: 200, test_subset: 50, val_fraction: 0.25, ..DataConfig::default() };
        let s = job_splits(&c, &data, 7);
        assert_eq!((s.train.len(), s.val.len(), s.test.len()), (150, 50, 50));
        let mut ids: Vec<u32> = s.train.ids.iter().chain(&s.val.ids).copied().collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 200, "train and validation overlap");
        assert_eq!(s, job_splits(&c, &data, 7));
        assert_ne!(s.val, job_splits(&c, &data, 8).val);
        let all = job_splits(&c, &DataConfig::default(), 7);
        assert_eq!(all.train.len() + all.val.len(), 1000);
    }
}
