//! CSV, TSV, JSONL and fastText files, read as streams (through a gzip decoder when the
//! file starts with gzip's magic bytes) and hashed as they are read.

use std::cell::RefCell;
use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use sha2::{Digest, Sha256};

use super::{CorpusFormat, Example, FormatOptions, InvalidUtf8, Part};
use crate::corpus::{Hashing, MAX_REVIEW_BYTES};
use crate::error::{io_err, DataError, Result};
use crate::integrity::FileDigest;

/// Longest line of a JSONL or fastText file: one example and its JSON escapes.
const MAX_LINE_BYTES: u64 = 2 * MAX_REVIEW_BYTES as u64 + 4096;

/// An open file: its (decompressed) bytes, and whether they come through gzip.
struct Source {
    path: PathBuf,
    reader: Box<dyn BufRead>,
    sha: Rc<RefCell<Sha256>>,
    gzip: bool,
}

impl Source {
    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(io_err(path))?;
        let sha = Rc::new(RefCell::new(Sha256::new()));
        let mut raw = BufReader::with_capacity(1 << 20, Hashing { inner: file, sha: sha.clone() });
        let gzip = raw.fill_buf().map_err(io_err(path))?.starts_with(&[0x1f, 0x8b]);
        let reader: Box<dyn BufRead> = if gzip {
            Box::new(BufReader::with_capacity(1 << 20, flate2::bufread::MultiGzDecoder::new(raw)))
        } else {
            Box::new(raw)
        };
        Ok(Self { path: path.to_path_buf(), reader, sha, gzip })
    }

    /// An error of reading, at `line` (the last line read whole).
    fn io(&self, line: u64, cause: std::io::Error) -> DataError {
        if self.gzip {
            DataError::BadRecord {
                path: self.path.clone(),
                line,
                message: format!("truncated or corrupt gzip data after this line: {cause}"),
            }
        } else {
            DataError::Io { path: self.path.clone(), cause }
        }
    }

    fn digest(&self) -> String {
        hex::encode(self.sha.borrow().clone().finalize())
    }
}

/// Decodes text under the UTF-8 policy, counting the rows that were not valid UTF-8.
struct Utf8 {
    policy: InvalidUtf8,
    rows: u64,
    first: Option<u64>,
    lossy: Vec<String>,
}

impl Utf8 {
    fn new(policy: InvalidUtf8) -> Self {
        Self { policy, rows: 0, first: None, lossy: Vec::new() }
    }

    /// The row's fields as text; a row is counted once however many of its fields are bad.
    fn decode<const N: usize>(&mut self, path: &Path, line: u64, fields: [&[u8]; N]) -> [String; N] {
        let mut bad = false;
        let out = fields.map(|f| match std::str::from_utf8(f) {
            Ok(s) => s.to_string(),
            Err(_) => {
                bad = true;
                String::from_utf8_lossy(f).into_owned()
            }
        });
        if bad {
            self.rows += 1;
            self.first.get_or_insert(line);
            if self.policy == InvalidUtf8::Replace {
                self.lossy.push(format!("{}:{line}", path.display()));
            }
        }
        out
    }

    fn finish(self, path: &Path) -> Result<Vec<String>> {
        match (self.policy, self.first) {
            (InvalidUtf8::Refuse, Some(first)) => Err(DataError::InvalidUtf8 {
                path: path.to_path_buf(),
                rows: self.rows,
                first: format!("line {first}"),
            }),
            (InvalidUtf8::Replace, Some(first)) => {
                tracing::warn!(
                    file = %path.display(),
                    rows = self.rows,
                    first_line = first,
                    "examples that are not valid UTF-8 were decoded with U+FFFD replacements"
                );
                Ok(self.lossy)
            }
            _ => Ok(self.lossy),
        }
    }
}

/// Checks one example's label and text.
fn example(path: &Path, line: u64, label: String, text: String) -> Result<Example> {
    let bad = |message: String| DataError::BadRecord { path: path.to_path_buf(), line, message };
    let label = label.trim();
    if label.is_empty() {
        return Err(bad("the label is empty".into()));
    }
    if text.trim().is_empty() {
        return Err(bad("the text is empty".into()));
    }
    if text.len() > MAX_REVIEW_BYTES {
        return Err(bad(format!("the text is {} bytes; at most {MAX_REVIEW_BYTES} allowed", text.len())));
    }
    Ok(Example { line, label: label.to_string(), text })
}

