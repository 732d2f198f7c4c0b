//! Property tests of the checkpoint loader, the bounded counterpart in `cargo test` of the
//! fuzz target `checkpoint` (`fuzz/`): a few hundred cases of arbitrary bytes and of a real
//! checkpoint damaged at random. The property: any bytes give a checkpoint or an error that
//! names the file, never a panic. (The ring's wire format: `trainer_proto::ring_wire`.)

use std::path::Path;
use std::sync::OnceLock;

use proptest::prelude::*;

use crate::checkpoint::{checkpoint_from_bytes, save_checkpoint, LoopState, Position};

fn cases(n: u32) -> ProptestConfig {
    ProptestConfig { cases: n, failure_persistence: None, ..ProptestConfig::default() }
}

/// `bytes` with one of: a byte changed, cut short, or bytes appended.
fn damaged(base: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let len = base.len();
    (0..3u8, any::<prop::sample::Index>(), 1..=255u8, prop::collection::vec(any::<u8>(), 0..8)).prop_map(
        move |(how, at, xor, extra)| {
            let mut bytes = base.clone();
            match how {
                0 if len > 0 => bytes[at.index(len)] ^= xor,
                1 => bytes.truncate(at.index(len + 1)),
                _ => bytes.extend_from_slice(&extra),
            }
            bytes
        },
    )
}

/// A real checkpoint of a tiny model (with Adam's moments), written once.
fn checkpoint_bytes() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| {
        tch::set_num_threads(1);
        let mut config = trainer_core::JobConfig::default();
        (config.model.embed_dim, config.model.hidden, config.model.layers) = (2, 2, 1);
        config.train.device = "cpu".into();
        let trainer =
            crate::Trainer::new(&config, 5, tch::Device::Cpu, Box::new(crate::collective::NoopCollective))
                .expect("a tiny trainer");
        let dir = tempfile::tempdir().expect("a temporary folder");
        let path = dir.path().join("checkpoint.safetensors");
        save_checkpoint(&trainer, &path, Position::default(), &LoopState::default(), "v:1").expect("saved");
        std::fs::read(&path).expect("read back")
    })
}

/// An error with its causes, as the binaries print it.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    std::iter::successors(Some(e), |e| e.source()).map(ToString::to_string).collect::<Vec<_>>().join(": ")
}

fn check_checkpoint(bytes: &[u8]) -> Result<(), TestCaseError> {
    match checkpoint_from_bytes(bytes, Path::new("fuzz.safetensors")) {
        Ok(checkpoint) => prop_assert_eq!(&checkpoint.meta.format, crate::checkpoint::CHECKPOINT_FORMAT),
        Err(e) => {
            let chain = error_chain(&e);
            prop_assert!(chain.contains("fuzz.safetensors"), "the error names no file: {}", chain);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn any_bytes_are_a_checkpoint_or_an_error(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        check_checkpoint(&bytes)?;
    }

    /// A real checkpoint with a byte changed (in the length prefix, the JSON header, the
    /// metadata or the tensor data), cut short, or with bytes appended.
    #[test]
    fn damaged_checkpoints_are_refused_cleanly(bytes in damaged(checkpoint_bytes().to_vec())) {
        check_checkpoint(&bytes)?;
    }

    /// The same, aimed at the header: its length prefix and JSON are where the parser could
    /// be misled into reading or allocating past the file.
    #[test]
    fn damaged_checkpoint_headers_are_refused_cleanly(at in 0usize..512, xor in 1..=255u8) {
        let mut bytes = checkpoint_bytes().to_vec();
        let at = at.min(bytes.len() - 1);
        bytes[at] ^= xor;
        check_checkpoint(&bytes)?;
    }
}

#[test]
fn the_intact_checkpoint_parses() {
    let checkpoint =
        checkpoint_from_bytes(checkpoint_bytes(), Path::new("ok.safetensors")).expect("a checkpoint");
    assert_eq!(checkpoint.meta.vocab_fingerprint, "v:1");
}

/// The fuzz target's hand-made seed (`fuzz/make_seeds.py`) is a checkpoint this worker reads:
/// a seed that stopped parsing would leave the fuzzer stuck at the first error.
#[test]
fn the_fuzz_seed_is_a_checkpoint() {
    let seed = include_bytes!("../../fuzz/seeds/checkpoint/tiny.safetensors");
    let checkpoint = checkpoint_from_bytes(seed, Path::new("tiny.safetensors")).expect("the seed parses");
    assert_eq!((checkpoint.meta.position.global_step, checkpoint.meta.world_size), (7, 2));
}
