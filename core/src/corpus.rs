//! Reading the labelled IMDB corpus from the official tarball (streamed, never extracted),
//! from an extracted `aclImdb/` folder, or from a download checked against its known digests.
//!
//! Labels come from the folder names (`pos` = 1, `neg` = 0) and the rating from the file
//! name `<id>_<rating>.txt`. A review that is not valid UTF-8 is decoded lossily (U+FFFD for
//! each bad sequence) and counted in [`RawCorpus::lossy_utf8`]; an empty review is refused.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{io_err, DataError, Result};

pub const OFFICIAL_URL: &str = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz";
pub const OFFICIAL_MD5: &str = "7c2ac02c03563afcf9b574c7e56c153a";
pub const OFFICIAL_SHA256: &str = "c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe";
pub const OFFICIAL_FILE_NAME: &str = "aclImdb_v1.tar.gz";
const MAX_DOWNLOAD_BYTES: u64 = 512 << 20;
/// Longest review accepted (the corpus' longest is 14 KB). A review is read whole and travels
/// whole in one gRPC message as at most one token per byte; this bound keeps that message
/// far below `trainer_proto::MAX_MESSAGE_BYTES`, and a tar header that claims a huge entry
/// from making the reader allocate for it.
pub const MAX_REVIEW_BYTES: usize = 8 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    Train,
    Test,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Review {
    /// The `<id>` of `<id>_<rating>.txt`, unique within a split and label; for other formats
    /// the example's line (class folders: its index).
    pub id: u32,
    /// 1..=10, from the file name (0 for corpora of other formats).
    pub rating: u8,
    /// 1 for `pos`, 0 for `neg`; for other corpora, the index of the class in
    /// [`RawCorpus::classes`].
    pub label: u8,
    pub text: String,
}

/// The corpus as read, reviews of each split ordered by (label, id).
#[derive(Debug, Clone)]
pub struct RawCorpus {
    pub train: Vec<Review>,
    pub test: Vec<Review>,
    /// sha256 of the tarball's bytes, or of the folder's review names and contents.
    pub checksum: String,
    /// `split/label/name` of every review that was not valid UTF-8 and was decoded lossily.
    pub lossy_utf8: Vec<String>,
    /// The class names, sorted; a review's label is an index into it (IMDB: `neg`, `pos`).
    pub classes: Vec<String>,
}

/// IMDB's classes: `neg` = 0, `pos` = 1.
pub fn imdb_classes() -> Vec<String> {
    vec!["neg".to_string(), "pos".to_string()]
}

/// Where the corpus comes from, as resolved from `--data`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataSource {
    /// `aclImdb_v1.tar.gz` (or an uncompressed tar with the same layout).
    Tarball(PathBuf),
    /// A folder that is `aclImdb/` or holds it.
    Folder(PathBuf),
}

impl DataSource {
    /// Classifies an existing path; a missing or unreadable path is an error naming it.
    pub fn from_path(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                DataError::NotFound { path: path.to_path_buf() }
            } else {
                DataError::Io { path: path.to_path_buf(), cause: source }
            }
        })?;
        if meta.is_dir() {
            let root = if path.join("aclImdb").is_dir() { path.join("aclImdb") } else { path.to_path_buf() };
            Ok(DataSource::Folder(root))
        } else {
            Ok(DataSource::Tarball(path.to_path_buf()))
        }
    }

    pub fn path(&self) -> &Path {
        match self {
            DataSource::Tarball(p) | DataSource::Folder(p) => p,
        }
    }
}

/// Where to download the official tarball from and what it must hash to.
#[derive(Debug, Clone)]
pub struct DownloadSpec {
    pub url: String,
    pub md5: String,
    pub sha256: String,
    pub cache_dir: PathBuf,
}

impl DownloadSpec {
    pub fn official(cache_dir: PathBuf) -> Self {
        Self {
            url: OFFICIAL_URL.to_string(),
            md5: OFFICIAL_MD5.to_string(),
            sha256: OFFICIAL_SHA256.to_string(),
            cache_dir,
        }
    }

    pub fn target(&self) -> PathBuf {
        self.cache_dir.join(OFFICIAL_FILE_NAME)
    }
}

