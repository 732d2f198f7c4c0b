//! The one typed job configuration: TOML file over defaults, validated once, passed down.
//!
//! Binaries layer their CLI flags over a loaded [`JobConfig`] and call [`JobConfig::validate`]
//! before anything runs; every invalid value is refused with the field's name and its range.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use crate::data_kinds::{CorpusFormat, InvalidUtf8};
use crate::error::ConfigError;

/// Which part of a review to keep when it is longer than `max_len` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Truncation {
    /// Keep the first `max_len` tokens.
    #[default]
    Head,
    /// Keep the last `max_len` tokens.
    Tail,
    /// Keep the first half and the last half.
    Both,
}

/// How training batches are formed from a rank's shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BatchOrder {
    /// The tutorial's batches: consecutive samples of the shuffled shard.
    #[default]
    Unsorted,
    /// Length bucketing: sort by length inside pools of `bucket_pool` batches, then shuffle
    /// the order of the batches.
    Bucketed,
}

/// The classifier head on top of the LSTM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Head {
    /// The tutorial's head: the last layer's final hidden state.
    #[default]
    Last,
    /// ULMFiT's concat pooling: [last state, max over time, mean over time].
    ConcatPool,
}

/// Learning-rate schedule after the optional linear warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    #[default]
    Constant,
    /// Linear decay to zero at the last step.
    Linear,
    /// Cosine decay to zero at the last step.
    Cosine,
}

/// The optimizer of the training step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Optimizer {
    /// `torch.optim.Adam` (eps 1e-8), with `beta1`, `beta2` and `weight_decay`.
    #[default]
    Adam,
    /// `torch.optim.AdamW`: Adam with decoupled weight decay, `p *= 1 - lr * weight_decay`
    /// before the update, instead of adding `weight_decay * p` to the gradient.
    #[serde(rename = "adamw")]
    AdamW,
    /// `torch.optim.SGD` without momentum: `p -= lr * (g + weight_decay * p)`. Its update is
    /// linear in the gradient, so runs that differ only in float summation order stay close
    /// (the equivalence tests of different world sizes use it).
    Sgd,
}

impl Optimizer {
    /// The name a config file uses.
    pub fn name(self) -> &'static str {
        match self {
            Self::Adam => "adam",
            Self::AdamW => "adamw",
            Self::Sgd => "sgd",
        }
    }
}

/// How reviews become tokens (issue 21).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TokenizerKind {
    /// torchtext's `basic_english` words and a word vocabulary (`min_freq`, `max_vocab`).
    #[default]
    BasicEnglish,
    /// Byte-pair encoding trained on the train split (`vocab_size`, `min_frequency`).
    Bpe,
    /// A Unigram language model trained on the train split (`vocab_size`).
    Unigram,
}

impl TokenizerKind {
    pub const NAMES: &'static str = "basic_english, bpe or unigram";

    pub fn name(self) -> &'static str {
        match self {
            Self::BasicEnglish => "basic_english",
            Self::Bpe => "bpe",
            Self::Unigram => "unigram",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [Self::BasicEnglish, Self::Bpe, Self::Unigram].into_iter().find(|k| k.name() == name)
    }

    pub fn is_basic_english(&self) -> bool {
        *self == Self::BasicEnglish
    }
}

// By hand, so that an unknown name is refused with the field's name and the allowed ones.
impl<'de> Deserialize<'de> for TokenizerKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        Self::from_name(&name).ok_or_else(|| {
            serde::de::Error::custom(format!("data.tokenizer must be {}, got {name:?}", Self::NAMES))
        })
    }
}

pub const DEFAULT_VOCAB_SIZE: usize = 16_000;
pub const DEFAULT_MIN_FREQUENCY: u64 = 2;

fn is_default_vocab_size(v: &usize) -> bool {
    *v == DEFAULT_VOCAB_SIZE
}

fn is_default_min_frequency(v: &u64) -> bool {
    *v == DEFAULT_MIN_FREQUENCY
}

