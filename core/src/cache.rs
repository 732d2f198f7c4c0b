//! On-disk cache of the encoded corpus.
//!
//! A cache file is named by a key that hashes the corpus checksum, the tokenizer version and
//! the vocabulary settings, and carries a CRC-32 of its payload: a file that is truncated,
//! altered or written for other settings is detected and rebuilt, never trusted.
//!
//! Layout: magic `IMDBENC1`, u64 header length, JSON header, then the payload (vocabulary
//! words, then each split's arrays), all little-endian.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::encode::{EncodedCorpus, EncodedSplit};
use crate::error::{DataError, Result};
use crate::tokenizer::TOKENIZER_VERSION;
use crate::vocab::Vocab;

const MAGIC: &[u8; 8] = b"IMDBENC1";

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Header {
    key: String,
    checksum: String,
    payload_len: u64,
    payload_crc32: u32,
    /// The class names; absent in caches written before corpora of other formats, which
    /// were all IMDB's (`neg`, `pos`).
    #[serde(default = "crate::corpus::imdb_classes")]
    classes: Vec<String>,
}

/// The cache key for a corpus and the settings that change the encoding.
pub fn cache_key(corpus_checksum: &str, min_freq: u32, max_vocab: usize) -> String {
    let mut h = Sha256::new();
    h.update(format!("{corpus_checksum}\n{TOKENIZER_VERSION}\nmin_freq={min_freq}\nmax_vocab={max_vocab}\n"));
    hex::encode(&h.finalize()[..16])
}

/// The cache key for any tokenizer: `basic_english`'s is [`cache_key`]'s, unchanged, so
/// caches written before subword tokenizers existed still hit; a subword tokenizer's hashes
/// its kind, settings and version instead of the word-vocabulary settings.
pub fn cache_key_for(
    corpus_checksum: &str,
    min_freq: u32,
    max_vocab: usize,
    tokenizer: &crate::subword::TokenizerSettings,
) -> String {
    if !tokenizer.is_subword() {
        return cache_key(corpus_checksum, min_freq, max_vocab);
    }
    let mut h = Sha256::new();
    h.update(format!("{corpus_checksum}\n{}", tokenizer.key_text()));
    hex::encode(&h.finalize()[..16])
}

pub fn cache_path(cache_dir: &Path, key: &str) -> PathBuf {
    cache_dir.join(format!("encoded-{key}.bin"))
}

fn put_u32s(out: &mut Vec<u8>, values: &[u32]) {
    out.extend_from_slice(&(values.len() as u64).to_le_bytes());
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

fn put_u64s(out: &mut Vec<u8>, values: &[u64]) {
    out.extend_from_slice(&(values.len() as u64).to_le_bytes());
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

fn put_u8s(out: &mut Vec<u8>, values: &[u8]) {
    out.extend_from_slice(&(values.len() as u64).to_le_bytes());
    out.extend_from_slice(values);
}

fn encode_payload(corpus: &EncodedCorpus) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 * (corpus.train.tokens.len() + corpus.test.tokens.len()) + (1 << 20));
    let words = corpus.vocab.words().join("\n");
    put_u8s(&mut out, words.as_bytes());
    for split in [&corpus.train, &corpus.test] {
        put_u32s(&mut out, &split.ids);
        put_u8s(&mut out, &split.labels);
        put_u8s(&mut out, &split.ratings);
        put_u64s(&mut out, &split.offsets);
        put_u32s(&mut out, &split.tokens);
    }
    // A subword corpus carries its tokenizer.json after the splits (a word corpus's payload
    // is what it always was).
    if let Some(json) = &corpus.tokenizer_json {
        put_u8s(&mut out, json.as_bytes());
    }
    out
}

