//! Forming the ring: each rank connects to the next rank's listener and accepts one
//! connection from the previous rank. The connecting side says who it is (job token, rank,
//! world size); the accepting side checks it and answers with its own rank, or with the
//! reason it refuses. A refused connection (a stray client, a peer of another job) does not
//! end the wait for the real peer, which may still come before the deadline.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::collective::CollectiveError;

const MAGIC: [u8; 8] = *b"TRNRING1";
const PROTOCOL_VERSION: u32 = 1;
/// Longest job token a hello may carry; longer ones are refused without reading them.
pub(crate) const MAX_TOKEN_LEN: usize = 1024;
/// Longest refusal message a reply may carry.
const MAX_MESSAGE_LEN: usize = 1024;
const STATUS_OK: u8 = 0;
const STATUS_REFUSED: u8 = 1;
/// How often the waits below look at the other side's failure flag.
const POLL_SLICE: Duration = Duration::from_millis(100);

/// Floats travel in native byte order; both ends must agree.
fn byte_order() -> u8 {
    if cfg!(target_endian = "little") {
        1
    } else {
        2
    }
}

/// Who the connecting side says it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Hello {
    pub version: u32,
    pub byte_order: u8,
    pub world_size: u32,
    pub rank: u32,
    pub token: Vec<u8>,
}

impl Hello {
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
        let mut out = Vec::with_capacity(25 + self.token.len());
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

/// Why a hello could not be read: the stream failed, or what it sent is refused.
enum HelloError {
    Io(io::Error),
    Refused(String),
}

impl From<io::Error> for HelloError {
    fn from(e: io::Error) -> Self {
        HelloError::Io(e)
    }
}

fn read_u32(stream: &mut TcpStream) -> io::Result<u32> {
    let mut b = [0u8; 4];
    stream.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_hello(stream: &mut TcpStream) -> Result<Hello, HelloError> {
    let mut magic = [0u8; 8];
    stream.read_exact(&mut magic)?;
    if magic != MAGIC {
        return Err(HelloError::Refused("not a ring peer (unknown greeting)".into()));
    }
    let version = read_u32(stream)?;
    let mut order = [0u8; 1];
    stream.read_exact(&mut order)?;
    let world_size = read_u32(stream)?;
    let rank = read_u32(stream)?;
    let token_len = read_u32(stream)? as usize;
    if token_len > MAX_TOKEN_LEN {
        return Err(HelloError::Refused(format!(
            "job token of {token_len} bytes is longer than {MAX_TOKEN_LEN}"
        )));
    }
    let mut token = vec![0u8; token_len];
    stream.read_exact(&mut token)?;
    Ok(Hello { version, byte_order: order[0], world_size, rank, token })
}

/// Equality whose running time does not depend on where the first difference is, so that
/// a client cannot find the token byte by byte from response times.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // Keep the optimiser from turning the fold into an early-exit comparison.
    std::hint::black_box(diff) == 0
}

/// The reason to refuse `hello`, or `None` if it comes from the expected previous rank of
/// this job. The token is checked before anything a stranger could learn from the answer.
fn refusal(hello: &Hello, token: &[u8], world_size: usize, expected_rank: usize) -> Option<String> {
    if hello.version != PROTOCOL_VERSION {
        return Some(format!(
            "ring protocol version {} is not this rank's version {PROTOCOL_VERSION}",
            hello.version
        ));
    }
    if !constant_time_eq(&hello.token, token) {
        return Some("job token does not match (a peer of another job?)".into());
    }
    if hello.byte_order != byte_order() {
        return Some("float byte order differs between the two hosts".into());
    }
    if hello.world_size as usize != world_size {
        return Some(format!(
            "world size {} does not match this ring's world size {world_size}",
            hello.world_size
        ));
    }
    if hello.rank as usize != expected_rank {
        return Some(format!(
            "rank {} connected, but this rank expects its previous rank {expected_rank}",
            hello.rank
        ));
    }
    None
}

fn write_reply(stream: &mut TcpStream, rank: usize, world_size: usize, refused: Option<&str>) {
    let message = refused.unwrap_or("").as_bytes();
    let message = &message[..message.len().min(MAX_MESSAGE_LEN)];
    let mut out = Vec::with_capacity(21 + message.len());
    out.extend_from_slice(&MAGIC);
    out.push(if refused.is_some() { STATUS_REFUSED } else { STATUS_OK });
    out.extend_from_slice(&(rank as u32).to_le_bytes());
    out.extend_from_slice(&(world_size as u32).to_le_bytes());
    out.extend_from_slice(&(message.len() as u32).to_le_bytes());
    out.extend_from_slice(message);
    // A reply that cannot be written only matters to the other side, which then fails.
    let _ = stream.write_all(&out);
}

/// What the accepting side answered.
#[derive(Debug)]
pub(crate) enum Reply {
    Accepted { rank: u32, world_size: u32 },
    Refused(String),
}

fn read_reply(stream: &mut TcpStream) -> io::Result<Result<Reply, String>> {
    let mut magic = [0u8; 8];
    stream.read_exact(&mut magic)?;
    if magic != MAGIC {
        return Ok(Err("it is not a ring peer (unknown greeting)".into()));
    }
    let mut status = [0u8; 1];
    stream.read_exact(&mut status)?;
    let rank = read_u32(stream)?;
    let world_size = read_u32(stream)?;
    let len = read_u32(stream)? as usize;
    if len > MAX_MESSAGE_LEN {
        return Ok(Err(format!("its reply carries {len} bytes of message")));
    }
    let mut message = vec![0u8; len];
    stream.read_exact(&mut message)?;
    Ok(Ok(match status[0] {
        STATUS_OK => Reply::Accepted { rank, world_size },
        _ => Reply::Refused(String::from_utf8_lossy(&message).into_owned()),
    }))
}

/// Waits until `fd` is readable or `limit` passes.
fn wait_readable(fd: i32, limit: Duration) {
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    let millis = limit.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd for the duration of the call. Errors (EINTR) just end the
    // wait early; the caller loops and checks its deadline.
    unsafe {
        libc::poll(&mut pfd, 1, millis);
    }
}

/// What the accepting and connecting halves need to know about this rank.
pub(crate) struct Me<'a> {
    pub rank: usize,
    pub world_size: usize,
    pub token: &'a [u8],
    /// Longest wait for one peer's hello or reply on an established connection.
    pub io_timeout: Duration,
    /// The whole rendezvous' limit, for error messages.
    pub connect_timeout: Duration,
}

