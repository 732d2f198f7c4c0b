//! The kinds and bounds of `[data]` that both the config (which validates them) and the
//! readers and tokenizers (which act on them) name. They live here, below both, so that
//! imports run one way: `config` and `labelled`/`subword` each import from this module.

use serde::{Deserialize, Serialize};

/// The smallest `data.vocab_size` the config accepts; training also refuses a size that
/// the train split's alphabet alone fills.
pub const MIN_VOCAB_SIZE: usize = 64;
pub const MAX_VOCAB_SIZE: usize = 1_000_000;

/// At most this many classes: a label travels as one byte.
pub const MAX_CLASSES: usize = 256;

/// `data.format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum CorpusFormat {
    /// By the file's extension (`.csv`, `.tsv`, `.jsonl`/`.ndjson`, `.txt`/`.ft` for fastText,
    /// each optionally `.gz`; anything else is read as IMDB's tarball) or the folder's layout
    /// (`aclImdb/` or a folder holding `imdb.vocab` is IMDB's, any other a class-folder tree).
    #[default]
    Auto,
    Imdb,
    Folders,
    Csv,
    Tsv,
    Jsonl,
    Fasttext,
}

impl CorpusFormat {
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Imdb => "imdb",
            Self::Folders => "folders",
            Self::Csv => "csv",
            Self::Tsv => "tsv",
            Self::Jsonl => "jsonl",
            Self::Fasttext => "fasttext",
        }
    }
}

/// `data.invalid_utf8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum InvalidUtf8 {
    #[default]
    Refuse,
    Replace,
}