struct Cursor<'a> {
    bytes: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        if self.bytes.len() < n {
            return Err("payload ends early".into());
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn len(&mut self) -> std::result::Result<usize, String> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().map_err(|_| "bad length")?) as usize)
    }

    fn u8s(&mut self) -> std::result::Result<Vec<u8>, String> {
        let n = self.len()?;
        Ok(self.take(n)?.to_vec())
    }

    fn u32s(&mut self) -> std::result::Result<Vec<u32>, String> {
        let n = self.len()?;
        let b = self.take(n.checked_mul(4).ok_or("bad length")?)?;
        Ok(b.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }

    fn u64s(&mut self) -> std::result::Result<Vec<u64>, String> {
        let n = self.len()?;
        let b = self.take(n.checked_mul(8).ok_or("bad length")?)?;
        Ok(b.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect())
    }
}

fn decode_split(cur: &mut Cursor<'_>, vocab_len: usize) -> std::result::Result<EncodedSplit, String> {
    let split = EncodedSplit {
        ids: cur.u32s()?,
        labels: cur.u8s()?,
        ratings: cur.u8s()?,
        offsets: cur.u64s()?,
        tokens: cur.u32s()?,
    };
    let n = split.ids.len();
    let consistent = split.labels.len() == n
        && split.ratings.len() == n
        && split.offsets.len() == n + 1
        && split.offsets.first() == Some(&0)
        && split.offsets.last() == Some(&(split.tokens.len() as u64))
        && split.offsets.windows(2).all(|w| w[0] <= w[1])
        && split.tokens.iter().all(|&t| (t as usize) < vocab_len);
    if consistent {
        Ok(split)
    } else {
        Err("inconsistent split arrays".into())
    }
}

/// Why a cache could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheMiss {
    Absent,
    /// Present but unusable: the reason is logged and the file rebuilt.
    Invalid(String),
}

/// Loads a cache file written for `key`; any damage or mismatch is a [`CacheMiss::Invalid`].
pub fn load(path: &Path, key: &str) -> std::result::Result<EncodedCorpus, CacheMiss> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(CacheMiss::Absent),
        Err(e) => return Err(CacheMiss::Invalid(format!("cannot read: {e}"))),
    };
    parse(&bytes, key).map_err(CacheMiss::Invalid)
}

fn parse(bytes: &[u8], key: &str) -> std::result::Result<EncodedCorpus, String> {
    if bytes.len() < 16 || &bytes[..8] != MAGIC {
        return Err("not a cache file (bad magic)".into());
    }
    let header_len = u64::from_le_bytes(bytes[8..16].try_into().map_err(|_| "bad header")?) as usize;
    let header_end =
        16usize.checked_add(header_len).filter(|&e| e <= bytes.len()).ok_or("header ends early")?;
    let header: Header =
        serde_json::from_slice(&bytes[16..header_end]).map_err(|e| format!("bad header: {e}"))?;
    if header.key != key {
        return Err(format!("written for key {}, expected {key}", header.key));
    }
    let payload = &bytes[header_end..];
    if payload.len() as u64 != header.payload_len {
        return Err(format!("payload is {} bytes, header says {}", payload.len(), header.payload_len));
    }
    if crc32fast::hash(payload) != header.payload_crc32 {
        return Err("payload CRC-32 mismatch".into());
    }
    let mut cur = Cursor { bytes: payload };
    let words = String::from_utf8(cur.u8s()?).map_err(|_| "vocabulary is not UTF-8")?;
    let vocab = Vocab::from_word_list(words.split('\n').map(str::to_string).collect())?;
    let train = decode_split(&mut cur, vocab.len())?;
    let test = decode_split(&mut cur, vocab.len())?;
    let tokenizer_json = if cur.bytes.is_empty() {
        None
    } else {
        Some(String::from_utf8(cur.u8s()?).map_err(|_| "tokenizer.json is not UTF-8")?)
    };
    if !cur.bytes.is_empty() {
        return Err("trailing bytes".into());
    }
    if header.classes.len() < 2
        || [&train, &test].iter().any(|s| s.labels.iter().any(|&l| usize::from(l) >= header.classes.len()))
    {
        return Err("labels and classes disagree".into());
    }
    Ok(EncodedCorpus {
        vocab,
        train,
        test,
        checksum: header.checksum,
        classes: header.classes,
        tokenizer_json,
    })
}

