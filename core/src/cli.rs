//! Flags shared by the `coordinator` and `worker` binaries: where the corpus comes from, and
//! the config file with per-flag overrides. Every flag can also come from an env var.

use std::path::PathBuf;

use clap::Args;

use crate::config::{BatchOrder, JobConfig, TokenizerKind};
use crate::corpus::{DownloadSpec, OFFICIAL_MD5, OFFICIAL_SHA256, OFFICIAL_URL};
use crate::error::ConfigError;
use crate::labelled::{CorpusFormat, FormatOptions, InvalidUtf8};
use crate::pipeline::{default_cache_dir, PrepareOptions};

#[derive(Debug, Clone, Args)]
pub struct DataArgs {
    /// The corpus: the official aclImdb_v1.tar.gz, an extracted aclImdb/ folder, or nothing
    /// to download the official tarball into the cache folder.
    #[arg(long, env = "IMDB_DATA")]
    pub data: Option<PathBuf>,
    /// Where the tarball is downloaded from when --data is not given.
    #[arg(long, env = "IMDB_URL", default_value = OFFICIAL_URL)]
    pub data_url: String,
    /// Expected sha256 of the downloaded tarball (change only for a mirror of another file).
    #[arg(long, env = "IMDB_SHA256", default_value = OFFICIAL_SHA256)]
    pub data_sha256: String,
    /// Expected md5 of the downloaded tarball.
    #[arg(long, env = "IMDB_MD5", default_value = OFFICIAL_MD5)]
    pub data_md5: String,
    /// Folder for the downloaded tarball and the encoded-corpus cache
    /// [default: $XDG_CACHE_HOME/imdb-ddp or ~/.cache/imdb-ddp].
    #[arg(long, env = "IMDB_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Neither read nor write the encoded-corpus cache.
    #[arg(long, env = "IMDB_NO_CACHE")]
    pub no_cache: bool,
    /// The format of --data (data.format): auto (by extension or folder layout), imdb,
    /// folders, csv, tsv, jsonl or fasttext.
    #[arg(long, env = "TRAINER_DATA_FORMAT", value_enum)]
    pub format: Option<CorpusFormat>,
    /// CSV/TSV column or JSONL key of the text (data.text_column) [config default: text].
    #[arg(long, env = "TRAINER_TEXT_COLUMN")]
    pub text_column: Option<String>,
    /// CSV/TSV column or JSONL key of the label (data.label_column) [config default: label].
    #[arg(long, env = "TRAINER_LABEL_COLUMN")]
    pub label_column: Option<String>,
    /// A separate test file or folder (data.test_data).
    #[arg(long, env = "TRAINER_TEST_DATA")]
    pub test_data: Option<PathBuf>,
    /// Without test data: hold out this share of each class as the test split, seeded
    /// (data.test_fraction).
    #[arg(long, env = "TRAINER_TEST_FRACTION")]
    pub test_fraction: Option<f64>,
    /// Text that is not UTF-8: refuse (the default) or replace with U+FFFD (data.invalid_utf8).
    #[arg(long, env = "TRAINER_INVALID_UTF8", value_enum)]
    pub invalid_utf8: Option<InvalidUtf8>,
}

impl DataArgs {
    /// The config with the format flags applied over its `[data]` section, validated again:
    /// the one config that is recorded, sent to workers and read by [`Self::prepare_options`].
    pub fn configure(&self, mut config: JobConfig) -> Result<JobConfig, ConfigError> {
        let d = &mut config.data;
        if let Some(v) = self.format {
            d.format = v;
        }
        if let Some(v) = &self.text_column {
            d.text_column = v.clone();
        }
        if let Some(v) = &self.label_column {
            d.label_column = v.clone();
        }
        if let Some(v) = &self.test_data {
            d.test_data = Some(v.clone());
        }
        if let Some(v) = self.test_fraction {
            d.test_fraction = v;
        }
        if let Some(v) = self.invalid_utf8 {
            d.invalid_utf8 = v;
        }
        config.validate()?;
        Ok(config)
    }

    pub fn prepare_options(&self, config: &JobConfig) -> PrepareOptions {
        let cache_dir = self.cache_dir.clone().unwrap_or_else(default_cache_dir);
        PrepareOptions {
            data: self.data.clone().or_else(|| config.data.path.clone()),
            download: DownloadSpec {
                url: self.data_url.clone(),
                md5: self.data_md5.clone(),
                sha256: self.data_sha256.clone(),
                cache_dir,
            },
            use_cache: !self.no_cache,
            min_freq: config.data.min_freq,
            max_vocab: config.data.max_vocab,
            tokenizer: crate::subword::TokenizerSettings::from_config(&config.data),
            labelled: FormatOptions::of(config),
        }
    }
}