/// Downloads the tarball into `spec.cache_dir` under a temporary name, checks its md5 and
/// sha256, then renames it; a mismatching file is deleted, never left where it would be
/// trusted. A file already at the final name was checked when it was written there, and
/// is checked again by the caller's checksum memo when it changes.
pub fn download(spec: &DownloadSpec) -> Result<PathBuf> {
    let target = spec.target();
    std::fs::create_dir_all(&spec.cache_dir).map_err(io_err(&spec.cache_dir))?;
    let partial = spec.cache_dir.join(format!("{OFFICIAL_FILE_NAME}.part-{}", std::process::id()));
    let fail = |e: DataError| {
        let _ = std::fs::remove_file(&partial);
        e
    };
    tracing::info!(url = %spec.url, to = %target.display(), "downloading the IMDB corpus");
    // A stalled server must not hang the job: bound the connection and every read.
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(std::time::Duration::from_secs(30)))
        .timeout_per_read(Some(std::time::Duration::from_secs(60)))
        .max_response_header_size(64 * 1024)
        .build()
        .into();
    let response = agent
        .get(&spec.url)
        .call()
        .map_err(|e| DataError::Download { url: spec.url.clone(), message: e.to_string() })?;
    // The official tarball is 84 MB; refuse a server that sends far more than that.
    let mut body = response.into_body().into_with_config().limit(MAX_DOWNLOAD_BYTES).reader();
    let mut file = File::create(&partial).map_err(io_err(&partial))?;
    let mut sha = Sha256::new();
    let mut md5 = md5::Md5::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total: u64 = 0;
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(fail(DataError::Download { url: spec.url.clone(), message: e.to_string() }))
            }
        };
        sha.update(&buf[..n]);
        md5.update(&buf[..n]);
        file.write_all(&buf[..n]).map_err(|e| fail(io_err(&partial)(e)))?;
        total += n as u64;
    }
    file.sync_all().map_err(|e| fail(io_err(&partial)(e)))?;
    drop(file);
    let actual_md5 = hex::encode(md5.finalize());
    let actual_sha = hex::encode(sha.finalize());
    if !actual_md5.eq_ignore_ascii_case(&spec.md5) {
        return Err(fail(DataError::ChecksumMismatch {
            url: spec.url.clone(),
            algorithm: "md5",
            expected: spec.md5.clone(),
            actual: actual_md5,
        }));
    }
    if !actual_sha.eq_ignore_ascii_case(&spec.sha256) {
        return Err(fail(DataError::ChecksumMismatch {
            url: spec.url.clone(),
            algorithm: "sha256",
            expected: spec.sha256.clone(),
            actual: actual_sha,
        }));
    }
    std::fs::rename(&partial, &target).map_err(|e| fail(io_err(&target)(e)))?;
    tracing::info!(bytes = total, sha256 = %actual_sha, "download checked and stored");
    Ok(target)
}

/// Reads and checks a whole corpus.
pub fn read_corpus(source: &DataSource) -> Result<RawCorpus> {
    let mut collector = Collector::new(source.path());
    let checksum = match source {
        DataSource::Tarball(path) => {
            let file = File::open(path).map_err(io_err(path))?;
            read_archive(BufReader::with_capacity(1 << 20, file), path, &mut collector)?
        }
        DataSource::Folder(root) => read_folder(root, &mut collector)?,
    };
    collector.finish(checksum)
}

/// Reads a corpus from the bytes of a tarball (gzip-compressed or plain tar), with the checks
/// of [`read_corpus`]; `source` names it in errors. The entry point of the fuzz target
/// `corpus_tar`: any bytes give a corpus or a [`DataError`], and no entry is read (or
/// allocated for) beyond [`MAX_REVIEW_BYTES`], whatever size its header claims.
pub fn read_tarball_bytes(bytes: &[u8], source: &Path) -> Result<RawCorpus> {
    let mut collector = Collector::new(source);
    let checksum = read_archive(bytes, source, &mut collector)?;
    collector.finish(checksum)
}

/// Gathers reviews from any source and applies the same checks.
struct Collector {
    source: PathBuf,
    train: Vec<Review>,
    test: Vec<Review>,
    seen: HashSet<(Split, u8, u32)>,
    lossy_utf8: Vec<String>,
}

impl Collector {
    fn new(source: &Path) -> Self {
        Self {
            source: source.to_path_buf(),
            train: Vec::with_capacity(25_000),
            test: Vec::with_capacity(25_000),
            seen: HashSet::new(),
            lossy_utf8: Vec::new(),
        }
    }

