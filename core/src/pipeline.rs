//! `prepare`: from `--data` (or a download) to the encoded corpus, through the cache.
//!
//! A tarball's checksum is remembered by (path, size, modification time) in
//! `<cache>/checksums.json`, so that a warm run reads neither the tarball nor the reviews:
//! it stats the file, finds its checksum, and loads the encoded cache for that checksum and
//! the vocabulary settings. Any change to the file changes its size or time and sends the
//! run down the cold path, which re-reads and re-hashes it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::cache::{self, CacheMiss};
use crate::corpus::{self, DataSource, DownloadSpec};
use crate::encode::{encode_corpus, EncodedCorpus};
use crate::error::{io_err, Result};
use crate::labelled;
use crate::subword::{self, SubwordTokenizer, TokenizerSettings};

/// Where the corpus comes from and where derived files go.
#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// `--data`: a tarball or a folder; `None` downloads `download.url`.
    pub data: Option<PathBuf>,
    pub download: DownloadSpec,
    /// Read and write the encoded cache (in `download.cache_dir`).
    pub use_cache: bool,
    pub min_freq: u32,
    pub max_vocab: usize,
    /// `basic_english` (then `min_freq` and `max_vocab` apply) or a subword tokenizer to
    /// train on the train split.
    pub tokenizer: TokenizerSettings,
    /// How to read a corpus that is not in IMDB's layout.
    pub labelled: crate::labelled::FormatOptions,
}

