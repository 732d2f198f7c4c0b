//! The workers' ring protocol (the TCP all-reduce of `worker::collective::ring`): every
//! byte layout, and the parsers of what a peer sends. Pure functions, no I/O: the worker's
//! ring does the reading and writing.
//!
//! - The **hello** (connecting side → accepting side): `TRNRING1`, protocol version (u32),
//!   float byte order (u8), world size (u32), rank (u32), token length (u32), token.
//! - The **reply** (accepting side → connecting side): `TRNRING1`, status (u8: 0 accepted,
//!   1 refused), rank (u32), world size (u32), message length (u32), message (UTF-8).
//! - The **op header** (each rank → the next, before each op's data): `RGOP`, op code (u8),
//!   3 reserved bytes, sequence number (u64), buffer length in elements (u64), root (u32),
//!   4 reserved bytes. The receiver only compares it with its own header, so its length field
//!   is never used to size anything.
//!
//! Integers are little-endian. The parsers never panic, and never allocate or ask for more
//! bytes than the format's bounds ([`MAX_TOKEN_LEN`], [`MAX_MESSAGE_LEN`]), whatever length
//! a peer claims: a length over the bound is refused as soon as its 4 bytes are in. They are
//! public for the fuzz target `ring_wire` (`fuzz/`) and the property tests.

/// Greeting of both handshake messages.
pub const MAGIC: [u8; 8] = *b"TRNRING1";
/// Version of this wire format; a peer with another one is refused.
pub const PROTOCOL_VERSION: u32 = 1;
/// Longest job token a hello may carry; a longer claimed length is refused unread.
pub const MAX_TOKEN_LEN: usize = 1024;
/// Longest refusal message a reply may carry.
pub const MAX_MESSAGE_LEN: usize = 1024;
/// Bytes of a hello before its token.
pub const HELLO_FIXED_LEN: usize = 25;
/// Bytes of a reply before its message.
pub const REPLY_FIXED_LEN: usize = 21;
/// Bytes of an op header.
pub const HEADER_LEN: usize = 32;

const STATUS_OK: u8 = 0;
const STATUS_REFUSED: u8 = 1;
const HEADER_MAGIC: [u8; 4] = *b"RGOP";

/// Floats travel in native byte order; both ends must agree (1 little, 2 big endian).
pub fn byte_order() -> u8 {
    if cfg!(target_endian = "little") {
        1
    } else {
        2
    }
}

/// How far the parse of a message that arrives in pieces got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress<T> {
    /// Read exactly this many more bytes, then parse again (never more than the message
    /// needs, so that nothing that follows it is consumed).
    Need(usize),
    /// The whole message, which used every byte given.
    Complete(T),
}

/// Who the connecting side says it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: u32,
    pub byte_order: u8,
    pub world_size: u32,
    pub rank: u32,
    pub token: Vec<u8>,
}