// The subword fields are left out of the TOML when they hold their defaults, so that a
// `basic_english` job's resolved config.toml (and its checkpoints' same-job check) is
// what it was before they existed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// `basic_english` (the default), `bpe` or `unigram`.
    #[serde(skip_serializing_if = "TokenizerKind::is_basic_english")]
    pub tokenizer: TokenizerKind,
    /// Subword tokenizers: the vocabulary size, the specials `<pad>` and `<unk>` included.
    #[serde(skip_serializing_if = "is_default_vocab_size")]
    pub vocab_size: usize,
    /// `bpe`: a pair of tokens seen fewer times than this in the train split is never merged.
    #[serde(skip_serializing_if = "is_default_min_frequency")]
    pub min_frequency: u64,
    /// Words seen fewer times than this in the train split map to `<unk>`.
    pub min_freq: u32,
    /// Keep at most this many words (besides the specials); 0 keeps all.
    pub max_vocab: usize,
    /// Truncate reviews longer than this many tokens; 0 keeps whole reviews.
    pub max_len: usize,
    pub truncation: Truncation,
    /// Share of the train split held out for validation (seeded).
    pub val_fraction: f64,
    /// Use only this many train reviews (a seeded, label-balanced subset); 0 uses all.
    pub train_subset: usize,
    /// Use only this many test reviews (a seeded, label-balanced subset); 0 uses all.
    pub test_subset: usize,
    // The fields below read corpora of other formats (`labelled.rs`); each is left out of a
    // written config while it has its default, so that an IMDB job's config is as before.
    /// The corpus when `--data` is not given: IMDB's tarball or folder, a folder of class
    /// folders, or a CSV, TSV, JSONL or fastText file (each optionally `.gz`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// `auto` (by the file's extension or the folder's layout), `imdb`, `folders`, `csv`,
    /// `tsv`, `jsonl` or `fasttext`.
    #[serde(skip_serializing_if = "is_default")]
    pub format: CorpusFormat,
    /// The column (CSV, TSV) or key (JSONL) that holds the text.
    #[serde(skip_serializing_if = "is_text")]
    pub text_column: String,
    /// The column or key that holds the label (a string or an integer).
    #[serde(skip_serializing_if = "is_label")]
    pub label_column: String,
    /// A separate test file or folder (for the formats other than IMDB's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_data: Option<PathBuf>,
    /// Without test data, this share of each class of the train data is held out as the
    /// test split (seeded by `train.seed`).
    #[serde(skip_serializing_if = "is_default")]
    pub test_fraction: f64,
    /// Text that is not valid UTF-8: `refuse` (an error naming the first line and the count)
    /// or `replace` (decoded with U+FFFD, and counted). IMDB's layout is always decoded lossily.
    #[serde(skip_serializing_if = "is_default")]
    pub invalid_utf8: InvalidUtf8,
}

fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

fn is_text(value: &str) -> bool {
    value == "text"
}

fn is_label(value: &str) -> bool {
    value == "label"
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            tokenizer: TokenizerKind::BasicEnglish,
            vocab_size: DEFAULT_VOCAB_SIZE,
            min_frequency: DEFAULT_MIN_FREQUENCY,
            min_freq: 1,
            max_vocab: 0,
            max_len: 0,
            truncation: Truncation::Head,
            val_fraction: 0.1,
            train_subset: 0,
            test_subset: 0,
            path: None,
            format: CorpusFormat::Auto,
            text_column: "text".to_string(),
            label_column: "label".to_string(),
            test_data: None,
            test_fraction: 0.0,
            invalid_utf8: InvalidUtf8::Refuse,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    pub embed_dim: usize,
    pub hidden: usize,
    pub layers: usize,
    /// Dropout on the features that the linear head reads.
    pub dropout: f64,
    pub head: Head,
    /// A bidirectional LSTM (`nn.LSTM(bidirectional=True)`, parameters `*_reverse`): the
    /// head reads both directions. Needs one window per batch (`train.bptt = 0`), since the
    /// reverse direction starts at each review's end.
    pub bidirectional: bool,
    /// Word dropout (AWD-LSTM's embedding dropout): each batch drops whole rows of the
    /// embedding matrix with this probability, so a dropped word is zero everywhere in it.
    pub embedding_dropout: f64,
    /// Variational (locked) dropout: one mask per review, the same at every time step, on
    /// the LSTM's input and between its layers.
    pub variational_dropout: f64,
    /// DropConnect on the hidden-to-hidden weights (AWD-LSTM's weight drop): one mask per
    /// batch, applied to `weight_hh` before the fused LSTM call.
    pub weight_drop: f64,
    /// Outputs of the head, one per class. Set from the corpus' classes when it is read
    /// (`labels.json` in the run folder names them); a config need not give it.
    #[serde(skip_serializing_if = "is_two")]
    pub num_classes: usize,
}

