//! Property tests of the parsers that read outside input: config TOML and the corpus (tar
//! and folder). They are the bounded, stable-Rust counterparts of the fuzz targets in
//! `fuzz/` (`config_toml`, `corpus_tar`, `corpus_folder`), which CI cannot run: each runs a
//! few hundred cases of arbitrary and of structured, damaged input, in well under a second.
//! The property everywhere: any input gives a value or an error that names the problem,
//! never a panic.

use std::io::Write;
use std::path::Path;

use proptest::prelude::*;

use crate::config::JobConfig;
use crate::corpus::{read_corpus, read_tarball_bytes, DataSource, MAX_REVIEW_BYTES};
use crate::error::{ConfigError, DataError};

fn cases(n: u32) -> ProptestConfig {
    ProptestConfig { cases: n, failure_persistence: None, ..ProptestConfig::default() }
}

/// Checks what any config text gives: a config that survives `validate` and, when valid,
/// its own TOML; or a one-line parse error.
fn check_config_text(text: &str) -> Result<(), TestCaseError> {
    match JobConfig::from_toml_str(text, Path::new("fuzz.toml")) {
        Ok(config) => {
            if config.validate().is_ok() {
                let back = JobConfig::from_toml_str(&config.to_toml(), Path::new("again.toml"));
                prop_assert_eq!(back.ok(), Some(config));
            }
        }
        Err(ConfigError::Parse { message, .. }) => prop_assert!(!message.contains('\n'), "{}", message),
        Err(other) => prop_assert!(false, "not a parse error: {}", other),
    }
    Ok(())
}

/// One `key = value` line of a config, from the real keys and a few unknown ones, with
/// values of every TOML type and out-of-range numbers.
fn config_line() -> impl Strategy<Value = String> {
    let keys = prop::sample::select(vec![
        "min_freq",
        "max_vocab",
        "max_len",
        "truncation",
        "val_fraction",
        "train_subset",
        "embed_dim",
        "hidden",
        "layers",
        "dropout",
        "head",
        "bidirectional",
        "embedding_dropout",
        "batch_size",
        "epochs",
        "optimizer",
        "lr",
        "beta1",
        "weight_decay",
        "clip_norm",
        "schedule",
        "bptt",
        "batch_order",
        "bucket_pool",
        "amp",
        "seed",
        "device",
        "threads",
        "every_steps",
        "every_seconds",
        "bogus",
    ]);
    let values = prop::sample::select(vec![
        "0",
        "1",
        "-1",
        "18446744073709551616",
        "9223372036854775807",
        "0.5",
        "1e308",
        "nan",
        "-inf",
        "\"adamw\"",
        "\"cuda:99999999999999999999\"",
        "\"\"",
        "\"é\\u0000\"",
        "true",
        "[1, 2]",
        "{ a = 1 }",
        "1979-05-27",
        "'''x'''",
    ]);
    (keys, values).prop_map(|(k, v)| format!("{k} = {v}"))
}

fn config_text() -> impl Strategy<Value = String> {
    let section = prop::sample::select(vec![
        "[data]",
        "[model]",
        "[train]",
        "[checkpoint]",
        "[other]",
        "",
        "[[train]]",
    ]);
    prop::collection::vec((section, prop::collection::vec(config_line(), 0..4)), 0..5).prop_map(|parts| {
        parts.into_iter().map(|(s, lines)| format!("{s}\n{}\n", lines.join("\n"))).collect::<String>()
    })
}

proptest! {
    #![proptest_config(cases(512))]

    #[test]
    fn any_text_is_a_config_or_a_one_line_error(text in ".{0,200}") {
        check_config_text(&text)?;
    }

    #[test]
    fn config_files_with_wrong_values_are_refused_cleanly(text in config_text()) {
        check_config_text(&text)?;
    }
}

