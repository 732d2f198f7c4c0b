//! Every reader on small files made in a temporary folder, and every kind of bad input
//! named in issue 21: each is one error naming the file and the line (or the folder).

use std::io::Write;
use std::path::{Path, PathBuf};

use super::*;

fn options() -> FormatOptions {
    FormatOptions { test_fraction: 0.0, ..FormatOptions::default() }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, bytes).unwrap();
    path
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn read_path(path: &Path, options: &FormatOptions) -> Result<RawCorpus> {
    let input = detect(path, options)?.expect("not IMDB");
    read(&input, options)
}

fn err(path: &Path, options: &FormatOptions) -> String {
    read_path(path, options).expect_err("expected an error").to_string()
}

fn texts(reviews: &[Review]) -> Vec<(u8, &str)> {
    reviews.iter().map(|r| (r.label, r.text.as_str())).collect()
}

const CSV: &str = "id,text,label\n1,good film,pos\n2,\"bad, bad film\",neg\n3,\"a \"\"great\"\" one\",pos\n";

#[test]
fn every_format_reads_the_same_examples() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let test = write(d, "test.csv", b"text,label\nfine,pos\nawful,neg\n");
    let opts = FormatOptions { test_data: Some(test), ..options() };
    let csv = read_path(&write(d, "a.csv", CSV.as_bytes()), &opts).unwrap();
    let expected = vec![(1, "good film"), (0, "bad, bad film"), (1, "a \"great\" one")];
    assert_eq!(texts(&csv.train), expected);
    assert_eq!(csv.classes, ["neg", "pos"]);
    assert_eq!(texts(&csv.test), [(1, "fine"), (0, "awful")]);
    let tsv = "label\ttext\npos\tgood film\nneg\tbad, bad film\npos\ta \"great\" one\n";
    let jsonl = "{\"text\": \"good film\", \"label\": \"pos\"}\n\n{\"text\": \"bad, bad film\", \"label\": \"neg\"}\n{\"label\": \"pos\", \"text\": \"a \\\"great\\\" one\"}\n";
    let ft = "__label__pos good film\n__label__neg bad, bad film\r\n__label__pos a \"great\" one\n";
    for (name, bytes) in [
        ("a.tsv", tsv.as_bytes().to_vec()),
        ("a.jsonl", jsonl.as_bytes().to_vec()),
        ("a.txt", ft.as_bytes().to_vec()),
        ("b.csv.gz", gz(CSV.as_bytes())),
        ("b.jsonl.gz", gz(jsonl.as_bytes())),
    ] {
        let raw = read_path(&write(d, name, &bytes), &opts).unwrap();
        assert_eq!(texts(&raw.train), expected, "{name}");
        assert_eq!(raw.classes, ["neg", "pos"], "{name}");
    }
    // Class folders, with their own test split.
    for (split, class, file, text) in [
        ("train", "pos", "1.txt", "good film"),
        ("train", "neg", "2.txt", "bad, bad film"),
        ("train", "pos", "3.txt", "a \"great\" one"),
        ("test", "pos", "1.txt", "fine"),
        ("test", "neg", "1.txt", "awful"),
    ] {
        write(d, &format!("folders/{split}/{class}/{file}"), text.as_bytes());
    }
    let folders = read_path(&d.join("folders"), &options()).unwrap();
    assert_eq!(texts(&folders.train), [(0, "bad, bad film"), (1, "good film"), (1, "a \"great\" one")]);
    assert_eq!(texts(&folders.test), [(0, "awful"), (1, "fine")]);
    // The checksum keys the cache: other options make another corpus.
    let replace = FormatOptions { invalid_utf8: InvalidUtf8::Replace, ..opts.clone() };
    assert_ne!(read_path(&d.join("a.csv"), &replace).unwrap().checksum, csv.checksum);
    assert_eq!(read_path(&d.join("a.csv"), &opts).unwrap().checksum, csv.checksum);
}

