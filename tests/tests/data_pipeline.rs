//! The data pipeline through the real `coordinator data` binary: exact counts on the shared
//! corpus, every source kind, the cache, the checked download, and every kind of bad input.

mod common;

use common::*;

fn ok_json(cmd: &mut std::process::Command) -> serde_json::Value {
    let out = run(cmd.arg("--json"));
    assert!(out.status.success(), "failed: {}", stderr(&out));
    json(&out)
}

/// Runs and expects failure with a single-line error mentioning every `needle`.
fn fails_with(cmd: &mut std::process::Command, needles: &[&str]) -> String {
    let out = run(cmd);
    let err = stderr(&out);
    assert!(!out.status.success(), "expected failure, got success: {}", stdout(&out));
    let line =
        err.lines().find(|l| l.starts_with("error: ")).unwrap_or_else(|| panic!("no error line in: {err}"));
    for n in needles {
        assert!(line.contains(n), "error line {line:?} lacks {n:?}");
    }
    assert!(!err.contains("panicked"), "panic: {err}");
    line.to_string()
}

#[test]
fn shared_corpus_has_the_reference_counts_and_both_labels() {
    let Some(data) = imdb_data() else { return };
    let cache = tempfile::tempdir().unwrap();
    let v = ok_json(coordinator_data(cache.path()).arg("--data").arg(&data).arg("--no-cache"));
    assert_eq!(v["train"]["reviews"], 25_000);
    assert_eq!(v["test"]["reviews"], 25_000);
    assert_eq!(v["train"]["tokens"], 6_767_187);
    assert_eq!(v["vocab"]["words"], 100_682);
    // The tutorial's label bug made every label 0: here both classes are there, balanced.
    for split in ["train", "test"] {
        assert_eq!(v[split]["pos"], 12_500, "{split}");
        assert_eq!(v[split]["neg"], 12_500, "{split}");
    }
    assert_eq!(v["train"]["length"]["max"], 2752);
    assert!(v["test"]["tokens"].as_u64().unwrap() > 6_000_000);
    assert_eq!(v["pipeline"]["cache"]["status"], "disabled");
}

#[test]
fn tarball_and_folder_give_the_same_corpus() {
    let dir = tempfile::tempdir().unwrap();
    let files = small_corpus();
    let tarball = write_tarball(dir.path(), "small.tar.gz", &files);
    let folder = write_folder(&dir.path().join("extracted"), &files);
    let cache = tempfile::tempdir().unwrap();
    let a = ok_json(coordinator_data(cache.path()).arg("--data").arg(&tarball));
    let b = ok_json(coordinator_data(cache.path()).arg("--data").arg(&folder));
    // The parent of aclImdb/ is accepted too.
    let c = ok_json(coordinator_data(cache.path()).arg("--data").arg(dir.path().join("extracted")));
    for key in ["train", "test", "vocab"] {
        assert_eq!(a[key], b[key], "{key}");
        assert_eq!(b[key], c[key], "{key}");
    }
    assert_eq!(a["train"]["reviews"], 6);
    assert_eq!(a["train"]["pos"], 3);
    // unsup/ and urls files are not reviews.
    assert_eq!(a["test"]["reviews"], 6);
}