fn is_two(value: &usize) -> bool {
    *value == 2
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            embed_dim: 128,
            hidden: 256,
            layers: 2,
            dropout: 0.5,
            head: Head::Last,
            bidirectional: false,
            embedding_dropout: 0.0,
            variational_dropout: 0.0,
            weight_drop: 0.0,
            num_classes: 2,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Per-rank batch size, when `global_batch_size` is unset.
    pub batch_size: usize,
    /// Samples per optimizer step over all ranks, the same at every world size (0: unset,
    /// then `world size × batch_size`). Each rank takes its share, one sample apart at most,
    /// and its gradient is weighted by that share (`shard::share`).
    #[serde(skip_serializing_if = "is_default")]
    pub global_batch_size: usize,
    pub epochs: usize,
    /// `adam` (the default) or `sgd`; `beta1` and `beta2` apply to Adam only.
    pub optimizer: Optimizer,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    /// Label smoothing of the cross-entropy (`nn.CrossEntropyLoss(label_smoothing=...)`).
    pub label_smoothing: f64,
    /// Clip gradients to this global L2 norm; 0 disables clipping.
    pub clip_norm: f64,
    /// Linear warm-up steps before the schedule.
    pub warmup_steps: usize,
    pub schedule: Schedule,
    /// Truncated BPTT window in time steps; 0 is full BPTT.
    pub bptt: usize,
    pub batch_order: BatchOrder,
    /// Batches per length-sorting pool when `batch_order = "bucketed"`.
    pub bucket_pool: usize,
    /// bf16 autocast on CUDA.
    pub amp: bool,
    pub seed: u64,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// Stop when validation accuracy has not improved for this many epochs; 0 never stops early.
    pub early_stopping_patience: usize,
    /// Log training loss every this many steps.
    pub log_every: usize,
    /// Stop each epoch after this many steps (0: the whole epoch). For benchmarks and tests.
    pub max_steps_per_epoch: usize,
    /// Evaluation batch size.
    pub eval_batch_size: usize,
    /// libtorch CPU threads per process (0: libtorch's default, one per core). On a small,
    /// shared CPU one thread avoids OpenMP spinning against other processes.
    pub threads: usize,
}

impl TrainConfig {
    /// The samples of one optimizer step over `world_size` ranks.
    pub fn global_batch(&self, world_size: usize) -> usize {
        if self.global_batch_size > 0 {
            self.global_batch_size
        } else {
            world_size * self.batch_size
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            batch_size: 32,
            global_batch_size: 0,
            epochs: 5,
            optimizer: Optimizer::Adam,
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            weight_decay: 0.0,
            label_smoothing: 0.0,
            clip_norm: 0.0,
            warmup_steps: 0,
            schedule: Schedule::Constant,
            bptt: 0,
            batch_order: BatchOrder::Unsorted,
            bucket_pool: 100,
            amp: false,
            seed: 0,
            device: "auto".to_string(),
            early_stopping_patience: 0,
            log_every: 50,
            max_steps_per_epoch: 0,
            eval_batch_size: 256,
            threads: 0,
        }
    }
}

/// How often a distributed job checkpoints, besides every epoch end. Not part of what makes
/// two runs "the same job": it never changes a result, so a resumed job may change it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Also checkpoint every this many optimizer steps (0: not by step count).
    pub every_steps: u64,
    /// Also checkpoint when this many seconds of training passed since the last one
    /// (0: not by time).
    pub every_seconds: f64,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self { every_steps: 0, every_seconds: 600.0 }
    }
}

/// The whole job's settings. The defaults are the tutorial's recipe (`configs/seed.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct JobConfig {
    pub data: DataConfig,
    pub model: ModelConfig,
    pub train: TrainConfig,
    pub checkpoint: CheckpointConfig,
}

