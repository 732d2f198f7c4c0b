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

use super::wire::{self, Hello, Progress, Reply, PROTOCOL_VERSION};
use crate::collective::CollectiveError;

pub(crate) use super::wire::MAX_TOKEN_LEN;

/// How often the waits below look at the other side's failure flag.
const POLL_SLICE: Duration = Duration::from_millis(100);
/// Connections whose hello is not complete yet, at most. A real peer's hello arrives with
/// its connection, so only strangers linger; past this the oldest one is dropped.
const MAX_PENDING: usize = 32;

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
        // The token is new for every attempt of a job: a peer left over from before a
        // restart has the old one.
        return Some(
            "job token does not match (a peer of another job, or of an earlier attempt of this one?)".into(),
        );
    }
    if hello.byte_order != wire::byte_order() {
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

/// Reads the next rank's reply before `deadline`, however slowly it trickles in, reading
/// only as many bytes as the reply format says (bounded by [`wire::MAX_MESSAGE_LEN`]).
/// `Ok(Err(why))`: what came back is not a ring reply.
fn read_reply(stream: &mut TcpStream, deadline: Instant) -> io::Result<Result<Reply, String>> {
    let mut buf = Vec::with_capacity(wire::REPLY_FIXED_LEN);
    loop {
        let need = match wire::parse_reply(&buf) {
            Err(why) => return Ok(Err(why)),
            Ok(Progress::Complete(reply)) => return Ok(Ok(reply)),
            Ok(Progress::Need(n)) => n,
        };
        let rest = deadline.saturating_duration_since(Instant::now());
        if rest.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "no complete reply before the deadline"));
        }
        stream.set_read_timeout(Some(rest.max(Duration::from_millis(1))))?;
        let have = buf.len();
        buf.resize(have + need, 0);
        match stream.read(&mut buf[have..]) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed before its reply was complete",
                ))
            }
            Ok(n) => buf.truncate(have + n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => buf.truncate(have),
            Err(e) => return Err(e),
        }
    }
}

/// Waits until one of `fds` is readable (or hung up) or `limit` passes.
fn wait_readable(fds: &[i32], limit: Duration) {
    let mut pfds: Vec<libc::pollfd> =
        fds.iter().map(|&fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 }).collect();
    let millis = limit.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: `pfds` is a valid array of `pfds.len()` pollfd structs for the whole call.
    // Errors (EINTR) just end the wait early; the caller loops and checks its deadline.
    unsafe {
        libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, millis);
    }
}

/// An accepted connection whose hello is still arriving.
struct Pending {
    stream: TcpStream,
    from: SocketAddr,
    /// What it sent so far: never more than the hello it announces.
    bytes: Vec<u8>,
    /// When it is dropped if its hello is still not complete.
    until: Instant,
}

/// What to do with a pending connection after a read.
enum Outcome {
    Waiting,
    Refused(String),
    Hello(Hello),
}

