//! Property tests of the worker's parsers of outside input: the ring's wire format (hello,
//! reply, op header) and the checkpoint loader. They are the bounded, stable-Rust
//! counterparts of the fuzz targets in `fuzz/` (`ring_wire`, `checkpoint`), which CI cannot
//! run: a few hundred cases each of arbitrary bytes and of real messages and files damaged
//! at random. The property: any bytes give a value or an error, never a panic, and the ring
//! parsers never ask for more bytes than their format's bounds.

use std::path::Path;
use std::sync::OnceLock;

use proptest::prelude::*;

use crate::checkpoint::{checkpoint_from_bytes, save_checkpoint, LoopState, Position};
use crate::collective::ring::wire::{self, Hello, OpHeader, Reply};

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

/// Runs a stream parser over `bytes` and checks its contract; a complete message must be
/// the bytes it used, re-encoded.
fn check_stream<T>(
    bytes: &[u8],
    limit: usize,
    parse: impl Fn(&[u8]) -> Result<wire::Progress<T>, String>,
    encode: impl Fn(&T) -> Vec<u8>,
) -> Result<(), TestCaseError> {
    let parsed = wire::parse_stream(bytes, limit, parse).map_err(TestCaseError::fail)?;
    if let Some((Ok(message), used)) = parsed {
        prop_assert_eq!(encode(&message), bytes[..used].to_vec());
    }
    Ok(())
}

fn check_hello(bytes: &[u8]) -> Result<(), TestCaseError> {
    check_stream(bytes, wire::HELLO_FIXED_LEN + wire::MAX_TOKEN_LEN, wire::parse_hello, Hello::encode)
}

fn check_reply(bytes: &[u8]) -> Result<(), TestCaseError> {
    let limit = wire::REPLY_FIXED_LEN + wire::MAX_MESSAGE_LEN;
    let parsed = wire::parse_stream(bytes, limit, wire::parse_reply).map_err(TestCaseError::fail)?;
    if let Some((Ok(reply), used)) = parsed {
        let declared = u32::from_le_bytes([bytes[17], bytes[18], bytes[19], bytes[20]]) as usize;
        prop_assert_eq!(used, wire::REPLY_FIXED_LEN + declared);
        match reply {
            Reply::Accepted { rank, world_size } if declared == 0 => {
                prop_assert_eq!(
                    Reply::encode(rank as usize, world_size as usize, None),
                    bytes[..used].to_vec()
                );
            }
            Reply::Accepted { .. } => {}
            // Decoded lossily: each bad byte becomes one 3-byte U+FFFD at most.
            Reply::Refused(why) => prop_assert!(why.len() <= 3 * declared),
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(cases(1024))]

    #[test]
    fn any_bytes_are_a_hello_or_a_refusal(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        check_hello(&bytes)?;
    }

    #[test]
    fn damaged_hellos_are_refused_cleanly(
        bytes in (any::<u32>(), 0usize..40).prop_flat_map(|(rank, token)| damaged(Hello::new(rank as usize, 8, &vec![7; token]).encode()))
    ) {
        check_hello(&bytes)?;
    }

    #[test]
    fn any_bytes_are_a_reply_or_a_refusal(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        check_reply(&bytes)?;
    }

    #[test]
    fn damaged_replies_are_refused_cleanly(
        bytes in prop::sample::select(vec![None, Some("no"), Some("é")]).prop_flat_map(|why| damaged(Reply::encode(1, 2, why)))
    ) {
        check_reply(&bytes)?;
    }

    #[test]
    fn any_op_header_parses_or_is_refused(bytes in prop::collection::vec(any::<u8>(), 0..40)) {
        if let Ok(header) = OpHeader::parse(&bytes) {
            prop_assert_eq!(OpHeader::parse(&header.encode()), Ok(header));
            prop_assert_eq!(bytes.len(), wire::HEADER_LEN);
        }
    }
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

fn check_checkpoint(bytes: &[u8]) -> Result<(), TestCaseError> {
    match checkpoint_from_bytes(bytes, Path::new("fuzz.safetensors")) {
        Ok(checkpoint) => prop_assert_eq!(&checkpoint.meta.format, crate::checkpoint::CHECKPOINT_FORMAT),
        Err(e) => prop_assert!(e.to_string().contains("fuzz.safetensors"), "the error names no file: {}", e),
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