    fn add(&mut self, split: Split, label: u8, file_name: &str, bytes: Vec<u8>) -> Result<()> {
        let display = Self::display(split, label, file_name);
        let (id, rating) = parse_review_name(file_name).map_err(|reason| DataError::BadReviewName {
            path: self.source.clone(),
            name: display.clone(),
            reason,
        })?;
        let text = match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => {
                self.lossy_utf8.push(display.clone());
                String::from_utf8_lossy(e.as_bytes()).into_owned()
            }
        };
        if text.trim().is_empty() {
            return Err(DataError::EmptyReview { path: self.source.clone(), name: display });
        }
        if !self.seen.insert((split, label, id)) {
            return Err(DataError::DuplicateReview { path: self.source.clone(), name: display });
        }
        let review = Review { id, rating, label, text };
        match split {
            Split::Train => self.train.push(review),
            Split::Test => self.test.push(review),
        }
        Ok(())
    }

    fn display(split: Split, label: u8, file_name: &str) -> String {
        format!("{}/{}/{}", split.name(), if label == 1 { "pos" } else { "neg" }, file_name)
    }

    fn too_large(&self, split: Split, label: u8, file_name: &str, bytes: u64) -> DataError {
        DataError::ReviewTooLarge {
            path: self.source.clone(),
            name: Self::display(split, label, file_name),
            bytes,
            max: MAX_REVIEW_BYTES,
        }
    }

    fn finish(mut self, checksum: String) -> Result<RawCorpus> {
        for (split, reviews) in [(Split::Train, &mut self.train), (Split::Test, &mut self.test)] {
            for (label, name) in [(0u8, "neg"), (1u8, "pos")] {
                if !reviews.iter().any(|r| r.label == label) {
                    return Err(DataError::MissingSplit {
                        path: self.source.clone(),
                        missing: format!("{}/{}", split.name(), name),
                    });
                }
            }
            reviews.sort_unstable_by_key(|r| (r.label, r.id));
        }
        self.lossy_utf8.sort();
        Ok(RawCorpus {
            train: self.train,
            test: self.test,
            checksum,
            lossy_utf8: self.lossy_utf8,
            classes: imdb_classes(),
        })
    }
}

/// One review's bytes, or `None` when it is over [`MAX_REVIEW_BYTES`]: refused by the size
/// its header or metadata declares before anything is allocated, and by what it really
/// holds (read no further than one byte past the bound).
fn read_review(reader: &mut impl Read, declared: u64) -> std::io::Result<Option<Vec<u8>>> {
    if declared > MAX_REVIEW_BYTES as u64 {
        return Ok(None);
    }
    let mut bytes = Vec::with_capacity(declared as usize);
    reader.take(MAX_REVIEW_BYTES as u64 + 1).read_to_end(&mut bytes)?;
    Ok((bytes.len() <= MAX_REVIEW_BYTES).then_some(bytes))
}

/// `<id>_<rating>.txt` → (id, rating).
fn parse_review_name(name: &str) -> std::result::Result<(u32, u8), String> {
    let stem = name.strip_suffix(".txt").ok_or("no .txt suffix")?;
    let (id, rating) = stem.split_once('_').ok_or("no '_' between id and rating")?;
    let id: u32 = id.parse().map_err(|_| format!("id {id:?} is not a number"))?;
    let rating: u8 = rating.parse().map_err(|_| format!("rating {rating:?} is not a number"))?;
    if !(1..=10).contains(&rating) {
        return Err(format!("rating {rating} is not in 1..=10"));
    }
    Ok((id, rating))
}

/// Splits an archive path into (split, label, file name) when it is a labelled review:
/// `[./]aclImdb/{train,test}/{pos,neg}/<file>`.
fn classify_entry(path: &str) -> Option<(Split, u8, &str)> {
    let path = path.strip_prefix("./").unwrap_or(path);
    let mut parts = path.split('/');
    if parts.next()? != "aclImdb" {
        return None;
    }
    let split = match parts.next()? {
        "train" => Split::Train,
        "test" => Split::Test,
        _ => return None,
    };
    let label = match parts.next()? {
        "pos" => 1,
        "neg" => 0,
        _ => return None,
    };
    let file = parts.next()?;
    if parts.next().is_some() || file.is_empty() {
        return None;
    }
    Some((split, label, file))
}

/// Reader that hashes what passes through and remembers whether an error came from below
/// (the file or the gzip layer) rather than from the tar parser above it.
struct Tracked<R> {
    inner: R,
    failed: std::rc::Rc<std::cell::Cell<bool>>,
}

impl<R: Read> Read for Tracked<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let r = self.inner.read(buf);
        if r.is_err() {
            self.failed.set(true);
        }
        r
    }
}

/// Reader that feeds everything it passes through to a shared sha256.
pub(crate) struct Hashing<R> {
    pub(crate) inner: R,
    pub(crate) sha: std::rc::Rc<std::cell::RefCell<Sha256>>,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sha.borrow_mut().update(&buf[..n]);
        Ok(n)
    }
}