#[test]
fn warm_cache_skips_tokenizing_and_damaged_or_stale_caches_are_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let tarball = write_tarball(dir.path(), "c.tar.gz", &small_corpus());
    let first = ok_json(coordinator_data(cache.path()).arg("--data").arg(&tarball));
    assert_eq!(first["pipeline"]["cache"]["status"], "built");
    let second = ok_json(coordinator_data(cache.path()).arg("--data").arg(&tarball));
    assert_eq!(second["pipeline"]["cache"]["status"], "hit");
    let stages: Vec<&str> =
        second["pipeline"]["stages"].as_array().unwrap().iter().map(|s| s[0].as_str().unwrap()).collect();
    assert_eq!(stages, ["cache load"], "a warm run must not read or tokenize");
    assert_eq!(first["train"], second["train"]);
    assert_eq!(first["vocab"], second["vocab"]);

    // Flip one byte of the cache file: detected and rebuilt, same result.
    let cache_file = std::fs::read_dir(cache.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("encoded-"))
        .expect("cache file");
    let mut bytes = std::fs::read(&cache_file).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x40;
    std::fs::write(&cache_file, &bytes).unwrap();
    let third = ok_json(coordinator_data(cache.path()).arg("--data").arg(&tarball));
    assert_eq!(third["pipeline"]["cache"]["status"], "rebuilt");
    assert!(third["pipeline"]["cache"]["reason"].as_str().unwrap().contains("CRC"));
    assert_eq!(third["train"], first["train"]);

    // Other vocabulary settings are another cache entry, not a stale hit.
    let capped =
        ok_json(coordinator_data(cache.path()).arg("--data").arg(&tarball).args(["--max-vocab", "3"]));
    assert_eq!(capped["pipeline"]["cache"]["status"], "built");
    assert_eq!(capped["vocab"]["words"], 3);

    // The corpus changes under the same name: the old cache is not trusted.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let mut files = small_corpus();
    files.push(("aclImdb/train/pos/99_9.txt".into(), b"one more good review".to_vec()));
    write_tarball(dir.path(), "c.tar.gz", &files);
    let changed = ok_json(coordinator_data(cache.path()).arg("--data").arg(&tarball));
    assert_eq!(changed["pipeline"]["cache"]["status"], "built");
    assert_eq!(changed["train"]["reviews"], 7);
}

