//! The corpus folder reader (`read_corpus` of a `DataSource::Folder`). The input is a tar
//! archive (the seeds of `corpus_tar` serve here too) whose regular files are written into a
//! fresh folder, names and contents as they are; then the folder is read as a corpus.
#![no_main]

use std::io::Read;
use std::path::Component;

use libfuzzer_sys::fuzz_target;
use trainer_core::corpus::{read_corpus, DataSource};

/// Files at most, and bytes per file, taken from one input.
const MAX_FILES: usize = 64;
const MAX_FILE_BYTES: u64 = 1 << 16;

fuzz_target!(|data: &[u8]| {
    let Ok(dir) = tempfile::tempdir() else { return };
    let mut archive = tar::Archive::new(data);
    let Ok(entries) = archive.entries() else { return };
    for entry in entries.take(MAX_FILES) {
        let Ok(mut entry) = entry else { break };
        let Ok(path) = entry.path().map(|p| p.into_owned()) else { continue };
        // Only plain relative paths: nothing may land outside the folder.
        if !path.components().all(|c| matches!(c, Component::Normal(_))) {
            continue;
        }
        let mut bytes = Vec::new();
        if (&mut entry).take(MAX_FILE_BYTES).read_to_end(&mut bytes).is_err() {
            break;
        }
        let file = dir.path().join(&path);
        if let Some(parent) = file.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let _ = std::fs::write(&file, &bytes);
    }
    let root = dir.path().join("aclImdb");
    match read_corpus(&DataSource::Folder(root)) {
        Ok(corpus) => {
            for review in corpus.train.iter().chain(&corpus.test) {
                assert!(!review.text.trim().is_empty());
            }
        }
        Err(e) => assert!(e.to_string().contains(&dir.path().display().to_string()), "{e}"),
    }
});