/// `--config FILE` and the overrides most often changed from the command line.
#[derive(Debug, Clone, Args, Default)]
pub struct ConfigArgs {
    /// TOML job config (see configs/); flags below override its values.
    #[arg(long, env = "TRAINER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Words seen fewer times in the train split map to <unk> (at least 1).
    #[arg(long, env = "TRAINER_MIN_FREQ")]
    pub min_freq: Option<u32>,
    /// Keep at most this many words besides the specials (0: all).
    #[arg(long, env = "TRAINER_MAX_VOCAB")]
    pub max_vocab: Option<usize>,
    /// basic_english (words), bpe or unigram (subword, trained on the train split).
    #[arg(long, env = "TRAINER_TOKENIZER", value_parser = parse_tokenizer)]
    pub tokenizer: Option<TokenizerKind>,
    /// Subword tokenizers: the vocabulary size, specials included [config default: 16000].
    #[arg(long, env = "TRAINER_VOCAB_SIZE")]
    pub vocab_size: Option<usize>,
    /// Truncate reviews to this many tokens (0: no limit).
    #[arg(long, env = "TRAINER_MAX_LEN")]
    pub max_len: Option<usize>,
    /// Held-out share of the train split for validation.
    #[arg(long, env = "TRAINER_VAL_FRACTION")]
    pub val_fraction: Option<f64>,
    /// Train on a label-balanced subset of this many reviews (0: all).
    #[arg(long, env = "TRAINER_TRAIN_SUBSET")]
    pub train_subset: Option<usize>,
    /// Evaluate on a label-balanced subset of this many test reviews (0: all).
    #[arg(long, env = "TRAINER_TEST_SUBSET")]
    pub test_subset: Option<usize>,
    /// Per-rank batch size (when --global-batch-size is unset).
    #[arg(long, env = "TRAINER_BATCH_SIZE")]
    pub batch_size: Option<usize>,
    /// Samples per optimizer step over all workers, the same at any world size; each worker
    /// takes its share (0: world size × --batch-size).
    #[arg(long, env = "TRAINER_GLOBAL_BATCH_SIZE")]
    pub global_batch_size: Option<usize>,
    #[arg(long, env = "TRAINER_EPOCHS")]
    pub epochs: Option<usize>,
    #[arg(long, env = "TRAINER_LR")]
    pub lr: Option<f64>,
    /// Truncated-BPTT window in time steps (0: full BPTT).
    #[arg(long, env = "TRAINER_BPTT")]
    pub bptt: Option<usize>,
    /// unsorted (the tutorial's) or bucketed (by length).
    #[arg(long, env = "TRAINER_BATCH_ORDER", value_parser = parse_batch_order)]
    pub batch_order: Option<BatchOrder>,
    #[arg(long, env = "TRAINER_SEED")]
    pub seed: Option<u64>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, env = "TRAINER_DEVICE")]
    pub device: Option<String>,
    /// bf16 autocast (CUDA only).
    #[arg(long, env = "TRAINER_AMP")]
    pub amp: Option<bool>,
    /// Stop each epoch after this many steps (0: whole epochs).
    #[arg(long, env = "TRAINER_MAX_STEPS_PER_EPOCH")]
    pub max_steps_per_epoch: Option<usize>,
    /// Distributed jobs: also checkpoint every this many optimizer steps (0: not by count).
    #[arg(long, env = "TRAINER_CHECKPOINT_EVERY_STEPS")]
    pub checkpoint_every_steps: Option<u64>,
    /// Distributed jobs: also checkpoint after this many seconds of training since the last
    /// checkpoint (0: not by time) [config default: 600].
    #[arg(long, env = "TRAINER_CHECKPOINT_EVERY_SECONDS")]
    pub checkpoint_every_seconds: Option<f64>,
}

/// A duration flag given in seconds (`--heartbeat-timeout 10`): more than 0, at most a day.
/// `flag` is its name without the dashes.
pub fn seconds_flag(flag: &str, value: f64) -> Result<std::time::Duration, String> {
    if value > 0.0 && value <= 86_400.0 {
        Ok(std::time::Duration::from_secs_f64(value))
    } else {
        Err(format!("--{flag} must be between 0 and 86400 seconds, got {value}"))
    }
}