#[test]
fn download_is_checked_stored_and_then_reused() {
    let body = gzip(&tar_bytes(&small_corpus()));
    let server = serve(body.clone());
    let cache = tempfile::tempdir().unwrap();
    let mut cmd = coordinator_data(cache.path());
    cmd.args(["--data-url", &server.url, "--data-sha256", &sha256_hex(&body), "--data-md5", &md5_hex(&body)]);
    let v = ok_json(&mut cmd);
    assert_eq!(v["train"]["reviews"], 6);
    let stored = cache.path().join("aclImdb_v1.tar.gz");
    assert_eq!(std::fs::read(&stored).unwrap(), body);
    assert_eq!(server.requests.load(std::sync::atomic::Ordering::SeqCst), 1);
    // Second run: the stored, checked file is used; nothing is downloaded again.
    let mut again = coordinator_data(cache.path());
    again.args([
        "--data-url",
        &server.url,
        "--data-sha256",
        &sha256_hex(&body),
        "--data-md5",
        &md5_hex(&body),
    ]);
    let v2 = ok_json(&mut again);
    assert_eq!(v2["pipeline"]["cache"]["status"], "hit");
    assert_eq!(server.requests.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[test]
fn download_with_a_wrong_checksum_leaves_nothing_to_trust() {
    let body = gzip(&tar_bytes(&small_corpus()));
    let server = serve(body.clone());
    let cache = tempfile::tempdir().unwrap();
    let wrong = "0".repeat(64);
    fails_with(
        coordinator_data(cache.path()).args([
            "--data-url",
            &server.url,
            "--data-sha256",
            &wrong,
            "--data-md5",
            &md5_hex(&body),
        ]),
        &["sha256 mismatch", &wrong, &sha256_hex(&body), "deleted"],
    );
    fails_with(
        coordinator_data(cache.path()).args([
            "--data-url",
            &server.url,
            "--data-sha256",
            &sha256_hex(&body),
            "--data-md5",
            "ab",
        ]),
        &["md5 mismatch"],
    );
    let left: Vec<_> = std::fs::read_dir(cache.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(
        left.iter().all(|n| !n.to_string_lossy().starts_with("aclImdb_v1")),
        "a bad download was left in the cache: {left:?}"
    );
    // Nobody listening: a clear download error.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/x.tar.gz", closed.local_addr().unwrap());
    drop(closed);
    fails_with(coordinator_data(cache.path()).args(["--data-url", &url]), &["download of", &url]);
}

#[test]
fn damaged_archives_are_refused_with_the_file_named() {
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let good = gzip(&tar_bytes(&small_corpus()));

    let truncated = dir.path().join("truncated.tar.gz");
    std::fs::write(&truncated, &good[..good.len() * 2 / 3]).unwrap();
    fails_with(coordinator_data(cache.path()).arg("--data").arg(&truncated), &["truncated.tar.gz", "gzip"]);

    // Cut just before the gzip trailer: every tar entry is there, the CRC is not.
    let no_trailer = dir.path().join("no_trailer.tar.gz");
    std::fs::write(&no_trailer, &good[..good.len() - 4]).unwrap();
    fails_with(coordinator_data(cache.path()).arg("--data").arg(&no_trailer), &["no_trailer.tar.gz", "gzip"]);

    let not_tar = dir.path().join("text.tar.gz");
    std::fs::write(&not_tar, gzip(&b"just some text, not a tar archive at all\n".repeat(40))).unwrap();
    fails_with(coordinator_data(cache.path()).arg("--data").arg(&not_tar), &["text.tar.gz", "tar"]);

    let plain = dir.path().join("notes.txt");
    std::fs::write(&plain, "hello").unwrap();
    fails_with(coordinator_data(cache.path()).arg("--data").arg(&plain), &["notes.txt"]);

    let mut files = small_corpus();
    files.retain(|(p, _)| !p.starts_with("aclImdb/test/neg/"));
    let missing = write_tarball(dir.path(), "missing.tar.gz", &files);
    fails_with(
        coordinator_data(cache.path()).arg("--data").arg(&missing),
        &["missing.tar.gz", "aclImdb/test/neg"],
    );

    let mut files = small_corpus();
    files.push(("aclImdb/train/neg/50_2.txt".into(), b"  \n".to_vec()));
    let empty = write_tarball(dir.path(), "empty.tar.gz", &files);
    fails_with(
        coordinator_data(cache.path()).arg("--data").arg(&empty),
        &["empty.tar.gz", "train/neg/50_2.txt", "empty"],
    );

    let mut files = small_corpus();
    files.push(("aclImdb/train/neg/oops.txt".into(), b"text".to_vec()));
    let badname = write_tarball(dir.path(), "badname.tar.gz", &files);
    fails_with(coordinator_data(cache.path()).arg("--data").arg(&badname), &["badname.tar.gz", "oops.txt"]);

    fails_with(
        coordinator_data(cache.path()).arg("--data").arg(dir.path().join("nope.tar.gz")),
        &["nope.tar.gz", "does not exist"],
    );
    let empty_dir = dir.path().join("emptydir");
    std::fs::create_dir(&empty_dir).unwrap();
    // A folder that is not IMDB's is read as class folders; the error names both layouts.
    fails_with(
        coordinator_data(cache.path()).arg("--data").arg(&empty_dir),
        &["emptydir", "class folders", "aclImdb/{train,test}/{pos,neg}"],
    );
}

#[test]
fn invalid_utf8_is_decoded_lossily_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let mut files = small_corpus();
    files.push(("aclImdb/train/pos/77_9.txt".into(), b"caf\xe9 was great".to_vec()));
    let tarball = write_tarball(dir.path(), "latin1.tar.gz", &files);
    let v = ok_json(coordinator_data(cache.path()).arg("--data").arg(&tarball));
    assert_eq!(v["train"]["reviews"], 7);
    assert_eq!(v["pipeline"]["lossy_utf8"], serde_json::json!(["train/pos/77_9.txt"]));
}

#[test]
fn out_of_range_settings_are_refused_by_name() {
    let cache = tempfile::tempdir().unwrap();
    fails_with(
        coordinator_data(cache.path()).args(["--min-freq", "0", "--data", "/nonexistent"]),
        &["data.min_freq", "at least 1"],
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "[data]\nmin_freqq = 2\n").unwrap();
    fails_with(coordinator_data(cache.path()).arg("--config").arg(&cfg), &["bad.toml", "min_freqq"]);
    std::fs::write(&cfg, "[train]\nval_fraction = 1.5\n").unwrap();
    fails_with(coordinator_data(cache.path()).arg("--config").arg(&cfg), &["bad.toml"]);
    fails_with(coordinator_data(cache.path()).args(["--val-fraction", "1.0"]), &["data.val_fraction"]);
}