fn check(
    ok: bool,
    field: &'static str,
    allowed: &str,
    value: impl std::fmt::Display,
) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError::OutOfRange { field, allowed: allowed.to_string(), value: value.to_string() })
    }
}

/// Parses a device string: `auto`, `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(device: &str) -> Result<DeviceSpec, ConfigError> {
    match device {
        "auto" => Ok(DeviceSpec::Auto),
        "cpu" => Ok(DeviceSpec::Cpu),
        "cuda" => Ok(DeviceSpec::Cuda(0)),
        other => other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .map(DeviceSpec::Cuda)
            .ok_or_else(|| ConfigError::OutOfRange {
                field: "train.device",
                allowed: "auto, cpu, cuda or cuda:N".to_string(),
                value: other.to_string(),
            }),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Auto,
    Cpu,
    Cuda(usize),
}

impl JobConfig {
    /// Reads a TOML file; unknown keys are refused so that a typo never goes unnoticed.
    pub fn from_toml_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_path_buf(), cause: source })?;
        Self::from_toml_str(&text, path)
    }

    /// Parses config TOML (`source` names it in errors): the parser of config files and
    /// of the job config a coordinator sends its workers, and the entry point of the fuzz
    /// target `config_toml`. Any text gives a config or a one-line [`ConfigError::Parse`]
    /// with the line number; it does not validate ([`JobConfig::validate`] does).
    pub fn from_toml_str(text: &str, source: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| {
            // toml's Display spans several lines with a snippet; keep the error on one line.
            // Count newlines in bytes: a span need not fall on a character boundary.
            let line = e.span().map(|s| {
                text.as_bytes()[..s.start.min(text.len())].iter().filter(|&&b| b == b'\n').count() + 1
            });
            let message = match line {
                Some(line) => format!("line {line}: {}", e.message().trim()),
                None => e.message().trim().to_string(),
            };
            ConfigError::Parse { path: source.to_path_buf(), message: message.replace('\n', " ") }
        })
    }

    pub fn to_toml(&self) -> String {
        // Serialising plain structs of numbers, strings and enums cannot fail.
        toml::to_string_pretty(self).unwrap_or_default()
    }

    /// Where two configs make different jobs, as `section.field: ours vs theirs`; empty
    /// for the same job. `[checkpoint]` is left out: how often a job checkpoints never
    /// changes its results, so a resumed job may change it.
    pub fn job_differences(&self, theirs: &JobConfig) -> Vec<String> {
        let flat = |c: &JobConfig| -> Vec<(String, String)> {
            let Ok(toml::Value::Table(root)) = toml::Value::try_from(c) else { return Vec::new() };
            let mut out = Vec::new();
            for (section, value) in root.into_iter().filter(|(k, _)| k != "checkpoint") {
                if let toml::Value::Table(fields) = value {
                    out.extend(
                        fields
                            .into_iter()
                            .map(|(k, v)| (format!("{section}.{k}"), v.to_string()))
                            // Where the files lie is not what makes a job: the corpus
                            // checksum (compared beside the config) is.
                            .filter(|(k, _)| k != "data.path" && k != "data.test_data"),
                    );
                }
            }
            out.sort();
            out
        };
        let (ours, other) = (flat(self), flat(theirs));
        let mut keys: Vec<&String> = ours.iter().chain(&other).map(|(k, _)| k).collect();
        keys.sort();
        keys.dedup();
        let get = |list: &[(String, String)], k: &str| {
            list.iter().find(|(key, _)| key == k).map_or("(unset)".to_string(), |(_, v)| v.clone())
        };
        keys.into_iter()
            .filter_map(|k| {
                let (a, b) = (get(&ours, k), get(&other, k));
                (a != b).then(|| format!("{k}: {a} vs {b}"))
            })
            .collect()
    }

    /// Checks every value once; the error names the field and the allowed range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let d = &self.data;
        check(d.min_freq >= 1, "data.min_freq", "at least 1", d.min_freq)?;
        check(
            (crate::data_kinds::MIN_VOCAB_SIZE..=crate::data_kinds::MAX_VOCAB_SIZE).contains(&d.vocab_size),
            "data.vocab_size",
            &format!("{}..={}", crate::data_kinds::MIN_VOCAB_SIZE, crate::data_kinds::MAX_VOCAB_SIZE),
            d.vocab_size,
        )?;
        check(d.min_frequency >= 1, "data.min_frequency", "at least 1", d.min_frequency)?;
        check(
            d.val_fraction >= 0.0 && d.val_fraction < 1.0,
            "data.val_fraction",
            "0 <= x < 1",
            d.val_fraction,
        )?;
        check(
            d.test_fraction >= 0.0 && d.test_fraction < 1.0,
            "data.test_fraction",
            "0 <= x < 1",
            d.test_fraction,
        )?;
        check(!d.text_column.is_empty(), "data.text_column", "a column name", "\"\"")?;
        check(!d.label_column.is_empty(), "data.label_column", "a column name", "\"\"")?;
        check(
            d.text_column != d.label_column,
            "data.label_column",
            "another column than data.text_column",
            &d.label_column,
        )?;
        let m = &self.model;
        check((1..=4096).contains(&m.embed_dim), "model.embed_dim", "1..=4096", m.embed_dim)?;
        check((1..=8192).contains(&m.hidden), "model.hidden", "1..=8192", m.hidden)?;
        check((1..=16).contains(&m.layers), "model.layers", "1..=16", m.layers)?;
        check((0.0..1.0).contains(&m.dropout), "model.dropout", "0 <= x < 1", m.dropout)?;
        check(
            (2..=crate::data_kinds::MAX_CLASSES).contains(&m.num_classes),
            "model.num_classes",
            "2..=256",
            m.num_classes,
        )?;
        for (field, p) in [
            ("model.embedding_dropout", m.embedding_dropout),
            ("model.variational_dropout", m.variational_dropout),
            ("model.weight_drop", m.weight_drop),
        ] {
            check((0.0..1.0).contains(&p), field, "0 <= x < 1", p)?;
        }
        let t = &self.train;
        if m.bidirectional && t.bptt != 0 && (self.data.max_len == 0 || t.bptt < self.data.max_len) {
            return Err(ConfigError::OutOfRange {
                field: "train.bptt",
                allowed: "0 (or at least data.max_len) with model.bidirectional = true: the reverse \
                          direction starts at each review's end, so a batch runs in one window"
                    .to_string(),
                value: t.bptt.to_string(),
            });
        }
        check(
            (0.0..1.0).contains(&t.label_smoothing),
            "train.label_smoothing",
            "0 <= x < 1",
            t.label_smoothing,
        )?;
        check((1..=65536).contains(&t.batch_size), "train.batch_size", "1..=65536", t.batch_size)?;
        check(
            t.global_batch_size <= 1 << 24,
            "train.global_batch_size",
            "0..=16777216 (0: world size × batch_size)",
            t.global_batch_size,
        )?;
        check((1..=10000).contains(&t.epochs), "train.epochs", "1..=10000", t.epochs)?;
        check(t.lr > 0.0 && t.lr < 10.0, "train.lr", "0 < x < 10", t.lr)?;
        check((0.0..1.0).contains(&t.beta1), "train.beta1", "0 <= x < 1", t.beta1)?;
        check((0.0..1.0).contains(&t.beta2), "train.beta2", "0 <= x < 1", t.beta2)?;
        check(t.weight_decay >= 0.0, "train.weight_decay", "x >= 0", t.weight_decay)?;
        check(t.clip_norm >= 0.0, "train.clip_norm", "x >= 0 (0 disables)", t.clip_norm)?;
        check(t.bucket_pool >= 1, "train.bucket_pool", "at least 1", t.bucket_pool)?;
        check(t.log_every >= 1, "train.log_every", "at least 1", t.log_every)?;
        check(t.eval_batch_size >= 1, "train.eval_batch_size", "at least 1", t.eval_batch_size)?;
        check(t.threads <= 1024, "train.threads", "0..=1024 (0: libtorch's default)", t.threads)?;
        let k = &self.checkpoint;
        check(
            k.every_seconds.is_finite() && (0.0..=86_400.0 * 7.0).contains(&k.every_seconds),
            "checkpoint.every_seconds",
            "0..=604800 (0: not by time)",
            k.every_seconds,
        )?;
        parse_device(&t.device)?;
        Ok(())
    }
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