impl Hello {
    /// This build's hello for `rank` of `world_size` with the job token `token`.
    pub fn new(rank: usize, world_size: usize, token: &[u8]) -> Self {
        Hello {
            version: PROTOCOL_VERSION,
            byte_order: byte_order(),
            world_size: world_size as u32,
            rank: rank as u32,
            token: token.to_vec(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HELLO_FIXED_LEN + self.token.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.push(self.byte_order);
        out.extend_from_slice(&self.world_size.to_le_bytes());
        out.extend_from_slice(&self.rank.to_le_bytes());
        out.extend_from_slice(&(self.token.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.token);
        out
    }
}

/// What the accepting side answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Accepted { rank: u32, world_size: u32 },
    Refused(String),
}

impl Reply {
    /// The reply of `rank` of `world_size`: accepted, or refused with `why` (cut to
    /// [`MAX_MESSAGE_LEN`] bytes at a character boundary).
    pub fn encode(rank: usize, world_size: usize, refused: Option<&str>) -> Vec<u8> {
        let message = refused.map_or("", |why| cut(why, MAX_MESSAGE_LEN)).as_bytes();
        let mut out = Vec::with_capacity(REPLY_FIXED_LEN + message.len());
        out.extend_from_slice(&MAGIC);
        out.push(if refused.is_some() { STATUS_REFUSED } else { STATUS_OK });
        out.extend_from_slice(&(rank as u32).to_le_bytes());
        out.extend_from_slice(&(world_size as u32).to_le_bytes());
        out.extend_from_slice(&(message.len() as u32).to_le_bytes());
        out.extend_from_slice(message);
        out
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends at a character boundary.
fn cut(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(b)
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(b)
}

/// Refuses at the first byte that differs from `magic`, before the rest has arrived.
fn check_magic(bytes: &[u8], magic: &[u8]) -> bool {
    let n = bytes.len().min(magic.len());
    bytes[..n] == magic[..n]
}

/// Parses the bytes a connecting peer sent so far (all of them, from the first). `Err` is
/// the reason to refuse it: not a ring peer, or a token length over [`MAX_TOKEN_LEN`].
/// Bytes beyond the hello are refused too ([`Progress::Need`] never asks for them).
pub fn parse_hello(bytes: &[u8]) -> Result<Progress<Hello>, String> {
    if !check_magic(bytes, &MAGIC) {
        return Err("not a ring peer (unknown greeting)".into());
    }
    if bytes.len() < HELLO_FIXED_LEN {
        return Ok(Progress::Need(HELLO_FIXED_LEN - bytes.len()));
    }
    let token_len = u32_at(bytes, 21) as usize;
    if token_len > MAX_TOKEN_LEN {
        return Err(format!("job token of {token_len} bytes is longer than {MAX_TOKEN_LEN}"));
    }
    let total = HELLO_FIXED_LEN + token_len;
    if bytes.len() < total {
        return Ok(Progress::Need(total - bytes.len()));
    }
    if bytes.len() > total {
        return Err(format!("sent {} bytes after its hello", bytes.len() - total));
    }
    Ok(Progress::Complete(Hello {
        version: u32_at(bytes, 8),
        byte_order: bytes[12],
        world_size: u32_at(bytes, 13),
        rank: u32_at(bytes, 17),
        token: bytes[HELLO_FIXED_LEN..].to_vec(),
    }))
}

/// Parses the bytes the accepting peer answered so far. `Err` says why the answer is not
/// a ring reply (another greeting, a message over [`MAX_MESSAGE_LEN`], extra bytes).
pub fn parse_reply(bytes: &[u8]) -> Result<Progress<Reply>, String> {
    if !check_magic(bytes, &MAGIC) {
        return Err("it is not a ring peer (unknown greeting)".into());
    }
    if bytes.len() < REPLY_FIXED_LEN {
        return Ok(Progress::Need(REPLY_FIXED_LEN - bytes.len()));
    }
    let len = u32_at(bytes, 17) as usize;
    if len > MAX_MESSAGE_LEN {
        return Err(format!("its reply claims {len} bytes of message; at most {MAX_MESSAGE_LEN} allowed"));
    }
    let total = REPLY_FIXED_LEN + len;
    if bytes.len() < total {
        return Ok(Progress::Need(total - bytes.len()));
    }
    if bytes.len() > total {
        return Err(format!("it sent {} bytes after its reply", bytes.len() - total));
    }
    Ok(Progress::Complete(match bytes[8] {
        STATUS_OK => Reply::Accepted { rank: u32_at(bytes, 9), world_size: u32_at(bytes, 13) },
        STATUS_REFUSED => Reply::Refused(String::from_utf8_lossy(&bytes[REPLY_FIXED_LEN..]).into_owned()),
        other => return Err(format!("its reply has an unknown status {other}")),
    }))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    AllReduceMean = 1,
    Broadcast = 2,
    Barrier = 3,
}

impl OpKind {
    pub fn name(self) -> &'static str {
        match self {
            OpKind::AllReduceMean => "all_reduce_mean",
            OpKind::Broadcast => "broadcast",
            OpKind::Barrier => "barrier",
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(OpKind::AllReduceMean),
            2 => Some(OpKind::Broadcast),
            3 => Some(OpKind::Barrier),
            _ => None,
        }
    }
}

/// Sent by every rank to the next one before the data of each op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpHeader {
    pub kind: OpKind,
    /// Number of ops this rank started on this ring before this one.
    pub seq: u64,
    /// Elements of the buffer. Only compared with the receiver's own op, never used to size
    /// a read or an allocation.
    pub len: u64,
    pub root: u32,
}

impl OpHeader {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..4].copy_from_slice(&HEADER_MAGIC);
        out[4] = self.kind as u8;
        out[8..16].copy_from_slice(&self.seq.to_le_bytes());
        out[16..24].copy_from_slice(&self.len.to_le_bytes());
        out[24..28].copy_from_slice(&self.root.to_le_bytes());
        out
    }

