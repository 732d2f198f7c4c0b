//! Subword tokenizers (issue 21): BPE or Unigram, trained with Hugging Face's `tokenizers`
//! crate on the train split only, saved as `tokenizer.json`.
//!
//! The tokenizer's ids are the model's ids: its special tokens are `<pad>` (id 0) and `<unk>`
//! (id 1), as in the word vocabulary, and the rest of its vocabulary follows in its own order.
//! So the [`Vocab`] of a subword run is the tokenizer's vocabulary in id order (`vocab.txt`
//! as for words), and Python's `tokenizers.Tokenizer.from_file("tokenizer.json")` encodes a
//! review to exactly the ids that the trainer used.
//!
//! The pipeline needs no regular expression beyond literal text, so it runs the same under
//! `fancy-regex` (ours, no C code) and `onig` (Python's build):
//!
//! - normalizer: `<br />` becomes a space (IMDB's line breaks), then lowercase;
//! - pre-tokenizer: split on whitespace, mark each word's start with `▁` (Metaspace,
//!   SentencePiece's convention), then isolate punctuation, so that `"great!"` is `▁great`,
//!   `!` and a word's pieces never cross a word boundary.
//!
//! Training is deterministic: the same texts and settings give a byte-identical
//! `tokenizer.json` whatever the thread count (tested below and in `tests/tests/tokenizer.rs`).

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;

use rayon::prelude::*;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::unigram::{Unigram, UnigramTrainer, UnigramTrainerBuilder};
use tokenizers::models::{ModelWrapper, TrainerWrapper};
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::punctuation::Punctuation;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer, Trainer};

use crate::config::TokenizerKind;
use crate::corpus::{RawCorpus, Review};
use crate::encode::{EncodedCorpus, EncodedSplit, TokenCounts};
use crate::error::{DataError, Result};
use crate::vocab::{Vocab, PAD, PAD_ID, UNK, UNK_ID};

/// Bump when training or encoding changes its output: it is part of the cache key.
pub const SUBWORD_VERSION: &str = "subword-1+tokenizers-0.22.2";
/// The file in a run folder (and in what `coordinator data --tokenizer-out` writes).
pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub use crate::data_kinds::{MAX_VOCAB_SIZE, MIN_VOCAB_SIZE};

/// What to train: the subword fields of `[data]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenizerSettings {
    pub kind: TokenizerKind,
    pub vocab_size: usize,
    pub min_frequency: u64,
}

impl Default for TokenizerSettings {
    fn default() -> Self {
        Self {
            kind: TokenizerKind::BasicEnglish,
            vocab_size: crate::config::DEFAULT_VOCAB_SIZE,
            min_frequency: crate::config::DEFAULT_MIN_FREQUENCY,
        }
    }
}

impl TokenizerSettings {
    pub fn from_config(data: &crate::config::DataConfig) -> Self {
        Self { kind: data.tokenizer, vocab_size: data.vocab_size, min_frequency: data.min_frequency }
    }

    pub fn is_subword(&self) -> bool {
        !self.kind.is_basic_english()
    }

    /// What the cache key records beside the corpus checksum.
    pub fn key_text(&self) -> String {
        format!(
            "{SUBWORD_VERSION}\ntokenizer={}\nvocab_size={}\nmin_frequency={}\n",
            self.kind.name(),
            self.vocab_size,
            self.min_frequency
        )
    }
}

fn tok_err(message: impl std::fmt::Display) -> DataError {
    DataError::Tokenizer { message: message.to_string() }
}

/// `tokenizers`' Unigram trainer fed its words in sorted order: its own `feed` counts them
/// in a hash map of random iteration order, and EM's float sums follow that order, so two
/// runs would differ in the last bits of the scores.
struct SortedUnigramTrainer {
    inner: UnigramTrainer,
    words: BTreeMap<String, u32>,
}

impl Trainer for SortedUnigramTrainer {
    type Model = ModelWrapper;

    fn should_show_progress(&self) -> bool {
        false
    }

    fn train(&self, model: &mut ModelWrapper) -> tokenizers::Result<Vec<AddedToken>> {
        match model {
            ModelWrapper::Unigram(unigram) => {
                let sentences = self.words.iter().map(|(w, &n)| (w.clone(), n)).collect();
                self.inner.do_train(sentences, unigram)
            }
            _ => Err("the Unigram trainer needs a Unigram model".into()),
        }
    }