/// Parses the command line as `P::parse()` does, except that a flag's env var set to the
/// empty string counts as unset, as shells and Make treat it: `IMDB_DATA= coordinator` (or
/// a Makefile exporting an empty `IMDB_DATA`) means "no --data", not "--data with no value".
pub fn parse_treating_empty_env_as_unset<P: clap::Parser>() -> P {
    let command = P::command();
    let mut names = Vec::new();
    collect_env_names(&command, &mut names);
    for name in names {
        if std::env::var_os(&name).is_some_and(|v| v.is_empty()) {
            // Called first thing in main, before any other thread exists.
            std::env::remove_var(&name);
        }
    }
    P::parse()
}

fn collect_env_names(command: &clap::Command, names: &mut Vec<std::ffi::OsString>) {
    names.extend(command.get_arguments().filter_map(|a| a.get_env()).map(|n| n.to_os_string()));
    for sub in command.get_subcommands() {
        collect_env_names(sub, names);
    }
}

fn parse_tokenizer(s: &str) -> Result<TokenizerKind, String> {
    TokenizerKind::from_name(s).ok_or_else(|| format!("must be {}, got {s}", TokenizerKind::NAMES))
}

fn parse_batch_order(s: &str) -> Result<BatchOrder, String> {
    match s {
        "unsorted" => Ok(BatchOrder::Unsorted),
        "bucketed" => Ok(BatchOrder::Bucketed),
        other => Err(format!("must be unsorted or bucketed, got {other}")),
    }
}

impl ConfigArgs {
    /// The config file (or the defaults) with the flags applied, validated.
    pub fn resolve(&self) -> Result<JobConfig, ConfigError> {
        let mut c = match &self.config {
            Some(path) => JobConfig::from_toml_file(path)?,
            None => JobConfig::default(),
        };
        macro_rules! set {
            ($flag:ident => $($field:tt)+) => {
                if let Some(v) = self.$flag.clone() {
                    c.$($field)+ = v;
                }
            };
        }
        set!(min_freq => data.min_freq);
        set!(max_vocab => data.max_vocab);
        set!(tokenizer => data.tokenizer);
        set!(vocab_size => data.vocab_size);
        set!(max_len => data.max_len);
        set!(val_fraction => data.val_fraction);
        set!(train_subset => data.train_subset);
        set!(test_subset => data.test_subset);
        set!(batch_size => train.batch_size);
        set!(global_batch_size => train.global_batch_size);
        set!(epochs => train.epochs);
        set!(lr => train.lr);
        set!(bptt => train.bptt);
        set!(batch_order => train.batch_order);
        set!(seed => train.seed);
        set!(device => train.device);
        set!(amp => train.amp);
        set!(max_steps_per_epoch => train.max_steps_per_epoch);
        set!(checkpoint_every_steps => checkpoint.every_steps);
        set!(checkpoint_every_seconds => checkpoint.every_seconds);
        c.validate()?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_and_are_validated() {
        let args = ConfigArgs { batch_size: Some(64), min_freq: Some(3), ..Default::default() };
        let c = args.resolve().unwrap();
        assert_eq!((c.train.batch_size, c.data.min_freq), (64, 3));
        let bad = ConfigArgs { min_freq: Some(0), ..Default::default() };
        assert!(bad.resolve().unwrap_err().to_string().contains("data.min_freq"));
    }

    #[test]
    fn env_names_are_collected_from_subcommands_too() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            data: DataArgs,
            #[command(subcommand)]
            command: Option<Sub>,
        }
        #[derive(clap::Subcommand)]
        enum Sub {
            Run {
                #[arg(long, env = "TEST_ONLY_NESTED_ENV")]
                nested: Option<String>,
            },
        }
        let mut names = Vec::new();
        collect_env_names(&<Cli as clap::CommandFactory>::command(), &mut names);
        assert!(names.iter().any(|n| n == "IMDB_DATA"), "{names:?}");
        assert!(names.iter().any(|n| n == "TEST_ONLY_NESTED_ENV"), "{names:?}");
    }

    #[test]
    fn seconds_flags_are_positive_and_bounded() {
        assert_eq!(seconds_flag("t", 1.5).unwrap(), std::time::Duration::from_millis(1500));
        for bad in [0.0, -1.0, 86_401.0, f64::NAN] {
            assert_eq!(
                seconds_flag("t", bad).unwrap_err(),
                format!("--t must be between 0 and 86400 seconds, got {bad}")
            );
        }
    }
}