    /// Parses one header of exactly [`HEADER_LEN`] bytes; `Err` says what the bytes are
    /// instead (the sender is then out of step, or no ring peer).
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() != HEADER_LEN {
            return Err(format!("sent an op header of {} bytes; it has {HEADER_LEN}", bytes.len()));
        }
        if bytes[0..4] != HEADER_MAGIC {
            return Err("sent bytes that are not an op header (the ring is out of step)".into());
        }
        let kind =
            OpKind::from_code(bytes[4]).ok_or_else(|| format!("sent an unknown op code {}", bytes[4]))?;
        Ok(OpHeader { kind, seq: u64_at(bytes, 8), len: u64_at(bytes, 16), root: u32_at(bytes, 24) })
    }

    pub fn describe(&self) -> String {
        let root = match self.kind {
            OpKind::Broadcast => format!(" from root {}", self.root),
            _ => String::new(),
        };
        format!("{} #{} of {} elements{root}", self.kind.name(), self.seq, self.len)
    }
}

/// Feeds `bytes` to `parse` the way a socket reader does (read exactly what it asks for,
/// parse again), for the fuzz targets and tests. `Ok(Some((message or refusal, bytes used)))`,
/// or `Ok(None)` when `bytes` ends first; `Err` when the parser broke its contract: it asked
/// for 0 bytes, or for more than `limit` bytes in all.
#[allow(clippy::type_complexity)]
pub fn parse_stream<T>(
    bytes: &[u8],
    limit: usize,
    parse: impl Fn(&[u8]) -> Result<Progress<T>, String>,
) -> Result<Option<(Result<T, String>, usize)>, String> {
    let mut have = 0usize;
    loop {
        match parse(&bytes[..have]) {
            Err(why) => return Ok(Some((Err(why), have))),
            Ok(Progress::Complete(message)) => return Ok(Some((Ok(message), have))),
            Ok(Progress::Need(0)) => return Err(format!("the parser asked for 0 bytes at {have}")),
            Ok(Progress::Need(n)) if have + n > limit => {
                return Err(format!("the parser asked for {} bytes in all; the bound is {limit}", have + n))
            }
            Ok(Progress::Need(n)) if have + n > bytes.len() => return Ok(None),
            Ok(Progress::Need(n)) => have += n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trips_and_arrives_in_pieces() {
        let hello = Hello::new(3, 8, b"token");
        let bytes = hello.encode();
        let (parsed, used) =
            parse_stream(&bytes, HELLO_FIXED_LEN + MAX_TOKEN_LEN, parse_hello).unwrap().unwrap();
        assert_eq!((parsed, used), (Ok(hello), bytes.len()));
        assert_eq!(parse_hello(&bytes[..3]), Ok(Progress::Need(HELLO_FIXED_LEN - 3)));
        assert_eq!(parse_hello(&bytes[..HELLO_FIXED_LEN]), Ok(Progress::Need(5)));
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(parse_hello(&longer).unwrap_err().contains("1 bytes after its hello"));
    }

    #[test]
    fn a_huge_token_length_is_refused_before_the_token_is_read() {
        let mut bytes = Hello::new(0, 2, b"t").encode();
        bytes[21..25].copy_from_slice(&u32::MAX.to_le_bytes());
        let why = parse_hello(&bytes[..HELLO_FIXED_LEN]).unwrap_err();
        assert!(why.contains("4294967295 bytes") && why.contains("1024"), "{why}");
        // Garbage is refused at its first wrong byte.
        assert!(parse_hello(b"GET / HTTP/1.1").unwrap_err().contains("not a ring peer"));
        assert!(parse_hello(b"X").unwrap_err().contains("not a ring peer"));
    }

    #[test]
    fn replies_round_trip_and_bound_their_message() {
        let ok = Reply::encode(1, 2, None);
        assert_eq!(parse_reply(&ok), Ok(Progress::Complete(Reply::Accepted { rank: 1, world_size: 2 })));
        let long = "é".repeat(MAX_MESSAGE_LEN);
        let refused = Reply::encode(1, 2, Some(&long));
        assert_eq!(refused.len(), REPLY_FIXED_LEN + MAX_MESSAGE_LEN);
        let Ok(Progress::Complete(Reply::Refused(why))) = parse_reply(&refused) else { panic!() };
        assert_eq!(why, "é".repeat(MAX_MESSAGE_LEN / 2));
        let mut huge = ok.clone();
        huge[17..21].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse_reply(&huge).unwrap_err().contains("4294967295 bytes of message"));
        let mut odd = ok;
        odd[8] = 7;
        assert!(parse_reply(&odd).unwrap_err().contains("unknown status 7"));
    }

    #[test]
    fn header_round_trips_and_rejects_garbage() {
        let h = OpHeader { kind: OpKind::Broadcast, seq: 7, len: u64::MAX, root: 2 };
        assert_eq!(OpHeader::parse(&h.encode()), Ok(h));
        let mut bad = h.encode();
        bad[0] = b'X';
        assert!(OpHeader::parse(&bad).unwrap_err().contains("not an op header"));
        let mut bad = h.encode();
        bad[4] = 99;
        assert!(OpHeader::parse(&bad).unwrap_err().contains("unknown op code 99"));
        assert!(OpHeader::parse(&bad[..5]).unwrap_err().contains("5 bytes"));
    }
}

/// Property tests: the bounded counterpart in `cargo test` of the fuzz target `ring_wire`.
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

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
        parse: impl Fn(&[u8]) -> Result<Progress<T>, String>,
        encode: impl Fn(&T) -> Vec<u8>,
    ) -> Result<(), TestCaseError> {
        let parsed = parse_stream(bytes, limit, parse).map_err(TestCaseError::fail)?;
        if let Some((Ok(message), used)) = parsed {
            prop_assert_eq!(encode(&message), bytes[..used].to_vec());
        }
        Ok(())
    }

    fn check_hello(bytes: &[u8]) -> Result<(), TestCaseError> {
        check_stream(bytes, HELLO_FIXED_LEN + MAX_TOKEN_LEN, parse_hello, Hello::encode)
    }

    fn check_reply(bytes: &[u8]) -> Result<(), TestCaseError> {
        let limit = REPLY_FIXED_LEN + MAX_MESSAGE_LEN;
        let parsed = parse_stream(bytes, limit, parse_reply).map_err(TestCaseError::fail)?;
        if let Some((Ok(reply), used)) = parsed {
            let declared = u32::from_le_bytes([bytes[17], bytes[18], bytes[19], bytes[20]]) as usize;
            prop_assert_eq!(used, REPLY_FIXED_LEN + declared);
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
                prop_assert_eq!(bytes.len(), HEADER_LEN);
            }
        }
    }
}
