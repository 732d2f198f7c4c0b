//! The corpus tarball reader (`trainer_core::corpus::read_tarball_bytes`): gzip or plain tar,
//! any bytes. A corpus that comes back keeps the layout's promises.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use trainer_core::corpus::read_tarball_bytes;

fuzz_target!(|data: &[u8]| {
    if let Ok(corpus) = read_tarball_bytes(data, Path::new("fuzz.tar.gz")) {
        for review in corpus.train.iter().chain(&corpus.test) {
            assert!(review.label <= 1 && (1..=10).contains(&review.rating));
            assert!(!review.text.trim().is_empty());
        }
    }
});
