//! Reading a CSV, TSV, JSONL or fastText corpus while encoding it: examples are tokenized
//! in chunks as they are read and their text is dropped, so a large file's text is never
//! all in memory, and the file's bytes never are. The result is bit for bit what
//! [`super::read`] followed by [`crate::encode::encode_corpus`] gives (one encoding path,
//! [`crate::encode::encode_chunks`]; a test checks it).

use std::path::Path;

use rayon::prelude::*;
use rustc_hash::FxHashMap;

use super::records;
use super::{checksum_of, classes_of, hold_out_mask, no_test_split, none_held_out, FormatOptions, Input};
use crate::corpus::Review;
use crate::encode::{
    encode_chunks, tokenize_chunk, ChunkedCorpus, EncodedCorpus, LocalChunk, TokenCounts, CHUNK_REVIEWS,
};
use crate::error::{DataError, Result};

/// Chunks tokenized at once (in parallel).
const CHUNKS_PER_BATCH: usize = 16;

/// A file's examples as tokens: each row's line and label (an index into `names`), the
/// tokenized chunks in row order, and the texts still waiting to be tokenized.
#[derive(Default)]
struct Tokenized {
    lines: Vec<u64>,
    labels: Vec<u32>,
    names: Vec<String>,
    index: FxHashMap<String, u32>,
    chunks: Vec<LocalChunk>,
    pending: Vec<Review>,
}

impl Tokenized {
    fn push(&mut self, line: u64, label: String, text: String) {
        let next = self.names.len() as u32;
        let id = *self.index.entry(label.clone()).or_insert_with(|| next);
        if id == next {
            self.names.push(label);
        }
        self.lines.push(line);
        self.labels.push(id);
        self.pending.push(Review { id: 0, rating: 0, label: 0, text });
        if self.pending.len() >= CHUNK_REVIEWS * CHUNKS_PER_BATCH {
            self.flush();
        }
    }

    fn flush(&mut self) {
        let chunks: Vec<LocalChunk> = self.pending.par_chunks(CHUNK_REVIEWS).map(tokenize_chunk).collect();
        self.chunks.extend(chunks);
        self.pending.clear();
    }

    fn read(input: &Input, options: &FormatOptions) -> Result<(Self, records::PartDigest)> {
        let mut out = Tokenized::default();
        let part = records::read_each(&input.path, input.format, options, &mut |e| {
            out.push(e.line, e.label, e.text);
            Ok(())
        })?;
        out.flush();
        Ok((out, records::PartDigest { digest: part.digest, lossy: part.lossy }))
    }

    /// The rows as reviews without text, labelled by `classes`; a label not among them is
    /// an error naming `path` and its line.
    fn reviews(&self, classes: &[String], path: &Path) -> Result<Vec<Review>> {
        let ids: Vec<Option<u8>> = self
            .names
            .iter()
            .map(|n| classes.binary_search_by(|c| super::cmp_class(c, n)).ok().map(|i| i as u8))
            .collect();
        let mut out = Vec::with_capacity(self.lines.len());
        for (&line, &label) in self.lines.iter().zip(&self.labels) {
            let Some(id) = ids[label as usize] else {
                return Err(DataError::UnknownLabel {
                    path: path.to_path_buf(),
                    line,
                    label: self.names[label as usize].clone(),
                    classes: classes.join(", "),
                });
            };
            out.push(Review { id: line as u32, rating: 0, label: id, text: String::new() });
        }
        Ok(out)
    }
}

/// Whether [`read_encoded`] reads `input` (files; class folders are read whole).
pub(crate) fn streams(input: &Input, options: &FormatOptions) -> bool {
    let test_is_folder = options.test_data.as_deref().is_some_and(Path::is_dir);
    input.format != super::CorpusFormat::Folders && !test_is_folder
}

/// The corpus checksum of a streamed input, from the files' bytes alone (nothing parsed),
/// so that a warm cache is found before anything is read.
pub(crate) fn checksum(input: &Input, options: &FormatOptions) -> Result<String> {
    let train = records::digest(&input.path)?;
    let test = options.test_data.as_deref().map(records::digest).transpose()?;
    Ok(checksum_of(input, options, &train, test.as_deref()))
}