#[test]
fn integer_labels_sort_numerically_and_columns_are_chosen() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::from("review,stars\n");
    for i in 0..40 {
        text.push_str(&format!("review number {i},{}\n", [10, 2, 1][i % 3]));
    }
    let path = write(dir.path(), "r.csv", text.as_bytes());
    let opts = FormatOptions {
        text_column: "review".into(),
        label_column: "stars".into(),
        test_fraction: 0.25,
        ..options()
    };
    let raw = read_path(&path, &opts).unwrap();
    assert_eq!(raw.classes, ["1", "2", "10"]);
    assert_eq!(raw.train.len() + raw.test.len(), 40);
    // Stratified: every class is in both splits, in proportion; seeded.
    for class in 0..3u8 {
        let held = raw.test.iter().filter(|r| r.label == class).count();
        assert!((3..=4).contains(&held), "class {class}: {held}");
    }
    assert_eq!(texts(&read_path(&path, &opts).unwrap().test), texts(&raw.test));
    let other_seed = read_path(&path, &FormatOptions { seed: 99, ..opts.clone() }).unwrap();
    assert_ne!(texts(&other_seed.test), texts(&raw.test));
    // JSONL labels may be integers too.
    let jsonl = write(
        dir.path(),
        "i.jsonl",
        b"{\"text\":\"a\",\"label\":1}\n{\"text\":\"b\",\"label\":0}\n{\"text\":\"c\",\"label\":1}\n",
    );
    let raw = read_path(&jsonl, &FormatOptions { test_fraction: 0.5, ..options() }).unwrap();
    assert_eq!(raw.classes, ["0", "1"]);
}

#[test]
fn bad_input_is_one_error_naming_the_file_and_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let opts = FormatOptions { test_fraction: 0.3, ..options() };
    let cases: Vec<(&str, Vec<u8>, Vec<&str>)> = vec![
        (
            "malformed.csv",
            b"text,label\ngood,pos\nbad,neg,extra\n".to_vec(),
            vec!["malformed.csv:3", "3 fields", "header has 2"],
        ),
        ("dup.csv", b"text,label,text\na,pos,b\n".to_vec(), vec!["dup.csv:1", "\"text\" twice"]),
        (
            "nocol.csv",
            b"body,label\na,pos\n".to_vec(),
            vec!["nocol.csv:1", "no column \"text\"", "\"body\", \"label\""],
        ),
        ("empty.csv", b"".to_vec(), vec!["empty.csv", "is empty"]),
        ("header-only.csv", b"text,label\n".to_vec(), vec!["header-only.csv", "no examples"]),
        ("emptytext.csv", b"text,label\na,pos\n ,neg\n".to_vec(), vec!["emptytext.csv:3", "text is empty"]),
        (
            "notjson.jsonl",
            b"{\"text\":\"a\",\"label\":\"x\"}\n{oops\n".to_vec(),
            vec!["notjson.jsonl:2", "not JSON"],
        ),
        (
            "nokey.jsonl",
            b"{\"text\":\"a\",\"label\":\"x\"}\n{\"text\":\"b\"}\n".to_vec(),
            vec!["nokey.jsonl:2", "no key \"label\""],
        ),
        (
            "float.jsonl",
            b"{\"text\":\"a\",\"label\":1.5}\n".to_vec(),
            vec!["float.jsonl:1", "string or an integer"],
        ),
        ("array.jsonl", b"[1, 2]\n".to_vec(), vec!["array.jsonl:1", "not a JSON object"]),
        ("empty.jsonl", b"\n\n".to_vec(), vec!["empty.jsonl", "no examples"]),
        ("nolabel.txt", b"__label__a fine\njust text\n".to_vec(), vec!["nolabel.txt:2", "__label__"]),
        (
            "single.csv",
            b"text,label\na,x\nb,x\n".to_vec(),
            vec!["single.csv", "\"x\"", "at least two classes"],
        ),
        (
            "utf8.csv",
            b"text,label\ncaf\xe9,a\nok,b\nna\xefve,b\n".to_vec(),
            vec!["utf8.csv", "2 examples are not valid UTF-8", "line 2", "refused"],
        ),
        (
            "utf8.jsonl",
            b"{\"text\":\"a\",\"label\":\"x\"}\n{\"text\":\"caf\xe9\",\"label\":\"y\"}\n".to_vec(),
            vec!["utf8.jsonl", "1 examples", "line 2"],
        ),
    ];
    for (name, bytes, needles) in cases {
        let path = write(d, name, &bytes);
        let e = err(&path, &opts);
        assert!(!e.contains('\n'), "{name}: not one line: {e}");
        for n in needles {
            assert!(e.contains(n), "{name}: {e:?} lacks {n:?}");
        }
    }
    // A truncated .gz: the file and the last line read whole.
    let mut text = String::from("text,label\n");
    for i in 0..5000 {
        text.push_str(&format!("example {i} with some words to compress,{}\n", i % 2));
    }
    let whole = gz(text.as_bytes());
    let path = write(d, "cut.csv.gz", &whole[..whole.len() / 2]);
    let e = err(&path, &opts);
    assert!(e.contains("cut.csv.gz:") && e.contains("gzip"), "{e}");
    // Replacing instead of refusing: decoded and counted.
    let raw =
        read_path(&d.join("utf8.csv"), &FormatOptions { invalid_utf8: InvalidUtf8::Replace, ..opts.clone() })
            .unwrap();
    assert_eq!(raw.lossy_utf8.len(), 2);
    assert!(raw.train.iter().chain(&raw.test).any(|r| r.text == "caf\u{fffd}"));
    // A test label that the train data lacks.
    let train = write(d, "train.csv", b"text,label\na,x\nb,y\n");
    let test = write(d, "test.csv", b"text,label\nc,x\nd,z\n");
    let e = err(&train, &FormatOptions { test_data: Some(test), ..options() });
    assert!(e.contains("test.csv:3") && e.contains("\"z\"") && e.contains("x, y"), "{e}");
    // No test split at all.
    let e = err(&train, &options());
    assert!(e.contains("train.csv") && e.contains("--test-fraction"), "{e}");
}