    fn feed<I, S, F>(&mut self, iterator: I, process: F) -> tokenizers::Result<()>
    where
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
        F: Fn(&str) -> tokenizers::Result<Vec<String>> + Sync,
    {
        // Integer counts: the order in which the texts are counted does not matter.
        let counts = iterator
            .par_bridge()
            .map(|text| {
                let mut counts = BTreeMap::<String, u32>::new();
                for word in process(text.as_ref())? {
                    *counts.entry(word).or_default() += 1;
                }
                Ok::<_, tokenizers::Error>(counts)
            })
            .try_reduce(BTreeMap::new, |mut a, b| {
                for (w, n) in b {
                    *a.entry(w).or_default() += n;
                }
                Ok(a)
            })?;
        for (w, n) in counts {
            *self.words.entry(w).or_default() += n;
        }
        Ok(())
    }
}

/// A trained (or loaded) subword tokenizer and its `tokenizer.json` text.
#[derive(Clone)]
pub struct SubwordTokenizer {
    inner: Tokenizer,
    json: String,
}

impl std::fmt::Debug for SubwordTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubwordTokenizer").field("json_bytes", &self.json.len()).finish()
    }
}

fn specials() -> Vec<AddedToken> {
    vec![AddedToken::from(PAD, true), AddedToken::from(UNK, true)]
}

/// The normalizer and pre-tokenizer around an untrained model.
fn pipeline(model: impl Into<tokenizers::ModelWrapper>) -> Result<Tokenizer> {
    let mut tokenizer = Tokenizer::new(model);
    let br = Replace::new("<br />", " ").map_err(tok_err)?;
    tokenizer.with_normalizer(Some(NormalizerSequence::new(vec![br.into(), Lowercase.into()])));
    tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
        WhitespaceSplit.into(),
        Metaspace::new('▁', PrependScheme::Always, false).into(),
        Punctuation::new(SplitDelimiterBehavior::Isolated).into(),
    ])));
    Ok(tokenizer)
}

impl SubwordTokenizer {
    /// Trains on `texts` (the train split's reviews). Deterministic for any thread count.
    pub fn train(texts: &[&str], settings: &TokenizerSettings) -> Result<Self> {
        let (mut tokenizer, mut trainer) = match settings.kind {
            TokenizerKind::BasicEnglish => {
                return Err(tok_err("basic_english is not a subword tokenizer"));
            }
            TokenizerKind::Bpe => {
                let model = BPE::builder().unk_token(UNK.to_string()).build().map_err(tok_err)?;
                let trainer = BpeTrainerBuilder::new()
                    .show_progress(false)
                    .vocab_size(settings.vocab_size)
                    .min_frequency(settings.min_frequency)
                    .special_tokens(specials())
                    .build();
                (pipeline(model)?, TrainerWrapper::BpeTrainer(trainer))
            }
            TokenizerKind::Unigram => {
                let vocab_size = u32::try_from(settings.vocab_size).map_err(tok_err)?;
                let trainer = UnigramTrainerBuilder::default()
                    .show_progress(false)
                    .vocab_size(vocab_size)
                    .special_tokens(specials())
                    .unk_token(Some(UNK.to_string()))
                    .build()
                    .map_err(tok_err)?;
                let mut tokenizer = pipeline(Unigram::default())?;
                let mut trainer = SortedUnigramTrainer { inner: trainer, words: BTreeMap::new() };
                // Unigram's EM sums floats in parallel reductions whose shape follows the
                // thread count: one thread keeps its bits the same everywhere.
                let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().map_err(tok_err)?;
                pool.install(|| tokenizer.train(&mut trainer, texts.iter()).map(|_| ())).map_err(tok_err)?;
                return Self::finish(tokenizer, settings);
            }
        };
        tokenizer.train(&mut trainer, texts.iter()).map_err(tok_err)?;
        Self::finish(tokenizer, settings)
    }

    fn finish(tokenizer: Tokenizer, settings: &TokenizerSettings) -> Result<Self> {
        let size = tokenizer.get_vocab_size(true);
        if size > settings.vocab_size {
            // The alphabet alone (every character of the train split) and the specials
            // did not fit: a config error, named as one.
            return Err(crate::ConfigError::OutOfRange {
                field: "data.vocab_size",
                allowed: format!("at least {size} (the train split's characters and the specials)"),
                value: settings.vocab_size.to_string(),
            }
            .into());
        }
        let json = tokenizer.to_string(false).map_err(tok_err)?;
        let trained = Self { inner: tokenizer, json };
        trained.vocab()?;
        Ok(trained)
    }

