//! A folder of class folders, as Keras' `text_dataset_from_directory` reads:
//! `train/<class>/*.txt` and optionally `test/<class>/*.txt`. Without `train/`, the folder's
//! own subfolders are the classes of the train data. Files are taken by name order.

use std::fs::File;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{Example, FormatOptions, InvalidUtf8, Part};
use crate::corpus::MAX_REVIEW_BYTES;
use crate::error::{io_err, DataError, Result};

pub(crate) fn read(root: &Path, options: &FormatOptions) -> Result<(Part, Option<Part>)> {
    let train_dir = root.join("train");
    let test_dir = root.join("test");
    if !train_dir.is_dir() {
        return Ok((read_split(root, options)?, None));
    }
    let train = read_split(&train_dir, options)?;
    if !test_dir.is_dir() || options.test_data.is_some() {
        return Ok((train, None));
    }
    let test = read_split(&test_dir, options)?;
    let train_classes: Vec<&str> = {
        let mut c: Vec<&str> = train.examples.iter().map(|e| e.label.as_str()).collect();
        c.dedup();
        c
    };
    if let Some(unknown) = test.examples.iter().find(|e| !train_classes.contains(&e.label.as_str())) {
        return Err(DataError::BadCorpus {
            path: test_dir.join(&unknown.label),
            message: format!(
                "is a class that the train data does not have (its classes: {})",
                train_classes.join(", ")
            ),
        });
    }
    Ok((train, Some(test)))
}

fn sorted_entries(dir: &Path, want_dirs: bool) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let kind = entry.file_type().map_err(io_err(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let wanted = if want_dirs { kind.is_dir() } else { kind.is_file() && name.ends_with(".txt") };
        if wanted {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// `dir/<class>/*.txt`: examples by class name, then by file name. An example's `line` is
/// its index in that order (folders have no lines; errors name the file).
fn read_split(dir: &Path, options: &FormatOptions) -> Result<Part> {
    let classes = sorted_entries(dir, true)?;
    if classes.is_empty() {
        return Err(DataError::BadCorpus {
            path: dir.to_path_buf(),
            message: "holds no class folders: expected train/<class>/*.txt (or <class>/*.txt), or \
                      IMDB's aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt"
                .into(),
        });
    }
    let mut digest = Sha256::new();
    let mut examples = Vec::new();
    let (mut lossy, mut bad_utf8, mut first_bad): (Vec<String>, u64, Option<PathBuf>) = (Vec::new(), 0, None);
    let mut sorted = classes.clone();
    super::sort_classes(&mut sorted);
    for class in sorted {
        let class_dir = dir.join(&class);
        let files = sorted_entries(&class_dir, false)?;
        if files.is_empty() {
            return Err(DataError::BadCorpus {
                path: class_dir,
                message: "is an empty class folder: it holds no .txt files".into(),
            });
        }
        for name in files {
            let file = class_dir.join(&name);
            let bytes = read_file(&file)?;
            digest.update(format!("{class}/{name}\0{}\0", bytes.len()).as_bytes());
            digest.update(&bytes);
            let text = match String::from_utf8(bytes) {
                Ok(text) => text,
                Err(e) => {
                    bad_utf8 += 1;
                    first_bad.get_or_insert_with(|| file.clone());
                    lossy.push(file.display().to_string());
                    String::from_utf8_lossy(e.as_bytes()).into_owned()
                }
            };
            if text.trim().is_empty() {
                return Err(DataError::BadCorpus { path: file, message: "is empty".into() });
            }
            examples.push(Example { line: examples.len() as u64, label: class.clone(), text });
        }
    }
    if let (InvalidUtf8::Refuse, Some(first)) = (options.invalid_utf8, &first_bad) {
        return Err(DataError::InvalidUtf8 {
            path: dir.to_path_buf(),
            rows: bad_utf8,
            first: first.display().to_string(),
        });
    }
    if let Some(first) = &first_bad {
        tracing::warn!(folder = %dir.display(), files = bad_utf8, first = %first.display(),
            "files that are not valid UTF-8 were decoded with U+FFFD replacements");
    }
    Ok(Part { path: dir.to_path_buf(), examples, digest: hex::encode(digest.finalize()), lossy })
}

fn read_file(file: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut reader = File::open(file).map_err(io_err(file))?;
    let declared = reader.metadata().map_err(io_err(file))?.len();
    let too_large = |bytes: u64| DataError::BadCorpus {
        path: file.to_path_buf(),
        message: format!("is {bytes} bytes; at most {MAX_REVIEW_BYTES} allowed"),
    };
    if declared > MAX_REVIEW_BYTES as u64 {
        return Err(too_large(declared));
    }
    let mut bytes = Vec::with_capacity(declared as usize);
    (&mut reader).take(MAX_REVIEW_BYTES as u64 + 1).read_to_end(&mut bytes).map_err(io_err(file))?;
    if bytes.len() > MAX_REVIEW_BYTES {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}