#[test]
fn bad_class_folders_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "a/train/x/1.txt", b"one");
    write(d, "a/train/y/1.txt", b"two");
    std::fs::create_dir_all(d.join("a/train/z")).unwrap();
    let e = err(&d.join("a"), &options());
    assert!(e.contains("train/z") && e.contains("empty class folder"), "{e}");
    std::fs::remove_dir(d.join("a/train/z")).unwrap();
    write(d, "a/test/x/1.txt", b"three");
    write(d, "a/test/w/1.txt", b"four");
    let e = err(&d.join("a"), &options());
    assert!(e.contains("test/w") && e.contains("x, y"), "{e}");
    std::fs::remove_dir_all(d.join("a/test/w")).unwrap();
    write(d, "a/train/y/2.txt", b"bad \xff byte");
    let e = err(&d.join("a"), &options());
    assert!(e.contains("1 examples are not valid UTF-8") && e.contains("train/y/2.txt"), "{e}");
    std::fs::remove_file(d.join("a/train/y/2.txt")).unwrap();
    write(d, "b/train/only/1.txt", b"one");
    let e = err(&d.join("b"), &FormatOptions { test_fraction: 0.5, ..options() });
    assert!(e.contains("\"only\"") && e.contains("two classes"), "{e}");
    let raw = read_path(&d.join("a"), &options()).unwrap();
    assert_eq!((raw.train.len(), raw.test.len(), raw.classes.len()), (2, 1, 2));
}