    /// Parses a `tokenizer.json` text; `Err` says what is wrong with it.
    pub fn from_json(json: &str) -> std::result::Result<Self, String> {
        let inner = Tokenizer::from_str(json).map_err(|e| format!("not a tokenizers JSON file: {e}"))?;
        let tokenizer = Self { inner, json: json.to_string() };
        tokenizer.vocab().map_err(|e| e.to_string())?;
        Ok(tokenizer)
    }

    /// Reads `tokenizer.json`; a missing or corrupt file is an error naming it.
    pub fn load(path: &Path) -> Result<Self> {
        let json = match std::fs::read_to_string(path) {
            Ok(json) => json,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(DataError::TokenizerFile {
                    path: path.into(),
                    message: "missing (a subword run folder must hold the tokenizer it was trained with)"
                        .into(),
                });
            }
            Err(e) => return Err(DataError::TokenizerFile { path: path.into(), message: e.to_string() }),
        };
        Self::from_json(&json).map_err(|message| DataError::TokenizerFile { path: path.into(), message })
    }

    /// Writes `tokenizer.json` atomically (a resume relies on it).
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::write_atomically(path, self.json.as_bytes())
    }

    pub fn json(&self) -> &str {
        &self.json
    }

    /// The vocabulary in id order, checked: `<pad>` = 0, `<unk>` = 1, ids dense.
    pub fn vocab(&self) -> Result<Vocab> {
        let size = self.inner.get_vocab_size(true);
        let mut words = Vec::with_capacity(size);
        for id in 0..size as u32 {
            let token = self
                .inner
                .id_to_token(id)
                .ok_or_else(|| tok_err(format!("the vocabulary of {size} tokens has no id {id}")))?;
            words.push(token);
        }
        if words.first().map(String::as_str) != Some(PAD) || words.get(1).map(String::as_str) != Some(UNK) {
            return Err(tok_err(format!("ids {PAD_ID} and {UNK_ID} must be {PAD} and {UNK}")));
        }
        Vocab::from_word_list(words).map_err(|e| tok_err(format!("vocabulary: {e}")))
    }

    /// The ids of one text, as Python's `Tokenizer.encode(text).ids` gives them.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.inner.encode_fast(text, false).map_err(tok_err)?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Encodes reviews in parallel, in order.
    pub fn encode_split(&self, reviews: &[Review]) -> Result<EncodedSplit> {
        let encoded: Vec<Vec<u32>> =
            reviews.par_iter().map(|r| self.encode(&r.text)).collect::<Result<_>>()?;
        let mut split = EncodedSplit {
            ids: Vec::with_capacity(reviews.len()),
            labels: Vec::with_capacity(reviews.len()),
            ratings: Vec::with_capacity(reviews.len()),
            offsets: Vec::with_capacity(reviews.len() + 1),
            tokens: Vec::with_capacity(encoded.iter().map(Vec::len).sum()),
        };
        for (review, ids) in reviews.iter().zip(&encoded) {
            split.push(review.id, review.label, review.rating, ids);
        }
        if split.offsets.is_empty() {
            split.offsets.push(0);
        }
        Ok(split)
    }
}