impl Pending {
    /// Reads what the hello still needs (non-blocking) and parses it.
    fn advance(&mut self) -> Outcome {
        loop {
            let need = match wire::parse_hello(&self.bytes) {
                Err(why) => return Outcome::Refused(why),
                Ok(Progress::Complete(hello)) => return Outcome::Hello(hello),
                Ok(Progress::Need(n)) => n,
            };
            let have = self.bytes.len();
            self.bytes.resize(have + need, 0);
            let read = self.stream.read(&mut self.bytes[have..]);
            self.bytes.truncate(have + *read.as_ref().unwrap_or(&0));
            match read {
                Ok(0) => {
                    return Outcome::Refused(format!(
                        "closed the connection after {have} bytes, before its hello was complete"
                    ))
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Outcome::Waiting,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Outcome::Refused(format!("no valid greeting ({e})")),
            }
        }
    }
}

/// Tells a refused client why, logs it and notes it for the timeout error. The reply is
/// written once without waiting: a client that does not read cannot hold this rank up.
fn refuse(me: &Me<'_>, mut pending: Pending, why: String, refused: &mut Vec<String>) {
    tracing::warn!(rank = me.rank, from = %pending.from, reason = %why, "refused a ring connection");
    let _ = pending.stream.write(&Reply::encode(me.rank, me.world_size, Some(&why)));
    refused.push(format!("from {}: {why}", pending.from));
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
///
/// Connections are read side by side, each until its hello is complete, refused, or
/// `me.io_timeout` passes: a stranger that connects and stays silent, or trickles its bytes,
/// holds one of [`MAX_PENDING`] slots and never delays the real peer's hello.
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
    let mut pending: Vec<Pending> = Vec::new();
    loop {
        let now = Instant::now();
        if now >= deadline || abort.load(Ordering::Relaxed) {
            for p in pending.drain(..) {
                let why = format!("sent no complete hello in {} bytes", p.bytes.len());
                refuse(me, p, why, &mut refused);
            }
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
        // New connections, a batch at a time: each batch's hellos are read before the next,
        // so a crowd of clients is refused for what it sent, not for being many.
        for _ in 0..MAX_PENDING {
            match listener.accept() {
                Ok((stream, from)) => {
                    if let Err(e) = stream.set_nonblocking(true) {
                        refused.push(format!("from {from}: {e}"));
                        continue;
                    }
                    if pending.len() >= MAX_PENDING {
                        let oldest = pending.remove(0);
                        let why = format!(
                            "{MAX_PENDING} connections were waiting for their hello; dropped the oldest"
                        );
                        refuse(me, oldest, why, &mut refused);
                    }
                    let until = (now + me.io_timeout).min(deadline);
                    pending.push(Pending { stream, from, bytes: Vec::new(), until });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // A client that gave up while queued: nothing to answer.
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
                // Out of file descriptors and the like: waiting will not fix it.
                Err(e) => return Err(io_error(e)),
            }
        }
        // Hellos that arrived, and clients whose time is up.
        let mut i = 0;
        while i < pending.len() {
            let outcome = match pending[i].advance() {
                Outcome::Waiting if now >= pending[i].until => Outcome::Refused(format!(
                    "sent no complete hello within {} ms ({} bytes)",
                    me.io_timeout.as_millis(),
                    pending[i].bytes.len()
                )),
                other => other,
            };
            match outcome {
                Outcome::Waiting => i += 1,
                Outcome::Refused(why) => refuse(me, pending.remove(i), why, &mut refused),
                Outcome::Hello(hello) => match refusal(&hello, me.token, me.world_size, prev_rank) {
                    Some(why) => refuse(me, pending.remove(i), why, &mut refused),
                    None => {
                        let peer = pending.remove(i);
                        for other in pending.drain(..) {
                            let why = format!("rank {prev_rank} connected first; this rank needs no other");
                            refuse(me, other, why, &mut refused);
                        }
                        return welcome(me, peer).map_err(io_error);
                    }
                },
            }
        }
        let next_expiry = pending.iter().map(|p| p.until).min().unwrap_or(deadline).min(deadline);
        let wait = next_expiry.saturating_duration_since(Instant::now()).min(POLL_SLICE);
        let fds: Vec<i32> = std::iter::once(listener.as_raw_fd())
            .chain(pending.iter().map(|p| p.stream.as_raw_fd()))
            .collect();
        wait_readable(&fds, wait);
    }
}

/// Accepts the previous rank: a blocking stream with the transfer timeouts, and the reply.
fn welcome(me: &Me<'_>, peer: Pending) -> io::Result<(TcpStream, SocketAddr)> {
    let Pending { mut stream, from, .. } = peer;
    let limit = me.io_timeout.max(POLL_SLICE);
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(limit))?;
    stream.set_write_timeout(Some(limit))?;
    stream.write_all(&Reply::encode(me.rank, me.world_size, None))?;
    Ok((stream, from))
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
    stream
        .set_write_timeout(Some(me.io_timeout.max(POLL_SLICE)))
        .and_then(|()| stream.set_nodelay(true))
        .map_err(peer_error)?;
    let hello = Hello::new(me.rank, me.world_size, me.token).encode();
    stream.write_all(&hello).map_err(peer_error)?;
    let reply = read_reply(&mut stream, deadline.max(Instant::now() + POLL_SLICE)).map_err(|e| {
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