/// Reads and encodes `input` (and `data.test_data`, or the held-out part): the encoded
/// corpus, its token counts, and the rows decoded lossily.
pub(crate) fn read_encoded(
    input: &Input,
    options: &FormatOptions,
    min_freq: u32,
    max_vocab: usize,
) -> Result<(EncodedCorpus, TokenCounts, Vec<String>)> {
    let (train, train_part) = Tokenized::read(input, options)?;
    let classes = classes_of(&input.path, train.names.iter().map(String::as_str))?;
    let mut train_reviews = train.reviews(&classes, &input.path)?;
    let mut lossy = train_part.lossy;
    let (train_chunks, test_reviews, test_chunks, test_digest) = match &options.test_data {
        Some(path) => {
            let test_input =
                super::Input { format: super::resolve_format(path, options.format)?, path: path.clone() };
            let (test, test_part) = Tokenized::read(&test_input, options)?;
            let reviews = test.reviews(&classes, path)?;
            lossy.extend(test_part.lossy);
            (train.chunks, reviews, test.chunks, Some(test_part.digest))
        }
        None if options.test_fraction > 0.0 => {
            let held = hold_out_mask(
                train_reviews.iter().map(|r| r.label),
                classes.len(),
                options.test_fraction,
                options.seed,
            );
            if !held.contains(&true) {
                return Err(none_held_out(&input.path, options, train_reviews.len()));
            }
            let (kept_chunks, held_chunks) = split_rows(train.chunks, &held);
            let (mut kept, mut out) = (Vec::new(), Vec::new());
            for (review, held) in train_reviews.into_iter().zip(&held) {
                if *held {
                    out.push(review);
                } else {
                    kept.push(review);
                }
            }
            train_reviews = kept;
            (kept_chunks, out, held_chunks, None)
        }
        None => return Err(no_test_split(&input.path)),
    };
    let checksum = checksum_of(input, options, &train_part.digest, test_digest.as_deref());
    let parts = ChunkedCorpus {
        train: (&train_reviews, &train_chunks),
        test: (&test_reviews, &test_chunks),
        classes: &classes,
        checksum: &checksum,
    };
    let (corpus, counts) = encode_chunks(parts, min_freq, max_vocab);
    Ok((corpus, counts, lossy))
}

/// Each chunk cut in two by rows: those not `held` (which keep the chunk's word list), and
/// those `held` (with a list of only their words); tokens are chunk-local word ids, counts
/// are recounted, and every array is allocated at its final size.
fn split_rows(chunks: Vec<LocalChunk>, held: &[bool]) -> (Vec<LocalChunk>, Vec<LocalChunk>) {
    let mut row = 0;
    let (mut kept, mut out) = (Vec::with_capacity(chunks.len()), Vec::with_capacity(chunks.len()));
    for chunk in chunks {
        let rows = &held[row..row + chunk.lengths.len()];
        let held_tokens: usize =
            chunk.lengths.iter().zip(rows).filter(|(_, &h)| h).map(|(&l, _)| l as usize).sum();
        let held_rows = rows.iter().filter(|&&h| h).count();
        let mut a = LocalChunk {
            words: Vec::new(),
            counts: vec![0; chunk.words.len()],
            tokens: Vec::with_capacity(chunk.tokens.len() - held_tokens),
            lengths: Vec::with_capacity(rows.len() - held_rows),
        };
        let mut b = LocalChunk {
            words: Vec::new(),
            counts: Vec::new(),
            tokens: Vec::with_capacity(held_tokens),
            lengths: Vec::with_capacity(held_rows),
        };
        // The held rows' words, renumbered in order of first use.
        let mut renumber: Vec<u32> = vec![u32::MAX; chunk.words.len()];
        let mut at = 0;
        for (&len, &is_held) in chunk.lengths.iter().zip(rows) {
            let tokens = &chunk.tokens[at..at + len as usize];
            if is_held {
                for &t in tokens {
                    let slot = &mut renumber[t as usize];
                    if *slot == u32::MAX {
                        *slot = b.words.len() as u32;
                        b.words.push(chunk.words[t as usize].clone());
                        b.counts.push(0);
                    }
                    b.counts[*slot as usize] += 1;
                    b.tokens.push(*slot);
                }
                b.lengths.push(len);
            } else {
                for &t in tokens {
                    a.counts[t as usize] += 1;
                }
                a.tokens.extend_from_slice(tokens);
                a.lengths.push(len);
            }
            at += len as usize;
        }
        a.words = chunk.words;
        row += rows.len();
        kept.push(a);
        out.push(b);
    }
    (kept, out)
}
