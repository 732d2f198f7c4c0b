//! Labelled text corpora besides IMDB's layout: a folder of class folders (Keras'
//! `text_dataset_from_directory`), CSV, TSV and JSONL files with a text and a label column,
//! and fastText's supervised format (`__label__<class> text`), each file optionally `.gz`.
//!
//! Every reader gives the same [`RawCorpus`] as IMDB's: the classes are the train data's
//! labels, sorted (numerically when every label is an integer), and a label's id is its
//! index in that list; examples keep the order of the file (class folders: by class, then
//! by file name), so a corpus converted to any format in the same order encodes to the same
//! bits. The test split is `data.test_data`, the folder's own `test/`, or a seeded,
//! stratified `data.test_fraction` of the train data. Files are read as streams (a `.gz`
//! through its decoder), never whole into memory.
//!
//! The corpus checksum hashes the bytes read and every option that changes what is read
//! (format, columns, UTF-8 policy, the hold-out and its seed), so it also keys the cache.

mod folders;
mod records;
mod stream;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use sha2::{Digest, Sha256};

use crate::config::JobConfig;
use crate::corpus::{RawCorpus, Review};
use crate::error::{ConfigError, DataError, Result};

pub use crate::data_kinds::{CorpusFormat, InvalidUtf8, MAX_CLASSES};

/// What of `[data]` (and `train.seed`) the readers need.
#[derive(Debug, Clone, PartialEq)]
pub struct FormatOptions {
    pub format: CorpusFormat,
    pub text_column: String,
    pub label_column: String,
    pub test_data: Option<PathBuf>,
    pub test_fraction: f64,
    pub seed: u64,
    pub invalid_utf8: InvalidUtf8,
}

impl Default for FormatOptions {
    fn default() -> Self {
        Self::of(&JobConfig::default())
    }
}

impl FormatOptions {
    pub fn of(config: &JobConfig) -> Self {
        let d = &config.data;
        Self {
            format: d.format,
            text_column: d.text_column.clone(),
            label_column: d.label_column.clone(),
            test_data: d.test_data.clone(),
            test_fraction: d.test_fraction,
            seed: config.train.seed,
            invalid_utf8: d.invalid_utf8,
        }
    }
}

pub(crate) use stream::{checksum as streamed_checksum, read_encoded, streams};

/// A corpus source that is not IMDB's layout: its concrete format and path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    pub format: CorpusFormat,
    pub path: PathBuf,
}

/// The format of `path`: `None` for IMDB's layout (read by `corpus.rs` as before).
pub fn detect(path: &Path, options: &FormatOptions) -> Result<Option<Input>> {
    let format = resolve_format(path, options.format)?;
    if format == CorpusFormat::Imdb {
        if options.test_data.is_some() || options.test_fraction > 0.0 {
            return Err(DataError::Config(ConfigError::OutOfRange {
                field: if options.test_data.is_some() { "data.test_data" } else { "data.test_fraction" },
                allowed: "unset for IMDB's layout, which has its own test split".into(),
                value: path.display().to_string(),
            }));
        }
        return Ok(None);
    }
    Ok(Some(Input { format, path: path.to_path_buf() }))
}

fn resolve_format(path: &Path, format: CorpusFormat) -> Result<CorpusFormat> {
    let meta = std::fs::metadata(path).map_err(|cause| {
        if cause.kind() == std::io::ErrorKind::NotFound {
            DataError::NotFound { path: path.to_path_buf() }
        } else {
            DataError::Io { path: path.to_path_buf(), cause }
        }
    })?;
    if format != CorpusFormat::Auto {
        let folder_format = matches!(format, CorpusFormat::Imdb | CorpusFormat::Folders);
        if meta.is_dir() && !folder_format {
            return Err(DataError::BadCorpus {
                path: path.to_path_buf(),
                message: format!("is a folder, but the format is {}", format.name()),
            });
        }
        if !meta.is_dir() && format == CorpusFormat::Folders {
            return Err(DataError::BadCorpus {
                path: path.to_path_buf(),
                message: "is a file, but the format is folders".into(),
            });
        }
        return Ok(format);
    }
    if meta.is_dir() {
        let imdb = path.file_name().is_some_and(|n| n == "aclImdb")
            || path.join("aclImdb").is_dir()
            || path.join("imdb.vocab").is_file();
        return Ok(if imdb { CorpusFormat::Imdb } else { CorpusFormat::Folders });
    }
    Ok(format_of_name(path))
}

/// The format a file name says; IMDB's tarball for any other name (as before).
fn format_of_name(path: &Path) -> CorpusFormat {
    let name = path.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
    let name = name.strip_suffix(".gz").unwrap_or(&name);
    match name.rsplit_once('.').map(|(_, ext)| ext) {
        Some("csv") => CorpusFormat::Csv,
        Some("tsv") | Some("tab") => CorpusFormat::Tsv,
        Some("jsonl") | Some("ndjson") => CorpusFormat::Jsonl,
        Some("txt") | Some("ft") => CorpusFormat::Fasttext,
        _ => CorpusFormat::Imdb,
    }
}