/// One tar entry: a path from the corpus layout (good and bad names) and its bytes.
fn entry() -> impl Strategy<Value = (String, Vec<u8>)> {
    let split = prop::sample::select(vec!["train", "test", "unsup", ""]);
    let label = prop::sample::select(vec!["pos", "neg", "x"]);
    let name = prop::sample::select(vec![
        "1_8.txt",
        "2_3.txt",
        "3_10.txt",
        "4_0.txt",
        "5_11.txt",
        "x_1.txt",
        "6.txt",
        "7_7.md",
        "99999999999_9.txt",
    ]);
    let text = prop_oneof![
        Just(b"a good film".to_vec()),
        Just(Vec::new()),
        Just(b"  \n ".to_vec()),
        Just(vec![0xff, 0xfe, b'o', b'k']),
        prop::collection::vec(any::<u8>(), 0..40),
    ];
    (split, label, name, text).prop_map(|(s, l, n, t)| (format!("aclImdb/{s}/{l}/{n}"), t))
}

fn tar_of(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, data) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        // A path the tar format cannot hold is simply left out.
        let _ = builder.append_data(&mut header, path, data.as_slice());
    }
    builder.into_inner().unwrap_or_default()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let _ = enc.write_all(bytes);
    enc.finish().unwrap_or_default()
}