/// Writes the cache under a temporary name and renames it into place.
pub fn store(path: &Path, key: &str, corpus: &EncodedCorpus) -> Result<()> {
    let payload = encode_payload(corpus);
    let header = Header {
        key: key.to_string(),
        checksum: corpus.checksum.clone(),
        payload_len: payload.len() as u64,
        payload_crc32: crc32fast::hash(&payload),
        classes: corpus.classes.clone(),
    };
    let header = serde_json::to_vec(&header)
        .map_err(|e| DataError::CacheIo { path: path.to_path_buf(), cause: std::io::Error::other(e) })?;
    let mut out = Vec::with_capacity(16 + header.len() + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(&payload);
    crate::write_atomically(path, &out).map_err(|e| match e {
        DataError::Io { path, cause } | DataError::Write { path, cause } => {
            DataError::CacheIo { path, cause }
        }
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::corpus::{RawCorpus, Review};
    use crate::encode::encode_corpus;

    fn corpus() -> EncodedCorpus {
        let r = |id, label: u8, text: &str| Review { id, rating: 1 + 8 * label, label, text: text.into() };
        let raw = RawCorpus {
            train: vec![r(0, 0, "bad film"), r(1, 1, "great film!")],
            test: vec![r(0, 0, "bad"), r(1, 1, "great")],
            checksum: "abc".into(),
            lossy_utf8: vec![],
            classes: crate::corpus::imdb_classes(),
        };
        encode_corpus(&raw, 1, 0).0
    }

    #[test]
    fn round_trip_and_every_kind_of_damage_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let c = corpus();
        let key = cache_key("abc", 1, 0);
        let path = cache_path(dir.path(), &key);
        assert_eq!(load(&path, &key).unwrap_err(), CacheMiss::Absent);
        store(&path, &key, &c).unwrap();
        assert_eq!(load(&path, &key).unwrap(), c);
        // Other settings: another key.
        assert_ne!(cache_key("abc", 2, 0), key);
        assert!(matches!(load(&path, &cache_key("abc", 2, 0)), Err(CacheMiss::Invalid(_))));
        // A flipped byte in the payload.
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(load(&path, &key), Err(CacheMiss::Invalid(m)) if m.contains("CRC")));
        // Truncated.
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        assert!(matches!(load(&path, &key), Err(CacheMiss::Invalid(_))));
        // Garbage.
        std::fs::write(&path, b"hello").unwrap();
        assert!(matches!(load(&path, &key), Err(CacheMiss::Invalid(m)) if m.contains("magic")));
    }

    #[test]
    fn subword_settings_have_their_own_key_and_the_tokenizer_travels_with_the_cache() {
        use crate::config::TokenizerKind;
        use crate::subword::TokenizerSettings;
        // basic_english: the key it always had, so that old caches still hit.
        assert_eq!(cache_key_for("abc", 1, 0, &TokenizerSettings::default()), cache_key("abc", 1, 0));
        let bpe = TokenizerSettings { kind: TokenizerKind::Bpe, ..Default::default() };
        let key = cache_key_for("abc", 1, 0, &bpe);
        assert_ne!(key, cache_key("abc", 1, 0));
        assert_ne!(key, cache_key_for("abc", 1, 0, &TokenizerSettings { vocab_size: 8000, ..bpe }));
        assert_ne!(key, cache_key_for("abc", 1, 0, &TokenizerSettings { min_frequency: 3, ..bpe }));
        assert_ne!(
            key,
            cache_key_for("abc", 1, 0, &TokenizerSettings { kind: TokenizerKind::Unigram, ..bpe })
        );
        let dir = tempfile::tempdir().unwrap();
        let path = cache_path(dir.path(), &key);
        let mut c = corpus();
        c.tokenizer_json = Some("{\"json\": true}".into());
        store(&path, &key, &c).unwrap();
        assert_eq!(load(&path, &key).unwrap(), c);
    }
}