pub(crate) fn read(path: &Path, format: CorpusFormat, options: &FormatOptions) -> Result<Part> {
    let mut examples = Vec::new();
    let mut part = read_each(path, format, options, &mut |e| {
        examples.push(e);
        Ok(())
    })?;
    part.examples = examples;
    Ok(part)
}

/// What a streamed file gave besides its examples.
pub(crate) struct PartDigest {
    pub digest: String,
    pub lossy: Vec<String>,
}

/// Reads `path`, handing each example to `sink` as soon as it is read; the [`Part`] it
/// returns has no examples, only the digest and what was decoded lossily.
pub(crate) fn read_each(
    path: &Path,
    format: CorpusFormat,
    options: &FormatOptions,
    sink: &mut dyn FnMut(Example) -> Result<()>,
) -> Result<Part> {
    let mut source = Source::open(path)?;
    let mut utf8 = Utf8::new(options.invalid_utf8);
    let mut count = 0u64;
    let mut counted = |e: Example| {
        count += 1;
        sink(e)
    };
    match format {
        CorpusFormat::Csv => read_delimited(&mut source, b',', options, &mut utf8, &mut counted)?,
        CorpusFormat::Tsv => read_delimited(&mut source, b'\t', options, &mut utf8, &mut counted)?,
        _ => read_lines(&mut source, format, options, &mut utf8, &mut counted)?,
    };
    let lossy = utf8.finish(path)?;
    if count == 0 {
        return Err(DataError::BadCorpus { path: path.to_path_buf(), message: "holds no examples".into() });
    }
    Ok(Part { path: path.to_path_buf(), examples: Vec::new(), digest: source.digest(), lossy })
}

/// sha256 of the file's bytes, as [`read_each`] computes it, without parsing them.
pub(crate) fn digest(path: &Path) -> Result<String> {
    Ok(FileDigest::of_file(path).map_err(io_err(path))?.sha256)
}

fn read_delimited(
    source: &mut Source,
    delimiter: u8,
    options: &FormatOptions,
    utf8: &mut Utf8,
    sink: &mut dyn FnMut(Example) -> Result<()>,
) -> Result<()> {
    let path = source.path.clone();
    let reader: &mut dyn BufRead = &mut source.reader;
    let mut csv =
        csv::ReaderBuilder::new().delimiter(delimiter).has_headers(true).flexible(false).from_reader(reader);
    let mut last_line = 1;
    let csv_err = |e: csv::Error, last_line: u64, source_io: &dyn Fn(u64, std::io::Error) -> DataError| {
        let line = e.position().map_or(last_line, |p| p.line());
        let message = e.to_string();
        match e.into_kind() {
            csv::ErrorKind::Io(cause) => source_io(last_line, cause),
            csv::ErrorKind::UnequalLengths { expected_len, len, .. } => DataError::BadRecord {
                path: path.clone(),
                line,
                message: format!("the row has {len} fields, the header has {expected_len}"),
            },
            _ => DataError::BadRecord { path: path.clone(), line, message },
        }
    };
    let gzip = source.gzip;
    let io = |line: u64, cause: std::io::Error| {
        if gzip {
            DataError::BadRecord {
                path: path.clone(),
                line,
                message: format!("truncated or corrupt gzip data after this line: {cause}"),
            }
        } else {
            DataError::Io { path: path.clone(), cause }
        }
    };
    let header = csv.byte_headers().map_err(|e| csv_err(e, 1, &io))?.clone();
    let names: Vec<String> = header
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let name = String::from_utf8_lossy(name);
            let name = if i == 0 { name.trim_start_matches('\u{feff}') } else { &name };
            name.trim().to_string()
        })
        .collect();
    if names.iter().all(String::is_empty) {
        return Err(DataError::BadCorpus {
            path: path.clone(),
            message: "is empty: expected a header line naming the text and label columns".into(),
        });
    }
    let mut seen = HashSet::new();
    for name in &names {
        if !seen.insert(name.as_str()) {
            return Err(DataError::BadRecord {
                path: path.clone(),
                line: 1,
                message: format!("the header names the column {name:?} twice"),
            });
        }
    }
    let column = |wanted: &str, flag: &str| {
        names.iter().position(|n| n == wanted).ok_or_else(|| DataError::BadRecord {
            path: path.clone(),
            line: 1,
            message: format!(
                "the header has no column {wanted:?} ({flag} names it); its columns: {}",
                names.iter().map(|n| format!("{n:?}")).collect::<Vec<_>>().join(", ")
            ),
        })
    };
    let text_at = column(&options.text_column, "--text-column")?;
    let label_at = column(&options.label_column, "--label-column")?;
    let mut record = csv::ByteRecord::new();
    loop {
        match csv.read_byte_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => return Err(csv_err(e, last_line, &io)),
        }
        let line = record.position().map_or(last_line + 1, |p| p.line());
        last_line = line;
        let [label, text] = utf8.decode(&path, line, [&record[label_at], &record[text_at]]);
        sink(example(&path, line, label, text)?)?;
    }
    Ok(())
}