/// What reading a corpus may give: reviews that keep the layout's promises, or an error.
fn check_corpus(result: Result<crate::corpus::RawCorpus, DataError>) -> Result<(), TestCaseError> {
    if let Ok(corpus) = result {
        for review in corpus.train.iter().chain(&corpus.test) {
            prop_assert!(review.label <= 1 && (1..=10).contains(&review.rating));
            prop_assert!(!review.text.trim().is_empty());
        }
        for split in [&corpus.train, &corpus.test] {
            prop_assert!(split.iter().any(|r| r.label == 0) && split.iter().any(|r| r.label == 1));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn any_bytes_are_a_corpus_or_an_error(bytes in prop::collection::vec(any::<u8>(), 0..2048), gz in any::<bool>()) {
        let bytes = if gz { gzip(&bytes) } else { bytes };
        check_corpus(read_tarball_bytes(&bytes, Path::new("fuzz.tar.gz")))?;
    }

    /// Real archives, then damaged: cut short, or one byte changed anywhere (headers,
    /// checksums, sizes, the gzip trailer).
    #[test]
    fn damaged_tarballs_are_refused_cleanly(
        entries in prop::collection::vec(entry(), 0..12),
        gz in any::<bool>(),
        cut in any::<prop::sample::Index>(),
        flip in any::<Option<(prop::sample::Index, u8)>>(),
    ) {
        let tar = tar_of(&entries);
        let mut bytes = if gz { gzip(&tar) } else { tar };
        match flip {
            Some((at, xor)) if !bytes.is_empty() => {
                let i = at.index(bytes.len());
                bytes[i] ^= xor.max(1);
            }
            _ => bytes.truncate(cut.index(bytes.len() + 1).max(bytes.len() / 2)),
        }
        check_corpus(read_tarball_bytes(&bytes, Path::new("fuzz.tar.gz")))?;
    }

    #[test]
    fn folders_of_any_files_are_a_corpus_or_an_error(entries in prop::collection::vec(entry(), 0..12)) {
        let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
        for (path, data) in &entries {
            let file = dir.path().join(path);
            if let Some(parent) = file.parent() {
                let _ = std::fs::create_dir_all(parent);
            }
            let _ = std::fs::write(&file, data);
        }
        let result = read_corpus(&DataSource::Folder(dir.path().join("aclImdb")));
        if let Err(e) = &result {
            prop_assert!(e.to_string().contains("aclImdb"), "the error names no file: {}", e);
        }
        check_corpus(result)?;
    }
}

/// Regression: a tar header that declares an entry of 2^64 - 1 bytes made the reader ask
/// for that much memory up front (a capacity-overflow panic) before reading any of it.
#[test]
fn a_tar_entry_that_claims_a_huge_size_is_refused_before_any_allocation() {
    for claimed in [u64::MAX, (MAX_REVIEW_BYTES as u64) + 1, 1 << 40] {
        let mut header = tar::Header::new_gnu();
        header.set_path("aclImdb/train/pos/1_8.txt").expect("a path");
        header.set_size(claimed);
        header.set_mode(0o644);
        header.set_cksum();
        let mut bytes = header.as_bytes().to_vec();
        bytes.extend_from_slice(&[b'a'; 512]);
        let e = read_tarball_bytes(&bytes, Path::new("huge.tar")).unwrap_err();
        let message = e.to_string();
        assert!(
            matches!(e, DataError::ReviewTooLarge { .. } | DataError::Tar { .. }),
            "{claimed}: {message}"
        );
        if let DataError::ReviewTooLarge { .. } = e {
            assert!(
                message.contains("train/pos/1_8.txt") && message.contains(&claimed.to_string()),
                "{message}"
            );
        }
    }
}

/// A review longer than the bound is refused naming it, from a tarball and from a folder,
/// also when a gzip stream expands to it.
#[test]
fn a_review_over_the_bound_is_refused_naming_it() {
    let big = vec![b'a'; MAX_REVIEW_BYTES + 1];
    let entries = vec![("aclImdb/train/neg/3_2.txt".to_string(), big.clone())];
    let e = read_tarball_bytes(&gzip(&tar_of(&entries)), Path::new("big.tar.gz")).unwrap_err().to_string();
    assert!(e.contains("train/neg/3_2.txt") && e.contains("at most 8388608 bytes"), "{e}");
    let dir = tempfile::tempdir().expect("a temporary folder");
    let file = dir.path().join("aclImdb/train/neg/3_2.txt");
    std::fs::create_dir_all(file.parent().expect("a parent")).expect("folders");
    std::fs::write(&file, &big).expect("a review");
    let e = read_corpus(&DataSource::Folder(dir.path().join("aclImdb"))).unwrap_err().to_string();
    assert!(e.contains("train/neg/3_2.txt") && e.contains("8388609 bytes"), "{e}");
}

/// Lines of a labelled file, from pieces that matter to its parsers: separators, quotes,
/// braces, fastText's prefix, a label key, bytes that are not UTF-8.
fn labelled_bytes() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop::sample::select(vec![
        &b"text"[..],
        b"label",
        b",",
        b"\t",
        b"\"",
        b"\n",
        b"\r\n",
        b"{",
        b"}",
        b":",
        b"__label__",
        b"a",
        b"b",
        b" ",
        b"good film",
        b"\xff",
        b"{\"text\":\"x\",\"label\":\"a\"}\n",
        b"{\"text\":\"y\",\"label\":2}\n",
        b"__label__a nice\n",
        b"__label__b bad\n",
        b"text,label\n",
        b"y,b\n",
    ]);
    prop::collection::vec(piece, 0..40).prop_map(|pieces| pieces.concat())
}

proptest! {
    #![proptest_config(cases(256))]

    /// CSV, TSV, JSONL and fastText files of any such bytes, plain or gzipped (whole or cut
    /// short): a corpus whose labels index its sorted classes, or a one-line error.
    #[test]
    fn labelled_files_are_a_corpus_or_a_one_line_error(
        bytes in labelled_bytes(),
        ext in prop::sample::select(vec!["csv", "tsv", "jsonl", "txt"]),
        gz in any::<bool>(),
        cut in any::<prop::sample::Index>(),
        replace in any::<bool>(),
    ) {
        use crate::labelled::{detect, read, FormatOptions, InvalidUtf8};
        let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
        let (name, bytes) = if gz {
            let z = gzip(&bytes);
            let keep = if cut.index(4) == 0 { cut.index(z.len() + 1) } else { z.len() };
            (format!("f.{ext}.gz"), z[..keep].to_vec())
        } else {
            (format!("f.{ext}"), bytes)
        };
        let path = dir.path().join(name);
        std::fs::write(&path, &bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let options = FormatOptions {
            test_fraction: 0.5,
            invalid_utf8: if replace { InvalidUtf8::Replace } else { InvalidUtf8::Refuse },
            ..FormatOptions::default()
        };
        let input = detect(&path, &options).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(input.is_some());
        match read(&input.unwrap(), &options) {
            Ok(corpus) => {
                prop_assert!(corpus.classes.len() >= 2);
                for review in corpus.train.iter().chain(&corpus.test) {
                    prop_assert!(usize::from(review.label) < corpus.classes.len());
                    prop_assert!(!review.text.trim().is_empty());
                }
                prop_assert!(!corpus.train.is_empty() && !corpus.test.is_empty());
            }
            Err(e) => {
                let message = e.to_string();
                prop_assert!(!message.contains('\n'), "{}", message);
                prop_assert!(message.contains("f."), "{}", message);
            }
        }
    }
}