/// Trains the tokenizer on the train split only, then encodes both splits with it.
pub fn encode_corpus(
    raw: &RawCorpus,
    settings: &TokenizerSettings,
) -> Result<(EncodedCorpus, SubwordTokenizer, TokenCounts)> {
    let texts: Vec<&str> = raw.train.iter().map(|r| r.text.as_str()).collect();
    let tokenizer = SubwordTokenizer::train(&texts, settings)?;
    let vocab = tokenizer.vocab()?;
    let (train, test) =
        rayon::join(|| tokenizer.encode_split(&raw.train), || tokenizer.encode_split(&raw.test));
    let (train, test) = (train?, test?);
    let counts = TokenCounts { train_tokens: train.tokens.len() as u64, train_distinct: vocab.len() };
    let corpus = EncodedCorpus {
        vocab,
        train,
        test,
        checksum: raw.checksum.clone(),
        classes: raw.classes.clone(),
        tokenizer_json: Some(tokenizer.json().to_string()),
    };
    Ok((corpus, tokenizer, counts))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small corpus with enough repetition for merges and enough variety for ties.
    fn texts() -> Vec<String> {
        let words = [
            "the",
            "movie",
            "was",
            "great",
            "terrible",
            "acting",
            "plot",
            "boring",
            "wonderful",
            "film",
            "actors",
            "loved",
            "hated",
            "it's",
            "don't",
            "scene",
            "scenes",
            "ending",
        ];
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        (0..400)
            .map(|i| {
                let mut text = String::new();
                for j in 0..(20 + i % 17) {
                    state =
                        state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                    let w = words[(state >> 33) as usize % words.len()];
                    text.push_str(w);
                    text.push_str(match j % 7 {
                        3 => ", ",
                        5 => "! <br /><br />",
                        6 => ". ",
                        _ => " ",
                    });
                }
                text
            })
            .collect()
    }

    fn settings(kind: TokenizerKind, vocab_size: usize) -> TokenizerSettings {
        TokenizerSettings { kind, vocab_size, min_frequency: 2 }
    }

    #[test]
    fn bpe_ids_are_the_model_ids_and_unseen_words_are_pieces() {
        let texts = texts();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let tok = SubwordTokenizer::train(&refs, &settings(TokenizerKind::Bpe, 120)).unwrap();
        let vocab = tok.vocab().unwrap();
        assert_eq!(&vocab.words()[..2], [PAD, UNK]);
        assert!(vocab.len() <= 120);
        // A word never seen, made of seen letters: pieces, not <unk>.
        let ids = tok.encode("Greatest ACTING<br />ever!").unwrap();
        assert!(!ids.is_empty() && ids.iter().all(|&i| i != UNK_ID), "{ids:?}");
        assert_eq!(vocab.word(*ids.last().unwrap()), Some("!"));
        // `<br />` separates words; case does not matter.
        assert_eq!(tok.encode("great<br />film").unwrap(), tok.encode("GREAT film").unwrap());
        // A character never seen is <unk>.
        assert!(tok.encode("日").unwrap().contains(&UNK_ID));
        // The JSON round-trips to the same tokenizer.
        let again = SubwordTokenizer::from_json(tok.json()).unwrap();
        assert_eq!(again.encode("the boring plot").unwrap(), tok.encode("the boring plot").unwrap());
    }

    #[test]
    fn training_is_byte_identical_across_runs_and_thread_counts() {
        let texts = texts();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        for kind in [TokenizerKind::Bpe, TokenizerKind::Unigram] {
            let s = settings(kind, 150);
            let jsons: Vec<String> = [1, 2, 4, 1, 3]
                .into_iter()
                .map(|threads| {
                    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                    pool.install(|| SubwordTokenizer::train(&refs, &s).unwrap().json().to_string())
                })
                .collect();
            for (i, json) in jsons.iter().enumerate() {
                let at = json.bytes().zip(jsons[0].bytes()).position(|(a, b)| a != b).unwrap_or(0);
                assert!(
                    json == &jsons[0],
                    "{kind:?}: run {i} differs from run 0 at byte {at}: {:?} vs {:?}",
                    &json[at.saturating_sub(80)..(at + 80).min(json.len())],
                    &jsons[0][at.saturating_sub(80)..(at + 80).min(jsons[0].len())]
                );
            }
        }
    }

    #[test]
    fn unigram_keeps_the_special_ids() {
        let texts = texts();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let tok = SubwordTokenizer::train(&refs, &settings(TokenizerKind::Unigram, 150)).unwrap();
        let vocab = tok.vocab().unwrap();
        assert_eq!(&vocab.words()[..2], [PAD, UNK]);
        let ids = tok.encode("wonderful boring hate").unwrap();
        assert!(!ids.is_empty() && ids.iter().all(|&i| i != UNK_ID), "{ids:?}");
    }

    #[test]
    fn bad_settings_and_files_are_clear_errors() {
        let texts = texts();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let e = SubwordTokenizer::train(&refs, &settings(TokenizerKind::Bpe, 10)).unwrap_err().to_string();
        assert!(e.contains("data.vocab_size must be at least") && e.contains("got 10"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(TOKENIZER_FILE);
        let e = SubwordTokenizer::load(&path).unwrap_err().to_string();
        assert!(e.contains("tokenizer.json") && e.contains("missing"), "{e}");
        std::fs::write(&path, "{\"version\": ").unwrap();
        let e = SubwordTokenizer::load(&path).unwrap_err().to_string();
        assert!(e.contains("tokenizer.json") && e.contains("not a tokenizers JSON"), "{e}");
        let tok = SubwordTokenizer::train(&refs, &settings(TokenizerKind::Bpe, 100)).unwrap();
        tok.save(&path).unwrap();
        assert_eq!(SubwordTokenizer::load(&path).unwrap().json(), tok.json());
    }
}