impl PrepareOptions {
    fn cache_key(&self, checksum: &str) -> String {
        cache::cache_key_for(checksum, self.min_freq, self.max_vocab, &self.tokenizer)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", content = "reason", rename_all = "snake_case")]
pub enum CacheStatus {
    /// Loaded from the cache: nothing was tokenized.
    Hit,
    /// No cache yet: built and stored.
    Built,
    /// A cache was there but unusable (the reason): rebuilt and stored.
    Rebuilt(String),
    Disabled,
}

#[derive(Debug, Clone, Serialize)]
pub struct PipelineReport {
    pub source: String,
    pub checksum: String,
    pub cache: CacheStatus,
    /// (stage, seconds) in the order they ran.
    pub stages: Vec<(String, f64)>,
    /// Reviews decoded lossily because they were not valid UTF-8 (cold runs only).
    pub lossy_utf8: Vec<String>,
    /// Tokens and distinct words of the train split before `<unk>` mapping (cold runs only).
    pub train_distinct_words: Option<usize>,
}

/// `$IMDB_CACHE_DIR`, else `$XDG_CACHE_HOME/imdb-ddp`, else `~/.cache/imdb-ddp`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("IMDB_CACHE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("imdb-ddp");
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(home) => PathBuf::from(home).join(".cache").join("imdb-ddp"),
        None => PathBuf::from(".cache").join("imdb-ddp"),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Fingerprint {
    size: u64,
    mtime_ns: u128,
    sha256: String,
}

fn fingerprint_of(path: &Path) -> Result<(String, u64, u128)> {
    let canonical = std::fs::canonicalize(path).map_err(io_err(path))?;
    let meta = std::fs::metadata(&canonical).map_err(io_err(path))?;
    let mtime_ns = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    Ok((canonical.to_string_lossy().into_owned(), meta.len(), mtime_ns))
}

struct ChecksumMemo {
    path: PathBuf,
    entries: BTreeMap<String, Fingerprint>,
}

impl ChecksumMemo {
    fn open(cache_dir: &Path) -> Self {
        let path = cache_dir.join("checksums.json");
        let entries =
            std::fs::read(&path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        Self { path, entries }
    }

    fn lookup(&self, file: &Path) -> Option<String> {
        let (key, size, mtime_ns) = fingerprint_of(file).ok()?;
        self.entries.get(&key).filter(|f| f.size == size && f.mtime_ns == mtime_ns).map(|f| f.sha256.clone())
    }

    fn remember(&mut self, file: &Path, sha256: &str) {
        if let Ok((key, size, mtime_ns)) = fingerprint_of(file) {
            self.entries.insert(key, Fingerprint { size, mtime_ns, sha256: sha256.to_string() });
            match serde_json::to_vec_pretty(&self.entries) {
                Ok(bytes) => {
                    if let Err(e) = crate::write_atomically(&self.path, &bytes) {
                        tracing::warn!(error = %e, "cannot write the checksum memo");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot serialise the checksum memo"),
            }
        }
    }
}

/// Writes what a run folder needs to read text as this corpus did: `vocab.txt`, a subword
/// run's `tokenizer.json` and `labels.json` (each atomically). The coordinator and
/// `worker train` both call it, and `worker predict` reads these files.
pub fn write_run_files(dir: &Path, corpus: &EncodedCorpus) -> Result<()> {
    corpus.vocab.save(&dir.join(crate::vocab::VOCAB_FILE))?;
    if let Some(json) = &corpus.tokenizer_json {
        crate::write_atomically(&dir.join(subword::TOKENIZER_FILE), json.as_bytes())?;
    }
    labelled::write_labels(dir, &corpus.classes)
}

/// The log line of a corpus ready for training (both binaries write it; tests read its
/// `encoded_fingerprint`).
pub fn log_corpus_ready(corpus: &EncodedCorpus, report: &PipelineReport) {
    tracing::info!(
        source = %report.source,
        cache = ?report.cache,
        classes = %corpus.classes.join(","),
        encoded_fingerprint = %corpus.fingerprint(),
        "corpus ready"
    );
}

/// Loads, checks, tokenizes and encodes the corpus, or loads it from the cache.
pub fn prepare(options: &PrepareOptions) -> Result<(EncodedCorpus, PipelineReport)> {
    let mut stages: Vec<(String, f64)> = Vec::new();
    let cache_dir = &options.download.cache_dir;
    let mut memo = ChecksumMemo::open(cache_dir);

    // 1. Resolve the source, downloading when none is given. A corpus of another format
    // than IMDB's is read by `labelled` and goes straight to step 3.
    let labelled_input = match &options.data {
        Some(path) => labelled::detect(path, &options.labelled)?,
        None => None,
    };
    let source = match (&options.data, &labelled_input) {
        (_, Some(input)) => DataSource::Folder(input.path.clone()),
        (Some(path), None) => DataSource::from_path(path)?,
        (None, None) => {
            let target = options.download.target();
            let trusted =
                memo.lookup(&target).is_some_and(|s| s.eq_ignore_ascii_case(&options.download.sha256));
            if !trusted {
                let t = Instant::now();
                let path = corpus::download(&options.download)?;
                stages.push(("download".into(), t.elapsed().as_secs_f64()));
                memo.remember(&path, &options.download.sha256);
            }
            DataSource::Tarball(target)
        }
    };

    // 2. Warm path: a tarball whose checksum is known needs no reading at all.
    let known_checksum = match &source {
        DataSource::Tarball(path) if options.use_cache => memo.lookup(path),
        _ => None,
    };
    let mut miss_reason: Option<CacheMiss> = None;
    if let Some(checksum) = &known_checksum {
        match try_cache(options, checksum, &source, &mut stages) {
            Ok(hit) => return Ok(hit),
            Err(miss) => miss_reason = Some(miss),
        }
    }

    // A subword tokenizer is trained on the whole train split before anything is encoded, so
    // its corpora are read first (once); a word vocabulary can be counted while reading.
    let streams =
        |i: &&labelled::Input| !options.tokenizer.is_subword() && labelled::streams(i, &options.labelled);
    if let Some(input) = labelled_input.as_ref().filter(streams) {
        return prepare_streamed(options, input, stages);
    }

    // 3. Read (hashing as we go); a folder, or a tarball not seen before, may still have a
    // valid cache under its checksum, and then nothing is tokenized.
    let t = Instant::now();
    let raw = match &labelled_input {
        Some(input) => labelled::read(input, &options.labelled)?,
        None => corpus::read_corpus(&source)?,
    };
    stages.push(("read".into(), t.elapsed().as_secs_f64()));
    if options.use_cache {
        if let (DataSource::Tarball(path), None) = (&source, &labelled_input) {
            memo.remember(path, &raw.checksum);
        }
        if known_checksum.as_deref() != Some(raw.checksum.as_str()) {
            match try_cache(options, &raw.checksum, &source, &mut stages) {
                Ok(hit) => return Ok(hit),
                Err(miss) => miss_reason = Some(miss),
            }
        }
    }
    for name in &raw.lossy_utf8 {
        tracing::warn!(review = %name, "review is not valid UTF-8; decoded with U+FFFD replacements");
    }

    // 4. Tokenize, build the vocab from the train split, encode, and store the cache.
    let t = Instant::now();
    let (corpus, counts) = if options.tokenizer.is_subword() {
        let (corpus, _, counts) = subword::encode_corpus(&raw, &options.tokenizer)?;
        stages.push(("train tokenizer + encode".into(), t.elapsed().as_secs_f64()));
        (corpus, counts)
    } else {
        let encoded = encode_corpus(&raw, options.min_freq, options.max_vocab);
        stages.push(("tokenize + vocab + encode".into(), t.elapsed().as_secs_f64()));
        encoded
    };
    let cache = store_cache(options, &corpus, miss_reason, &mut stages)?;
    let report = PipelineReport {
        source: source.path().display().to_string(),
        checksum: raw.checksum.clone(),
        cache,
        stages,
        lossy_utf8: raw.lossy_utf8,
        train_distinct_words: Some(counts.train_distinct),
    };
    Ok((corpus, report))
}

/// Stores the encoded corpus in the cache (when the cache is used); what became of it.
fn store_cache(
    options: &PrepareOptions,
    corpus: &EncodedCorpus,
    miss_reason: Option<CacheMiss>,
    stages: &mut Vec<(String, f64)>,
) -> Result<CacheStatus> {
    if !options.use_cache {
        return Ok(CacheStatus::Disabled);
    }
    let cache_dir = &options.download.cache_dir;
    let key = options.cache_key(&corpus.checksum);
    let path = cache::cache_path(cache_dir, &key);
    let status = match miss_reason {
        Some(CacheMiss::Invalid(reason)) => {
            tracing::warn!(cache = %path.display(), %reason, "encoded-corpus cache unusable; rebuilding");
            CacheStatus::Rebuilt(reason)
        }
        _ => CacheStatus::Built,
    };
    let t = Instant::now();
    std::fs::create_dir_all(cache_dir).map_err(io_err(cache_dir))?;
    cache::store(&path, &key, corpus)?;
    stages.push(("cache store".into(), t.elapsed().as_secs_f64()));
    Ok(status)
}

/// A CSV, TSV, JSONL or fastText corpus: hashed first, so that a warm cache needs no
/// parsing; otherwise read while it is encoded (`labelled/stream.rs`).
fn prepare_streamed(
    options: &PrepareOptions,
    input: &labelled::Input,
    mut stages: Vec<(String, f64)>,
) -> Result<(EncodedCorpus, PipelineReport)> {
    let source = DataSource::Folder(input.path.clone());
    let mut miss_reason = None;
    if options.use_cache {
        let t = Instant::now();
        let checksum = labelled::streamed_checksum(input, &options.labelled)?;
        stages.push(("hash".into(), t.elapsed().as_secs_f64()));
        match try_cache(options, &checksum, &source, &mut stages) {
            Ok(hit) => return Ok(hit),
            Err(miss) => miss_reason = Some(miss),
        }
    }
    let t = Instant::now();
    let (corpus, counts, lossy_utf8) =
        labelled::read_encoded(input, &options.labelled, options.min_freq, options.max_vocab)?;
    stages.push(("read + tokenize + vocab + encode".into(), t.elapsed().as_secs_f64()));
    let cache = store_cache(options, &corpus, miss_reason, &mut stages)?;
    let report = PipelineReport {
        source: input.path.display().to_string(),
        checksum: corpus.checksum.clone(),
        cache,
        stages,
        lossy_utf8,
        train_distinct_words: Some(counts.train_distinct),
    };
    Ok((corpus, report))
}

fn try_cache(
    options: &PrepareOptions,
    checksum: &str,
    source: &DataSource,
    stages: &mut Vec<(String, f64)>,
) -> std::result::Result<(EncodedCorpus, PipelineReport), CacheMiss> {
    let t = Instant::now();
    let key = options.cache_key(checksum);
    let corpus = cache::load(&cache::cache_path(&options.download.cache_dir, &key), &key)?;
    if options.tokenizer.is_subword() {
        check_cached_tokenizer(&corpus).map_err(CacheMiss::Invalid)?;
    }
    stages.push(("cache load".into(), t.elapsed().as_secs_f64()));
    let report = PipelineReport {
        source: source.path().display().to_string(),
        checksum: checksum.to_string(),
        cache: CacheStatus::Hit,
        stages: std::mem::take(stages),
        lossy_utf8: Vec::new(),
        train_distinct_words: None,
    };
    Ok((corpus, report))
}

/// A subword cache must carry a tokenizer whose vocabulary is the cached one.
fn check_cached_tokenizer(corpus: &EncodedCorpus) -> std::result::Result<(), String> {
    let json = corpus.tokenizer_json.as_deref().ok_or("no tokenizer.json in a subword cache")?;
    let tokenizer = SubwordTokenizer::from_json(json)?;
    let vocab = tokenizer.vocab().map_err(|e| e.to_string())?;
    if vocab != corpus.vocab {
        return Err("its tokenizer.json does not match its vocabulary".into());
    }
    Ok(())
}