/// Accepts the previous rank's connection before `deadline`, refusing any other. Stops
/// early (with a timeout error) when `abort` is set by the connecting half.
pub(crate) fn accept_prev(
    listener: &TcpListener,
    me: &Me<'_>,
    prev_rank: usize,
    prev_addr: SocketAddr,
    deadline: Instant,
    abort: &AtomicBool,
) -> Result<(TcpStream, SocketAddr), CollectiveError> {
    let op = "connect";
    let io_error = |e: io::Error| CollectiveError::Peer {
        rank: me.rank,
        op,
        peer: format!("rank {prev_rank} (listening for it)"),
        cause: e,
    };
    listener.set_nonblocking(true).map_err(io_error)?;
    let mut refused: Vec<String> = Vec::new();
    loop {
        let now = Instant::now();
        if now >= deadline || abort.load(Ordering::Relaxed) {
            let refused_note = match refused.last() {
                Some(last) => format!("; refused {} other connection(s), the last one {last}", refused.len()),
                None => String::new(),
            };
            return Err(CollectiveError::Timeout {
                rank: me.rank,
                op,
                peer: format!("rank {prev_rank} ({prev_addr}) to connect{refused_note}"),
                timeout_ms: me.connect_timeout.as_millis() as u64,
            });
        }
        match listener.accept() {
            Ok((mut stream, from)) => {
                let io_limit = me.io_timeout.min(deadline.saturating_duration_since(now));
                let ready = stream
                    .set_nonblocking(false)
                    .and_then(|()| stream.set_read_timeout(Some(io_limit.max(POLL_SLICE))))
                    .and_then(|()| stream.set_write_timeout(Some(io_limit.max(POLL_SLICE))));
                if let Err(e) = ready {
                    refused.push(format!("from {from}: {e}"));
                    continue;
                }
                let why = match read_hello(&mut stream) {
                    Ok(hello) => match refusal(&hello, me.token, me.world_size, prev_rank) {
                        None => {
                            write_reply(&mut stream, me.rank, me.world_size, None);
                            return Ok((stream, from));
                        }
                        Some(why) => why,
                    },
                    Err(HelloError::Refused(why)) => why,
                    Err(HelloError::Io(e)) => format!("no valid greeting ({e})"),
                };
                tracing::warn!(rank = me.rank, %from, reason = %why, "refused a ring connection");
                write_reply(&mut stream, me.rank, me.world_size, Some(&why));
                refused.push(format!("from {from}: {why}"));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let rest = deadline.saturating_duration_since(now);
                wait_readable(listener.as_raw_fd(), rest.min(POLL_SLICE));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // Out of file descriptors and the like: waiting will not fix it.
            Err(e) => return Err(io_error(e)),
        }
    }
}

/// Connects to the next rank before `deadline` (retrying while it is not listening yet)
/// and checks that it accepts us and is the rank we expect.
pub(crate) fn connect_next(
    me: &Me<'_>,
    next_rank: usize,
    next_addr: SocketAddr,
    deadline: Instant,
    abort: &AtomicBool,
) -> Result<TcpStream, CollectiveError> {
    let op = "connect";
    let peer = format!("rank {next_rank} ({next_addr})");
    let mut last_error: Option<io::Error> = None;
    let mut stream = loop {
        let now = Instant::now();
        if now >= deadline || abort.load(Ordering::Relaxed) {
            let why = last_error.map(|e| format!(" (last error: {e})")).unwrap_or_default();
            return Err(CollectiveError::Timeout {
                rank: me.rank,
                op,
                peer: format!("{peer} to accept{why}"),
                timeout_ms: me.connect_timeout.as_millis() as u64,
            });
        }
        let rest = deadline - now;
        match TcpStream::connect_timeout(&next_addr, rest.min(Duration::from_secs(5))) {
            Ok(stream) => break stream,
            Err(e) => {
                // Not listening yet, or a transient network error: retry until the deadline.
                last_error = Some(e);
                std::thread::sleep(rest.min(Duration::from_millis(50)));
            }
        }
    };
    let peer_error = |e: io::Error| CollectiveError::Peer { rank: me.rank, op, peer: peer.clone(), cause: e };
    // The reply comes only once the next rank is in its accept loop, which may take as long
    // as its start-up: wait up to the deadline, not just the per-transfer timeout.
    let rest = deadline.saturating_duration_since(Instant::now()).max(POLL_SLICE);
    stream
        .set_write_timeout(Some(me.io_timeout.max(POLL_SLICE)))
        .and_then(|()| stream.set_read_timeout(Some(rest)))
        .and_then(|()| stream.set_nodelay(true))
        .map_err(peer_error)?;
    let hello = Hello::new(me.rank, me.world_size, me.token).encode();
    stream.write_all(&hello).map_err(peer_error)?;
    let reply = read_reply(&mut stream).map_err(|e| {
        if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) {
            CollectiveError::Timeout {
                rank: me.rank,
                op,
                peer: format!("{peer} to answer the handshake"),
                timeout_ms: me.connect_timeout.as_millis() as u64,
            }
        } else {
            peer_error(e)
        }
    })?;
    let handshake_error =
        |message: String| CollectiveError::Handshake { rank: me.rank, peer: peer.clone(), message };
    match reply.map_err(handshake_error)? {
        Reply::Refused(why) => Err(handshake_error(format!("it refused us: {why}"))),
        Reply::Accepted { rank, world_size } => {
            if rank as usize != next_rank || world_size as usize != me.world_size {
                return Err(handshake_error(format!(
                    "it answered as rank {rank} of {world_size}, expected rank {next_rank} of {}",
                    me.world_size
                )));
            }
            Ok(stream)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_compares_contents_and_lengths() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn refusal_names_what_does_not_match() {
        let good = Hello::new(2, 4, b"secret-token");
        assert_eq!(refusal(&good, b"secret-token", 4, 2), None);
        let why = refusal(&good, b"other-token!", 4, 2).unwrap();
        assert!(why.contains("job token does not match"), "{why}");
        let why = refusal(&good, b"secret-token", 5, 2).unwrap();
        assert!(why.contains("world size 4") && why.contains("5"), "{why}");
        let why = refusal(&good, b"secret-token", 4, 1).unwrap();
        assert!(why.contains("rank 2 connected") && why.contains("1"), "{why}");
        let mut old = good.clone();
        old.version = 0;
        let why = refusal(&old, b"secret-token", 4, 2).unwrap();
        assert!(why.contains("version 0"), "{why}");
    }
}
