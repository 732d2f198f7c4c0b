//! The checkpoint loader (`worker::checkpoint::checkpoint_from_bytes`): what a worker gets
//! from `FetchCheckpoint`, or reads from a run folder. Any bytes give a checkpoint or an
//! error that names the source. Needs `--features checkpoint` (it links libtorch).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use worker::checkpoint::{checkpoint_from_bytes, CHECKPOINT_FORMAT};

fuzz_target!(|data: &[u8]| {
    match checkpoint_from_bytes(data, Path::new("fuzz.safetensors")) {
        Ok(checkpoint) => assert_eq!(checkpoint.meta.format, CHECKPOINT_FORMAT),
        Err(e) => {
            // The file is named in the error or one of its causes, as the binaries print it.
            let chain: Vec<String> =
                std::iter::successors(Some(&e as &dyn std::error::Error), |e| e.source())
                    .map(|e| e.to_string())
                    .collect();
            assert!(chain.iter().any(|m| m.contains("fuzz.safetensors")), "{chain:?}");
        }
    }
});