#[test]
fn formats_are_detected_by_name_and_layout() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (name, format) in [
        ("x.csv", CorpusFormat::Csv),
        ("x.CSV.gz", CorpusFormat::Csv),
        ("x.tsv", CorpusFormat::Tsv),
        ("x.ndjson", CorpusFormat::Jsonl),
        ("x.jsonl.gz", CorpusFormat::Jsonl),
        ("x.ft", CorpusFormat::Fasttext),
        ("x.txt", CorpusFormat::Fasttext),
    ] {
        let path = write(d, name, b"");
        assert_eq!(detect(&path, &options()).unwrap().map(|i| i.format), Some(format), "{name}");
    }
    let tarball = write(d, "aclImdb_v1.tar.gz", b"");
    assert_eq!(detect(&tarball, &options()).unwrap(), None);
    std::fs::create_dir_all(d.join("aclImdb/train/pos")).unwrap();
    assert_eq!(detect(&d.join("aclImdb"), &options()).unwrap(), None);
    assert_eq!(detect(d, &options()).unwrap(), None, "the parent of aclImdb/");
    std::fs::create_dir_all(d.join("mine/train/pos")).unwrap();
    assert_eq!(detect(&d.join("mine"), &options()).unwrap().map(|i| i.format), Some(CorpusFormat::Folders));
    let forced = FormatOptions { format: CorpusFormat::Imdb, ..options() };
    assert_eq!(detect(&d.join("mine"), &forced).unwrap(), None);
    let csv_dir = FormatOptions { format: CorpusFormat::Csv, ..options() };
    assert!(detect(&d.join("mine"), &csv_dir).unwrap_err().to_string().contains("is a folder"));
    let held = FormatOptions { test_fraction: 0.2, ..options() };
    assert!(detect(&tarball, &held).unwrap_err().to_string().contains("data.test_fraction"));
}

#[test]
fn reading_while_encoding_gives_the_bits_of_reading_then_encoding() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // More rows than one batch of chunks, so that chunks of several batches are joined.
    let mut csv = String::from("text,label\n");
    let mut jsonl = String::new();
    for i in 0..20_000u32 {
        let label = ["red", "green", "blue"][(i % 3) as usize];
        let text = format!("word{} and word{} {label} {}", i % 97, i % 13, i % 1000);
        csv.push_str(&format!("\"{text}\",{label}\n"));
        if i % 5 == 0 {
            jsonl.push_str(&serde_json::json!({"text": text, "label": label}).to_string());
            jsonl.push('\n');
        }
    }
    let train = write(d, "train.csv", csv.as_bytes());
    let test = write(d, "test.jsonl.gz", &gz(jsonl.as_bytes()));
    let held = FormatOptions { test_fraction: 0.25, seed: 3, ..options() };
    let given = FormatOptions { test_data: Some(test), ..options() };
    for (opts, min_freq, max_vocab) in [(&held, 1, 0), (&held, 2, 50), (&given, 1, 0)] {
        let input = detect(&train, opts).unwrap().unwrap();
        assert!(streams(&input, opts));
        let raw = read(&input, opts).unwrap();
        let (whole, counts) = crate::encode::encode_corpus(&raw, min_freq, max_vocab);
        let (streamed, streamed_counts, _) = read_encoded(&input, opts, min_freq, max_vocab).unwrap();
        assert_eq!(streamed, whole);
        assert_eq!(streamed_counts, counts);
        assert_eq!(streamed_checksum(&input, opts).unwrap(), whole.checksum);
    }
    // Errors are the same too.
    let bad = write(d, "bad.csv", b"text,label\na,x\nb,y\nc,z,extra\n");
    let input = detect(&bad, &held).unwrap().unwrap();
    let e = read_encoded(&input, &held, 1, 0).err().unwrap().to_string();
    assert_eq!(e, read(&input, &held).err().unwrap().to_string());
    let unknown = write(d, "unknown.csv", b"text,label\nc,x\nd,w\n");
    let given = FormatOptions { test_data: Some(unknown), ..options() };
    let input = detect(&d.join("train.csv"), &given).unwrap().unwrap();
    let e = read_encoded(&input, &given, 1, 0).err().unwrap().to_string();
    assert_eq!(e, read(&input, &given).err().unwrap().to_string());
}
