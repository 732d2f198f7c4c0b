//! Tokenizing, counting and encoding the corpus in parallel, and the encoded form that the
//! rest of the system uses: one flat token array per split with offsets.

use rayon::prelude::*;
use rustc_hash::FxHashMap;

use crate::corpus::{RawCorpus, Review};
use crate::tokenizer::Tokenizer;
use crate::vocab::{Vocab, UNK_ID};

/// A split as token ids: review `i` is `tokens[offsets[i]..offsets[i + 1]]`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EncodedSplit {
    pub ids: Vec<u32>,
    pub labels: Vec<u8>,
    pub ratings: Vec<u8>,
    pub offsets: Vec<u64>,
    pub tokens: Vec<u32>,
}

impl EncodedSplit {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn review(&self, i: usize) -> &[u32] {
        &self.tokens[self.offsets[i] as usize..self.offsets[i + 1] as usize]
    }

    pub fn length(&self, i: usize) -> usize {
        (self.offsets[i + 1] - self.offsets[i]) as usize
    }

    pub fn lengths(&self) -> Vec<u32> {
        self.offsets.windows(2).map(|w| (w[1] - w[0]) as u32).collect()
    }

    pub fn num_tokens(&self) -> usize {
        self.tokens.len()
    }

    /// A new split made of the given reviews, in the given order.
    pub fn select(&self, indices: &[usize]) -> EncodedSplit {
        let mut out = EncodedSplit {
            ids: Vec::with_capacity(indices.len()),
            labels: Vec::with_capacity(indices.len()),
            ratings: Vec::with_capacity(indices.len()),
            offsets: Vec::with_capacity(indices.len() + 1),
            tokens: Vec::with_capacity(indices.iter().map(|&i| self.length(i)).sum()),
        };
        out.offsets.push(0);
        for &i in indices {
            out.ids.push(self.ids[i]);
            out.labels.push(self.labels[i]);
            out.ratings.push(self.ratings[i]);
            out.tokens.extend_from_slice(self.review(i));
            out.offsets.push(out.tokens.len() as u64);
        }
        out
    }

    /// Appends one review (used by workers that receive their shard in chunks).
    pub fn push(&mut self, id: u32, label: u8, rating: u8, tokens: &[u32]) {
        if self.offsets.is_empty() {
            self.offsets.push(0);
        }
        self.ids.push(id);
        self.labels.push(label);
        self.ratings.push(rating);
        self.tokens.extend_from_slice(tokens);
        self.offsets.push(self.tokens.len() as u64);
    }
}

/// The encoded corpus with its vocabulary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedCorpus {
    pub vocab: Vocab,
    pub train: EncodedSplit,
    pub test: EncodedSplit,
    /// The corpus checksum this was built from.
    pub checksum: String,
    /// A subword run's `tokenizer.json` (`crate::subword`); `None` for `basic_english`.
    pub tokenizer_json: Option<String>,
    /// The class names, sorted; a label is an index into it.
    pub classes: Vec<String>,
}

impl EncodedCorpus {
    /// sha256 of what training sees: the classes, the vocabulary, and each split's labels
    /// and token sequences in order (not the review ids or ratings, which only IMDB has).
    /// The same corpus in any format has the same fingerprint; the corpus checksum, which
    /// hashes the files read, differs by nature.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(format!("classes={}\n", self.classes.join("\u{1f}")));
        h.update(self.vocab.words().join("\n").as_bytes());
        for split in [&self.train, &self.test] {
            h.update((split.len() as u64).to_le_bytes());
            h.update(&split.labels);
            let mut bytes = Vec::with_capacity(1 << 18);
            for chunk in split.offsets.chunks(1 << 15) {
                bytes.clear();
                bytes.extend(chunk.iter().flat_map(|o| o.to_le_bytes()));
                h.update(&bytes);
            }
            for chunk in split.tokens.chunks(1 << 16) {
                bytes.clear();
                bytes.extend(chunk.iter().flat_map(|t| t.to_le_bytes()));
                h.update(&bytes);
            }
        }
        hex::encode(h.finalize())
    }
}

/// One chunk's tokens as chunk-local word ids, with the chunk's words and their counts.
pub(crate) struct LocalChunk {
    pub(crate) words: Vec<String>,
    pub(crate) counts: Vec<u64>,
    pub(crate) tokens: Vec<u32>,
    pub(crate) lengths: Vec<u32>,
}

pub(crate) fn tokenize_chunk(reviews: &[Review]) -> LocalChunk {
    let mut tokenizer = Tokenizer::new();
    let mut index: FxHashMap<String, u32> = FxHashMap::default();
    let mut chunk =
        LocalChunk { words: Vec::new(), counts: Vec::new(), tokens: Vec::new(), lengths: Vec::new() };
    for review in reviews {
        let before = chunk.tokens.len();
        tokenizer.for_each_token(&review.text, |tok| {
            let id = match index.get(tok) {
                Some(&id) => id,
                None => {
                    let id = chunk.words.len() as u32;
                    index.insert(tok.to_string(), id);
                    chunk.words.push(tok.to_string());
                    chunk.counts.push(0);
                    id
                }
            };
            chunk.counts[id as usize] += 1;
            chunk.tokens.push(id);
        });
        chunk.lengths.push((chunk.tokens.len() - before) as u32);
    }
    chunk
}

pub(crate) const CHUNK_REVIEWS: usize = 1024;

fn tokenize_split(reviews: &[Review]) -> Vec<LocalChunk> {
    reviews.par_chunks(CHUNK_REVIEWS).map(tokenize_chunk).collect()
}