/// Reads reviews from a tar stream (gzip-compressed when it starts with the gzip magic) and
/// returns the sha256 of its bytes.
fn read_archive(mut input: impl std::io::BufRead, path: &Path, collector: &mut Collector) -> Result<String> {
    let is_gzip = input.fill_buf().map_err(io_err(path))?.starts_with(&[0x1f, 0x8b]);
    let sha = std::rc::Rc::new(std::cell::RefCell::new(Sha256::new()));
    let hashing = Hashing { inner: input, sha: sha.clone() };
    let failed = std::rc::Rc::new(std::cell::Cell::new(false));
    let map_low = |e: std::io::Error| {
        if is_gzip {
            DataError::Gzip { path: path.to_path_buf(), cause: e }
        } else {
            DataError::Io { path: path.to_path_buf(), cause: e }
        }
    };
    let inner: Box<dyn Read> =
        if is_gzip { Box::new(flate2::read::GzDecoder::new(hashing)) } else { Box::new(hashing) };
    let mut archive = tar::Archive::new(Tracked { inner, failed: failed.clone() });
    let tar_err = |e: std::io::Error| -> DataError {
        if failed.get() {
            map_low(e)
        } else {
            DataError::Tar { path: path.to_path_buf(), message: e.to_string() }
        }
    };
    let mut entries_seen = 0usize;
    for entry in archive.entries().map_err(tar_err)? {
        let mut entry = entry.map_err(tar_err)?;
        entries_seen += 1;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let entry_path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let Some((split, label, name)) = classify_entry(&entry_path) else {
            continue;
        };
        let size = entry.size();
        match read_review(&mut entry, size).map_err(tar_err)? {
            Some(bytes) => collector.add(split, label, name, bytes)?,
            None => return Err(collector.too_large(split, label, name, size)),
        }
    }
    if entries_seen == 0 {
        return Err(DataError::Tar {
            path: path.to_path_buf(),
            message: "no entries: not a tar archive".into(),
        });
    }
    // Read to the end so that the gzip trailer (CRC and length) is checked too: the tar
    // parser stops at the end-of-archive blocks and would miss a damaged tail.
    let mut rest = archive.into_inner();
    std::io::copy(&mut rest, &mut std::io::sink()).map_err(map_low)?;
    drop(rest);
    let digest = sha.replace(Sha256::new()).finalize();
    Ok(hex::encode(digest))
}

fn read_folder(root: &Path, collector: &mut Collector) -> Result<String> {
    let mut digest = Sha256::new();
    for split in [Split::Train, Split::Test] {
        for (label, label_name) in [(0u8, "neg"), (1u8, "pos")] {
            let dir = root.join(split.name()).join(label_name);
            let listing = match std::fs::read_dir(&dir) {
                Ok(listing) => listing,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(DataError::MissingSplit {
                        path: root.to_path_buf(),
                        missing: format!("{}/{}", split.name(), label_name),
                    })
                }
                Err(e) => return Err(io_err(&dir)(e)),
            };
            let mut names = Vec::new();
            for entry in listing {
                let entry = entry.map_err(io_err(&dir))?;
                if entry.file_type().map_err(io_err(&dir))?.is_file() {
                    names.push(entry.file_name().to_string_lossy().into_owned());
                }
            }
            names.sort();
            for name in names {
                let file = dir.join(&name);
                let mut reader = File::open(&file).map_err(io_err(&file))?;
                let declared = reader.metadata().map_err(io_err(&file))?.len();
                let Some(bytes) = read_review(&mut reader, declared).map_err(io_err(&file))? else {
                    return Err(collector.too_large(split, label, &name, declared));
                };
                digest.update(
                    format!("{}/{}/{}\0{}\0", split.name(), label_name, name, bytes.len()).as_bytes(),
                );
                digest.update(&bytes);
                collector.add(split, label, &name, bytes)?;
            }
        }
    }
    Ok(hex::encode(digest.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn review_names() {
        assert_eq!(parse_review_name("123_9.txt"), Ok((123, 9)));
        assert!(parse_review_name("123.txt").is_err());
        assert!(parse_review_name("a_9.txt").is_err());
        assert!(parse_review_name("1_11.txt").is_err());
        assert!(parse_review_name("1_9.md").is_err());
    }

    #[test]
    fn entry_classification() {
        assert_eq!(classify_entry("aclImdb/train/pos/1_9.txt"), Some((Split::Train, 1, "1_9.txt")));
        assert_eq!(classify_entry("./aclImdb/test/neg/2_1.txt"), Some((Split::Test, 0, "2_1.txt")));
        assert_eq!(classify_entry("aclImdb/train/unsup/3_0.txt"), None);
        assert_eq!(classify_entry("aclImdb/train/urls_pos.txt"), None);
        assert_eq!(classify_entry("other/train/pos/1_9.txt"), None);
    }
}