fn read_lines(
    source: &mut Source,
    format: CorpusFormat,
    options: &FormatOptions,
    utf8: &mut Utf8,
    sink: &mut dyn FnMut(Example) -> Result<()>,
) -> Result<()> {
    let path = source.path.clone();
    let mut buf = Vec::new();
    let mut line = 0u64;
    loop {
        buf.clear();
        let n = (&mut source.reader)
            .take(MAX_LINE_BYTES)
            .read_until(b'\n', &mut buf)
            .map_err(|e| source.io(line, e))?;
        if n == 0 {
            break;
        }
        line += 1;
        if n as u64 == MAX_LINE_BYTES && buf.last() != Some(&b'\n') {
            return Err(DataError::BadRecord {
                path,
                line,
                message: format!("the line is longer than {MAX_LINE_BYTES} bytes"),
            });
        }
        while matches!(buf.last(), Some(b'\n' | b'\r')) {
            buf.pop();
        }
        if buf.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let [text] = utf8.decode(&path, line, [&buf]);
        let (label, text) = match format {
            CorpusFormat::Jsonl => json_example(&path, line, &text, options)?,
            _ => fasttext_example(&path, line, &text)?,
        };
        sink(example(&path, line, label, text)?)?;
    }
    Ok(())
}

fn json_example(path: &Path, line: u64, text: &str, options: &FormatOptions) -> Result<(String, String)> {
    let bad = |message: String| DataError::BadRecord { path: path.to_path_buf(), line, message };
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let serde_json::Value::Object(mut object) = value else {
        return Err(bad("not a JSON object".into()));
    };
    let text = match object.remove(&options.text_column) {
        Some(serde_json::Value::String(s)) => s,
        Some(other) => return Err(bad(format!("{:?} is not a string: {other}", options.text_column))),
        None => return Err(bad(format!("no key {:?} (--text-column names it)", options.text_column))),
    };
    let label = match object.remove(&options.label_column) {
        Some(serde_json::Value::String(s)) => s,
        Some(serde_json::Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
        Some(other) => {
            return Err(bad(format!(
                "{:?} must be a string or an integer, got {other}",
                options.label_column
            )))
        }
        None => return Err(bad(format!("no key {:?} (--label-column names it)", options.label_column))),
    };
    Ok((label, text))
}

const FASTTEXT_PREFIX: &str = "__label__";

fn fasttext_example(path: &Path, line: u64, text: &str) -> Result<(String, String)> {
    let bad =
        |message: &str| DataError::BadRecord { path: path.to_path_buf(), line, message: message.into() };
    let rest = text
        .trim_start()
        .strip_prefix(FASTTEXT_PREFIX)
        .ok_or_else(|| bad("expected `__label__<class> <text>` (fastText's supervised format)"))?;
    let (label, text) = match rest.find(char::is_whitespace) {
        Some(at) => {
            let sep = rest[at..].chars().next().map_or(1, char::len_utf8);
            (&rest[..at], &rest[at + sep..])
        }
        None => (rest, ""),
    };
    if text.trim_start().starts_with(FASTTEXT_PREFIX) {
        return Err(bad("several labels on one line; one label per example is supported"));
    }
    Ok((label.to_string(), text.to_string()))
}