fn assemble(reviews: &[Review], chunks: &[LocalChunk], vocab: &Vocab) -> EncodedSplit {
    // Map each chunk's local ids to vocab ids, then lay the chunks end to end.
    let remapped: Vec<Vec<u32>> = chunks
        .par_iter()
        .map(|c| {
            let map: Vec<u32> = c.words.iter().map(|w| vocab.get(w).unwrap_or(UNK_ID)).collect();
            c.tokens.iter().map(|&t| map[t as usize]).collect()
        })
        .collect();
    let total: usize = remapped.iter().map(Vec::len).sum();
    let mut split = EncodedSplit {
        ids: reviews.iter().map(|r| r.id).collect(),
        labels: reviews.iter().map(|r| r.label).collect(),
        ratings: reviews.iter().map(|r| r.rating).collect(),
        offsets: Vec::with_capacity(reviews.len() + 1),
        tokens: Vec::with_capacity(total),
    };
    split.offsets.push(0);
    for (chunk, tokens) in chunks.iter().zip(&remapped) {
        split.tokens.extend_from_slice(tokens);
        let mut end = *split.offsets.last().unwrap_or(&0);
        for &len in &chunk.lengths {
            end += u64::from(len);
            split.offsets.push(end);
        }
    }
    split
}

/// Statistics of the raw token stream, before the vocabulary maps rare words to `<unk>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenCounts {
    pub train_tokens: u64,
    pub train_distinct: usize,
}

/// Tokenizes both splits, builds the vocabulary from the train split only, and encodes.
pub fn encode_corpus(raw: &RawCorpus, min_freq: u32, max_vocab: usize) -> (EncodedCorpus, TokenCounts) {
    let (train_chunks, test_chunks) =
        rayon::join(|| tokenize_split(&raw.train), || tokenize_split(&raw.test));
    let parts = ChunkedCorpus {
        train: (&raw.train, &train_chunks),
        test: (&raw.test, &test_chunks),
        classes: &raw.classes,
        checksum: &raw.checksum,
    };
    encode_chunks(parts, min_freq, max_vocab)
}

/// Both splits already tokenized into chunks (whose reviews give the ids, labels and
/// ratings; their texts are not read), for [`encode_chunks`].
pub(crate) struct ChunkedCorpus<'a> {
    pub(crate) train: (&'a [Review], &'a [LocalChunk]),
    pub(crate) test: (&'a [Review], &'a [LocalChunk]),
    pub(crate) classes: &'a [String],
    pub(crate) checksum: &'a str,
}

/// The vocabulary from the train chunks' counts, then both splits encoded with it: the one
/// path of [`encode_corpus`] and of the readers that tokenize as they read.
pub(crate) fn encode_chunks(
    parts: ChunkedCorpus<'_>,
    min_freq: u32,
    max_vocab: usize,
) -> (EncodedCorpus, TokenCounts) {
    let (train_reviews, train_chunks) = parts.train;
    let (test_reviews, test_chunks) = parts.test;
    let mut counts: FxHashMap<&str, u64> = FxHashMap::default();
    for chunk in train_chunks {
        // A chunk split by rows (a held-out test part) may list words none of its rows has.
        for (w, &c) in chunk.words.iter().zip(&chunk.counts).filter(|(_, &c)| c > 0) {
            *counts.entry(w.as_str()).or_insert(0) += c;
        }
    }
    let token_counts = TokenCounts { train_tokens: counts.values().sum(), train_distinct: counts.len() };
    let vocab = Vocab::from_counts(counts, min_freq, max_vocab);
    let (train, test) = rayon::join(
        || assemble(train_reviews, train_chunks, &vocab),
        || assemble(test_reviews, test_chunks, &vocab),
    );
    let corpus = EncodedCorpus {
        vocab,
        train,
        test,
        checksum: parts.checksum.to_string(),
        classes: parts.classes.to_vec(),
        tokenizer_json: None,
    };
    (corpus, token_counts)
}

/// Encodes one text with an existing vocabulary (for `predict`).
pub fn encode_text(tokenizer: &mut Tokenizer, vocab: &Vocab, text: &str) -> Vec<u32> {
    let mut ids = Vec::new();
    tokenizer.for_each_token(text, |t| ids.push(vocab.id(t)));
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    fn review(id: u32, label: u8, text: &str) -> Review {
        Review { id, rating: if label == 1 { 9 } else { 2 }, label, text: text.into() }
    }

    #[test]
    fn vocab_from_train_only_and_unknown_test_words() {
        let raw = RawCorpus {
            train: vec![review(0, 0, "bad bad movie."), review(1, 1, "good movie!")],
            test: vec![review(0, 0, "awful movie"), review(1, 1, "good")],
            checksum: "x".into(),
            lossy_utf8: vec![],
            classes: crate::corpus::imdb_classes(),
        };
        let (enc, counts) = encode_corpus(&raw, 1, 0);
        assert_eq!(counts.train_tokens, 7);
        assert_eq!(counts.train_distinct, 5);
        // bad:2 movie:2 then ! . good by the word.
        assert_eq!(enc.vocab.words()[2..], ["bad", "movie", "!", ".", "good"]);
        assert_eq!(enc.train.review(0), [2, 2, 3, 5]);
        assert_eq!(enc.test.review(0), [UNK_ID, 3]);
        assert_eq!(enc.test.labels, [0, 1]);
        let sel = enc.train.select(&[1]);
        assert_eq!(sel.review(0), [6, 3, 4]);
        assert_eq!(sel.labels, [1]);
    }
}
