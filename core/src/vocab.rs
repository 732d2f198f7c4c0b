//! The vocabulary: specials `<pad>` (id 0) and `<unk>` (id 1), then the train split's words
//! ordered by frequency (descending) and then by the word, as torchtext orders them.

use std::path::Path;

use rustc_hash::FxHashMap;

use crate::error::{DataError, Result};

pub const PAD: &str = "<pad>";
pub const UNK: &str = "<unk>";
pub const PAD_ID: u32 = 0;
pub const UNK_ID: u32 = 1;
pub const NUM_SPECIALS: usize = 2;
/// The vocabulary's file in a run folder (one word per line, in id order).
pub const VOCAB_FILE: &str = "vocab.txt";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vocab {
    words: Vec<String>,
    index: FxHashMap<String, u32>,
}

impl Vocab {
    /// Builds from word counts: words seen at least `min_freq` times, the `max_vocab` most
    /// frequent of them when `max_vocab > 0`.
    pub fn from_counts<'a>(
        counts: impl IntoIterator<Item = (&'a str, u64)>,
        min_freq: u32,
        max_vocab: usize,
    ) -> Self {
        let mut kept: Vec<(&str, u64)> =
            counts.into_iter().filter(|&(_, c)| c >= u64::from(min_freq)).collect();
        kept.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        if max_vocab > 0 {
            kept.truncate(max_vocab);
        }
        let words =
            [PAD, UNK].into_iter().chain(kept.into_iter().map(|(w, _)| w)).map(str::to_string).collect();
        Self::from_words(words)
    }

    fn from_words(words: Vec<String>) -> Self {
        let index = words.iter().enumerate().map(|(i, w)| (w.clone(), i as u32)).collect();
        Self { words, index }
    }

    /// Number of entries including the two specials (the embedding's row count).
    pub fn len(&self) -> usize {
        self.words.len()
    }

    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// Words besides the specials.
    pub fn num_words(&self) -> usize {
        self.words.len() - NUM_SPECIALS
    }

    pub fn id(&self, word: &str) -> u32 {
        self.index.get(word).copied().unwrap_or(UNK_ID)
    }

    pub fn get(&self, word: &str) -> Option<u32> {
        self.index.get(word).copied()
    }

    pub fn word(&self, id: u32) -> Option<&str> {
        self.words.get(id as usize).map(String::as_str)
    }

    pub fn words(&self) -> &[String] {
        &self.words
    }

    /// `<size>:<FNV-1a of the words in id order>`: checkpoints record it, so that a model is
    /// never resumed or served with another vocabulary.
    pub fn fingerprint(&self) -> String {
        let mut hash: u64 = 0xCBF2_9CE4_8422_2325;
        for word in &self.words {
            for &b in word.as_bytes().iter().chain(b"\n") {
                hash ^= u64::from(b);
                hash = hash.wrapping_mul(0x0000_0100_0000_01B3);
            }
        }
        format!("{}:{hash:016x}", self.words.len())
    }

    /// One word per line, in id order. Words never contain whitespace, so lines are unambiguous.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut text = String::with_capacity(self.words.iter().map(|w| w.len() + 1).sum());
        for w in &self.words {
            text.push_str(w);
            text.push('\n');
        }
        crate::write_atomically(path, text.as_bytes())
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| DataError::Vocab { path: path.into(), message: e.to_string() })?;
        let words: Vec<String> = text.lines().map(str::to_string).collect();
        Self::from_word_list(words).map_err(|message| DataError::Vocab { path: path.into(), message })
    }

    /// Rebuilds from a word list in id order (file or cache), checking its shape.
    pub fn from_word_list(words: Vec<String>) -> std::result::Result<Self, String> {
        if words.len() < NUM_SPECIALS || words[0] != PAD || words[1] != UNK {
            return Err(format!("must start with {PAD} and {UNK}"));
        }
        let vocab = Self::from_words(words);
        if vocab.index.len() != vocab.words.len() {
            return Err("a word appears twice".into());
        }
        if let Some(w) =
            vocab.words.iter().find(|w| w.is_empty() || w.chars().any(crate::tokenizer::is_python_space))
        {
            return Err(format!("bad entry {w:?}: empty or with whitespace"));
        }
        Ok(vocab)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordered_by_frequency_then_word_with_specials_first() {
        let v = Vocab::from_counts([("b", 3), ("a", 3), ("c", 5), ("rare", 1)], 2, 0);
        assert_eq!(v.words(), ["<pad>", "<unk>", "c", "a", "b"]);
        assert_eq!(v.id("a"), 3);
        assert_eq!(v.id("rare"), UNK_ID);
        assert_eq!(v.num_words(), 3);
        let capped = Vocab::from_counts([("b", 3), ("a", 3), ("c", 5)], 1, 2);
        assert_eq!(capped.words(), ["<pad>", "<unk>", "c", "a"]);
    }

    #[test]
    fn save_load_round_trip_and_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let v = Vocab::from_counts([("x", 2), ("y", 1)], 1, 0);
        let p = dir.path().join("vocab.txt");
        v.save(&p).unwrap();
        assert_eq!(Vocab::load(&p).unwrap(), v);
        std::fs::write(&p, "x\ny\n").unwrap();
        assert!(Vocab::load(&p).unwrap_err().to_string().contains("must start with"));
        std::fs::write(&p, "<pad>\n<unk>\nx\nx\n").unwrap();
        assert!(Vocab::load(&p).unwrap_err().to_string().contains("twice"));
        assert!(Vocab::load(&dir.path().join("missing")).unwrap_err().to_string().contains("missing"));
    }
}
