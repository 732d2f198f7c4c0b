//! Corpus statistics, as printed by `coordinator data`.

use serde::Serialize;

use crate::encode::{EncodedCorpus, EncodedSplit};
use crate::pipeline::PipelineReport;
use crate::vocab::UNK_ID;

#[derive(Debug, Clone, Serialize)]
pub struct SplitStats {
    pub reviews: usize,
    /// Reviews per class, in the order of [`CorpusStats::classes`].
    pub per_class: Vec<usize>,
    /// IMDB's classes by name (for a corpus of exactly the classes `neg` and `pos`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pos: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub neg: Option<usize>,
    pub tokens: usize,
    /// Share of tokens that map to `<unk>`.
    pub unk_rate: f64,
    pub length: LengthPercentiles,
}

#[derive(Debug, Clone, Serialize)]
pub struct LengthPercentiles {
    pub min: usize,
    pub p50: usize,
    pub p90: usize,
    pub p95: usize,
    pub p99: usize,
    pub max: usize,
    pub mean: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct VocabStats {
    /// Words besides the specials `<pad>` and `<unk>`.
    pub words: usize,
    /// Embedding rows: words plus the specials.
    pub size: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct CorpusStats {
    /// The class names, sorted (a label is an index into this list).
    pub classes: Vec<String>,
    /// sha256 of the encoded corpus (`EncodedCorpus::fingerprint`): equal for the same
    /// corpus in any format.
    pub encoded_fingerprint: String,
    pub train: SplitStats,
    pub test: SplitStats,
    pub vocab: VocabStats,
    pub pipeline: PipelineReport,
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[usize], p: f64) -> usize {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn split_stats(split: &EncodedSplit, classes: &[String]) -> SplitStats {
    let mut lengths: Vec<usize> = (0..split.len()).map(|i| split.length(i)).collect();
    lengths.sort_unstable();
    let mut per_class = vec![0usize; classes.len()];
    for &l in &split.labels {
        if let Some(c) = per_class.get_mut(usize::from(l)) {
            *c += 1;
        }
    }
    let imdb = classes == crate::corpus::imdb_classes();
    let unk = split.tokens.iter().filter(|&&t| t == UNK_ID).count();
    SplitStats {
        reviews: split.len(),
        pos: imdb.then(|| per_class[1]),
        neg: imdb.then(|| per_class[0]),
        per_class,
        tokens: split.num_tokens(),
        unk_rate: if split.tokens.is_empty() { 0.0 } else { unk as f64 / split.tokens.len() as f64 },
        length: LengthPercentiles {
            min: lengths.first().copied().unwrap_or(0),
            p50: percentile(&lengths, 50.0),
            p90: percentile(&lengths, 90.0),
            p95: percentile(&lengths, 95.0),
            p99: percentile(&lengths, 99.0),
            max: lengths.last().copied().unwrap_or(0),
            mean: if lengths.is_empty() { 0.0 } else { split.num_tokens() as f64 / lengths.len() as f64 },
        },
    }
}

pub fn corpus_stats(corpus: &EncodedCorpus, pipeline: PipelineReport) -> CorpusStats {
    CorpusStats {
        classes: corpus.classes.clone(),
        encoded_fingerprint: corpus.fingerprint(),
        train: split_stats(&corpus.train, &corpus.classes),
        test: split_stats(&corpus.test, &corpus.classes),
        vocab: VocabStats { words: corpus.vocab.num_words(), size: corpus.vocab.len() },
        pipeline,
    }
}

impl CorpusStats {
    /// The human-readable table.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!("corpus      {}\n", self.pipeline.source));
        out.push_str(&format!("checksum    sha256 {}\n", self.pipeline.checksum));
        out.push_str(&format!("encoded     sha256 {}\n", self.encoded_fingerprint));
        out.push_str(&format!(
            "{:<6} {:>8} {:>10} {:>7} {:>5} {:>5} {:>5} {:>5} {:>5} {:>6}\n",
            "split", "reviews", "tokens", "unk%", "p50", "p90", "p95", "p99", "max", "mean"
        ));
        for (name, s) in [("train", &self.train), ("test", &self.test)] {
            out.push_str(&format!(
                "{:<6} {:>8} {:>10} {:>7.3} {:>5} {:>5} {:>5} {:>5} {:>5} {:>6.1}\n",
                name,
                s.reviews,
                s.tokens,
                100.0 * s.unk_rate,
                s.length.p50,
                s.length.p90,
                s.length.p95,
                s.length.p99,
                s.length.max,
                s.length.mean
            ));
        }
        let width = self.classes.iter().map(String::len).max().unwrap_or(5).clamp(5, 40);
        out.push_str(&format!("{:<width$} {:>8} {:>8}\n", "class", "train", "test"));
        for (i, class) in self.classes.iter().enumerate() {
            out.push_str(&format!(
                "{class:<width$} {:>8} {:>8}\n",
                self.train.per_class.get(i).copied().unwrap_or(0),
                self.test.per_class.get(i).copied().unwrap_or(0)
            ));
        }
        out.push_str(&format!(
            "vocab       {} words + 2 specials = {} ids\n",
            self.vocab.words, self.vocab.size
        ));
        if !self.pipeline.lossy_utf8.is_empty() {
            out.push_str(&format!(
                "utf-8       {} reviews decoded lossily (first: {})\n",
                self.pipeline.lossy_utf8.len(),
                self.pipeline.lossy_utf8[0]
            ));
        }
        let cache = match &self.pipeline.cache {
            crate::pipeline::CacheStatus::Hit => "hit (nothing tokenized)".to_string(),
            crate::pipeline::CacheStatus::Built => "built".to_string(),
            crate::pipeline::CacheStatus::Rebuilt(why) => format!("rebuilt ({why})"),
            crate::pipeline::CacheStatus::Disabled => "disabled".to_string(),
        };
        out.push_str(&format!("cache       {cache}\n"));
        let total: f64 = self.pipeline.stages.iter().map(|(_, s)| s).sum();
        for (stage, secs) in &self.pipeline.stages {
            out.push_str(&format!("time        {stage:<28} {secs:>8.3} s\n"));
        }
        out.push_str(&format!("time        {:<28} {total:>8.3} s\n", "total"));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<usize> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&[7], 50.0), 7);
    }
}