/// One example as read: its label's text, its text, and where it is (a 1-based line, or
/// for class folders the index of its file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Example {
    pub line: u64,
    pub label: String,
    pub text: String,
}

/// What one file or folder gave.
pub(crate) struct Part {
    pub path: PathBuf,
    pub examples: Vec<Example>,
    /// sha256 of the bytes read.
    pub digest: String,
    /// `(count, first place)` of the examples decoded lossily.
    pub lossy: Vec<String>,
}

/// Reads a corpus of another format than IMDB's, with its test split.
pub fn read(input: &Input, options: &FormatOptions) -> Result<RawCorpus> {
    let (train, own_test) = read_part(input, options)?;
    let test = match &options.test_data {
        Some(path) => {
            let Some(test_input) =
                detect(path, &FormatOptions { test_data: None, test_fraction: 0.0, ..options.clone() })?
            else {
                return Err(DataError::BadCorpus {
                    path: path.clone(),
                    message: "IMDB's layout cannot be the test data of another format".into(),
                });
            };
            if options.test_fraction > 0.0 {
                return Err(both_test_sources(path));
            }
            let (test, _) = read_part(&test_input, options)?;
            Some(test)
        }
        None => {
            if own_test.is_some() && options.test_fraction > 0.0 {
                return Err(both_test_sources(&input.path.join("test")));
            }
            own_test
        }
    };
    build(input, train, test, options)
}

fn both_test_sources(path: &Path) -> DataError {
    DataError::Config(ConfigError::OutOfRange {
        field: "data.test_fraction",
        allowed: "0 when the test split is given".into(),
        value: format!("a fraction and {}", path.display()),
    })
}

fn read_part(input: &Input, options: &FormatOptions) -> Result<(Part, Option<Part>)> {
    match input.format {
        CorpusFormat::Folders => folders::read(&input.path, options),
        format => Ok((records::read(&input.path, format, options)?, None)),
    }
}

/// Sorted class names: numerically when every one is an integer, else by their bytes.
pub fn sort_classes(classes: &mut [String]) {
    if classes.iter().all(|c| c.parse::<i64>().is_ok()) {
        classes.sort_by_key(|c| c.parse::<i64>().unwrap_or(0));
    } else {
        classes.sort();
    }
}

/// The sorted classes of the train data's labels (`names`, in any order, repeats allowed),
/// refused when fewer than two or more than [`MAX_CLASSES`].
fn classes_of<'a>(path: &Path, names: impl Iterator<Item = &'a str>) -> Result<Vec<String>> {
    let mut classes: Vec<String> = names.map(str::to_string).collect();
    classes.sort();
    classes.dedup();
    sort_classes(&mut classes);
    let bad = |message: String| DataError::BadCorpus { path: path.to_path_buf(), message };
    match classes.len() {
        0 => Err(bad("holds no examples".into())),
        1 => Err(bad(format!(
            "every example has the label {:?}: a classifier needs at least two classes",
            classes[0]
        ))),
        n if n > MAX_CLASSES => Err(bad(format!("has {n} classes; at most {MAX_CLASSES} are supported"))),
        _ => Ok(classes),
    }
}

/// The corpus checksum: the files' digests and every option that changes what is read.
fn checksum_of(input: &Input, options: &FormatOptions, train: &str, test: Option<&str>) -> String {
    let mut hasher = Sha256::new();
    hasher.update(format!(
        "labelled-v1\nformat={}\ntext_column={}\nlabel_column={}\ninvalid_utf8={:?}\ntrain={train}\n",
        input.format.name(),
        options.text_column,
        options.label_column,
        options.invalid_utf8,
    ));
    match test {
        Some(test) => hasher.update(format!("test={test}\n")),
        None => hasher.update(format!("test_fraction={}\nseed={}\n", options.test_fraction, options.seed)),
    }
    hex::encode(hasher.finalize())
}

fn no_test_split(path: &Path) -> DataError {
    DataError::BadCorpus {
        path: path.to_path_buf(),
        message: "has no test split: give --test-data FILE (data.test_data) or hold out part of it with \
                  --test-fraction F (data.test_fraction)"
            .into(),
    }
}

fn none_held_out(path: &Path, options: &FormatOptions, examples: usize) -> DataError {
    DataError::BadCorpus {
        path: path.to_path_buf(),
        message: format!(
            "data.test_fraction {} of {examples} examples holds out none; raise it or give --test-data",
            options.test_fraction
        ),
    }
}

fn build(input: &Input, train: Part, test: Option<Part>, options: &FormatOptions) -> Result<RawCorpus> {
    let classes = classes_of(&train.path, train.examples.iter().map(|e| e.label.as_str()))?;
    let id_of = |label: &str| classes.binary_search_by(|c| cmp_class(c, label)).ok();
    let to_review =
        |e: Example, id: usize| Review { id: e.line as u32, rating: 0, label: id as u8, text: e.text };
    let mut train_reviews: Vec<Review> = Vec::with_capacity(train.examples.len());
    for e in train.examples {
        let id = id_of(&e.label).unwrap_or(0);
        train_reviews.push(to_review(e, id));
    }
    let checksum = checksum_of(input, options, &train.digest, test.as_ref().map(|t| t.digest.as_str()));
    let mut lossy = train.lossy;
    let test_reviews = match test {
        Some(test) => {
            lossy.extend(test.lossy);
            let mut out = Vec::with_capacity(test.examples.len());
            for e in test.examples {
                let Some(id) = id_of(&e.label) else {
                    return Err(DataError::UnknownLabel {
                        path: test.path.clone(),
                        line: e.line,
                        label: e.label,
                        classes: classes.join(", "),
                    });
                };
                out.push(to_review(e, id));
            }
            if out.is_empty() {
                return Err(DataError::BadCorpus { path: test.path, message: "holds no examples".into() });
            }
            out
        }
        None if options.test_fraction > 0.0 => {
            let (kept, held) = hold_out(train_reviews, classes.len(), options.test_fraction, options.seed);
            if held.is_empty() {
                return Err(none_held_out(&train.path, options, kept.len()));
            }
            train_reviews = kept;
            held
        }
        None => return Err(no_test_split(&train.path)),
    };
    Ok(RawCorpus { train: train_reviews, test: test_reviews, checksum, lossy_utf8: lossy, classes })
}

pub(crate) fn cmp_class(a: &str, b: &str) -> std::cmp::Ordering {
    match (a.parse::<i64>(), b.parse::<i64>()) {
        (Ok(x), Ok(y)) => x.cmp(&y).then_with(|| a.cmp(b)),
        _ => a.cmp(b),
    }
}

/// Which examples to hold out: `round(fraction * n_c)` of each class `c` (at most
/// `n_c - 1`), chosen by a generator seeded with `seed`.
fn hold_out_mask(labels: impl Iterator<Item = u8>, classes: usize, fraction: f64, seed: u64) -> Vec<bool> {
    let mut rng = crate::shard::rng_for(seed, 0, PURPOSE_TEST_HOLD_OUT);
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); classes];
    let mut n = 0;
    for (i, label) in labels.enumerate() {
        by_class[usize::from(label)].push(i);
        n += 1;
    }
    let mut held = vec![false; n];
    for mut members in by_class {
        let take = ((fraction * members.len() as f64).round() as usize).min(members.len().saturating_sub(1));
        members.shuffle(&mut rng);
        for &i in &members[..take] {
            held[i] = true;
        }
    }
    held
}

/// Splits `reviews` by [`hold_out_mask`]; both parts keep the file's order.
fn hold_out(reviews: Vec<Review>, classes: usize, fraction: f64, seed: u64) -> (Vec<Review>, Vec<Review>) {
    let held = hold_out_mask(reviews.iter().map(|r| r.label), classes, fraction, seed);
    let (mut kept, mut out) = (Vec::new(), Vec::new());
    for (review, held) in reviews.into_iter().zip(held) {
        if held {
            out.push(review);
        } else {
            kept.push(review);
        }
    }
    (kept, out)
}

const PURPOSE_TEST_HOLD_OUT: u64 = 5;

/// The class names in a run folder, one per output of the model's head, in label order.
pub const LABELS_FILE: &str = "labels.json";

/// Writes `labels.json` (a JSON array of the class names) atomically.
pub fn write_labels(dir: &Path, classes: &[String]) -> Result<()> {
    let path = dir.join(LABELS_FILE);
    let bytes = serde_json::to_vec_pretty(classes)
        .map_err(|e| DataError::Write { path: path.clone(), cause: std::io::Error::other(e) })?;
    crate::write_atomically(&path, &bytes)
}

/// Reads `labels.json`; a run folder written before it existed holds IMDB's two classes.
pub fn read_labels(dir: &Path) -> Result<Vec<String>> {
    let path = dir.join(LABELS_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(crate::corpus::imdb_classes()),
        Err(cause) => return Err(DataError::Io { path, cause }),
    };
    let classes: Vec<String> = serde_json::from_slice(&bytes).map_err(|e| DataError::BadCorpus {
        path: path.clone(),
        message: format!("not a JSON array of names: {e}"),
    })?;
    if classes.len() < 2 {
        return Err(DataError::BadCorpus { path, message: "names fewer than two classes".into() });
    }
    Ok(classes)
}
