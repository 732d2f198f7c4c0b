//! The transfer loop: one thread drives both ring sockets (non-blocking, `poll`), sending
//! to the next rank and receiving (and reducing) from the previous rank in chunks, so that
//! a chunk is forwarded as soon as it is reduced while the rest of the segment is still on
//! the wire. Every op starts with a small header so that ranks that disagree on the op,
//! its sequence number or the buffer length fail with a clear error instead of mixing data.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use super::schedule::{Combine, Step};
pub(crate) use super::wire::{OpHeader, OpKind, HEADER_LEN};
use crate::collective::CollectiveError;

/// One end of a ring connection and who is on the other side.
#[derive(Debug)]
pub(crate) struct Link {
    pub stream: TcpStream,
    pub rank: usize,
    pub addr: SocketAddr,
}

impl Link {
    fn describe(&self) -> String {
        format!("rank {} ({})", self.rank, self.addr)
    }
}

/// The two connections of a rank: data goes out to `next` and comes in from `prev`.
#[derive(Debug)]
pub(crate) struct Links {
    pub next: Link,
    pub prev: Link,
}

impl Links {
    /// Closes both connections so that the neighbours see the failure at once instead of
    /// waiting for their own timeouts.
    pub fn shutdown(&self) {
        let _ = self.next.stream.shutdown(std::net::Shutdown::Both);
        let _ = self.prev.stream.shutdown(std::net::Shutdown::Both);
    }
}

/// Views `f32`s as their bytes (native byte order; the handshake checks that both ends use
/// the same). Sound: `u8` has alignment 1 and the view covers exactly the same memory.
pub(crate) fn f32_bytes(values: &[f32]) -> &[u8] {
    // SAFETY: see above; the returned slice borrows `values`, so it cannot outlive it.
    unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), size_of_val(values)) }
}

/// Mutable byte view of `f32`s. Sound: any bit pattern is a valid `f32`, so writing any
/// bytes through the view leaves valid floats; alignment and lifetime as in [`f32_bytes`].
pub(crate) fn f32_bytes_mut(values: &mut [f32]) -> &mut [u8] {
    // SAFETY: see above; the exclusive borrow of `values` is held for the view's lifetime.
    unsafe { std::slice::from_raw_parts_mut(values.as_mut_ptr().cast::<u8>(), size_of_val(values)) }
}

fn combine_into(dst: &mut [f32], received: &[f32], combine: Combine) {
    match combine {
        Combine::Add => {
            for (d, r) in dst.iter_mut().zip(received) {
                *d += *r;
            }
        }
        Combine::AddThenDivide(divisor) => {
            for (d, r) in dst.iter_mut().zip(received) {
                *d = (*d + *r) / divisor;
            }
        }
        Combine::Copy => dst.copy_from_slice(received),
    }
}

/// Per-op settings of the transfer loop.
pub(crate) struct OpContext {
    pub rank: usize,
    pub op: &'static str,
    /// Longest time without moving a single byte before the op fails.
    pub timeout: Duration,
    pub chunk_bytes: usize,
}

impl OpContext {
    fn peer_error(&self, link: &Link, cause: io::Error) -> CollectiveError {
        CollectiveError::Peer { rank: self.rank, op: self.op, peer: link.describe(), cause }
    }

    fn invalid(&self, message: String) -> CollectiveError {
        CollectiveError::Invalid { rank: self.rank, op: self.op, message }
    }
}

#[derive(Default)]
struct SendProgress {
    header_sent: usize,
    step: usize,
    /// Payload bytes of `step` written so far.
    bytes: usize,
}

struct RecvProgress {
    header: [u8; HEADER_LEN],
    header_got: usize,
    step: usize,
    /// Payload bytes of `step` read from the socket so far.
    bytes: usize,
    /// Elements of `step` already combined into the buffer.
    processed: usize,
    /// Bytes read into the staging buffer but not yet combined (less than one element after
    /// each pass).
    staged: usize,
}

/// Runs the steps of one op over `links`. `staging` must hold `ctx.chunk_bytes / 4` floats.
pub(crate) fn run_op(
    links: &mut Links,
    ctx: &OpContext,
    header: OpHeader,
    buffer: &mut [f32],
    steps: &[Step],
    staging: &mut [f32],
) -> Result<(), CollectiveError> {
    let chunk_bytes = ctx.chunk_bytes;
    debug_assert!(chunk_bytes >= 4 && staging.len() * 4 >= chunk_bytes);
    let header_bytes = header.encode();
    let mut send = SendProgress::default();
    let mut recv =
        RecvProgress { header: [0; HEADER_LEN], header_got: 0, step: 0, bytes: 0, processed: 0, staged: 0 };
    let mut last_progress = Instant::now();

    loop {
        let mut progressed = false;
        let mut want_write = false;
        let mut want_read = false;

        // Steps with nothing to send or receive are done at once.
        while send.header_sent == HEADER_LEN
            && send.step < steps.len()
            && send.bytes == steps[send.step].send.len() * 4
        {
            send.step += 1;
            send.bytes = 0;
        }
        while recv.header_got == HEADER_LEN
            && recv.step < steps.len()
            && recv.bytes == steps[recv.step].recv.len() * 4
        {
            recv.step += 1;
            recv.bytes = 0;
            recv.processed = 0;
        }
        let send_done = send.header_sent == HEADER_LEN && send.step == steps.len();
        let recv_done = recv.header_got == HEADER_LEN && recv.step == steps.len();
        if send_done && recv_done {
            return Ok(());
        }

        // Send side: the header, then whatever part of the current step's range is final.
        if !send_done {
            let out: &[u8] = if send.header_sent < HEADER_LEN {
                &header_bytes[send.header_sent..]
            } else {
                let step = &steps[send.step];
                let ready = match step.send_after_recv_of {
                    None => step.send.len(),
                    Some(u) if recv.header_got == HEADER_LEN && recv.step > u => step.send.len(),
                    Some(u) if recv.header_got == HEADER_LEN && recv.step == u => recv.processed,
                    Some(_) => 0,
                };
                let start = step.send.start * 4 + send.bytes;
                let end = ((step.send.start + ready) * 4).min(start + chunk_bytes);
                &f32_bytes(buffer)[start..end.max(start)]
            };
            if !out.is_empty() {
                match links.next.stream.write(out) {
                    Ok(0) => {
                        let e = io::Error::new(io::ErrorKind::WriteZero, "connection closed");
                        return Err(ctx.peer_error(&links.next, e));
                    }
                    Ok(n) => {
                        if send.header_sent < HEADER_LEN {
                            send.header_sent += n;
                        } else {
                            send.bytes += n;
                        }
                        progressed = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => want_write = true,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => progressed = true,
                    Err(e) => return Err(ctx.peer_error(&links.next, e)),
                }
            }
        }

        // Receive side: the header, then the current step's range, combined as it arrives.
        if !recv_done {
            if recv.header_got < HEADER_LEN {
                let got = read_some(&mut links.prev, ctx, &mut recv.header[recv.header_got..])?;
                match got {
                    Some(n) => {
                        recv.header_got += n;
                        progressed = true;
                        if recv.header_got == HEADER_LEN {
                            check_header(ctx, &links.prev, &recv.header, &header)?;
                        }
                    }
                    None => want_read = true,
                }
            } else {
                let step = &steps[recv.step];
                let writable = match step.recv_after_send_of {
                    None => step.recv.len(),
                    Some(u) if send.header_sent == HEADER_LEN && send.step > u => step.recv.len(),
                    Some(u) if send.header_sent == HEADER_LEN && send.step == u => send.bytes / 4,
                    Some(_) => 0,
                };
                let total = step.recv.len() * 4;
                if step.combine == Combine::Copy {
                    // Straight into the buffer: no staging copy.
                    let start = step.recv.start * 4 + recv.bytes;
                    let end = ((step.recv.start + writable) * 4).min(start + chunk_bytes);
                    if end > start {
                        let dst = &mut f32_bytes_mut(buffer)[start..end];
                        match read_some(&mut links.prev, ctx, dst)? {
                            Some(n) => {
                                recv.bytes += n;
                                recv.processed = recv.bytes / 4;
                                progressed = true;
                            }
                            None => want_read = true,
                        }
                    }
                } else {
                    let limit = (writable * 4).min(total);
                    let room = chunk_bytes - recv.staged;
                    let want = room.min(limit.saturating_sub(recv.bytes));
                    if want > 0 {
                        let staged = recv.staged;
                        let dst = &mut f32_bytes_mut(staging)[staged..staged + want];
                        match read_some(&mut links.prev, ctx, dst)? {
                            Some(n) => {
                                recv.bytes += n;
                                recv.staged += n;
                                let complete = recv.staged / 4;
                                let at = step.recv.start + recv.processed;
                                combine_into(
                                    &mut buffer[at..at + complete],
                                    &staging[..complete],
                                    step.combine,
                                );
                                recv.processed += complete;
                                // Keep the bytes of a partly received element for next time.
                                let tail = complete * 4..recv.staged;
                                recv.staged -= complete * 4;
                                f32_bytes_mut(staging).copy_within(tail, 0);
                                progressed = true;
                            }
                            None => want_read = true,
                        }
                    }
                }
            }
        }

        if progressed {
            last_progress = Instant::now();
            continue;
        }
        if !want_read && !want_write {
            // Both sides wait on each other: a bug in the schedule, not a peer problem.
            return Err(ctx.invalid(format!(
                "internal error: ring schedule stalled (send step {}, recv step {})",
                send.step, recv.step
            )));
        }
        let idle = last_progress.elapsed();
        if idle >= ctx.timeout {
            let mut waiting_for = Vec::new();
            if want_read {
                waiting_for.push(format!("{} to send", links.prev.describe()));
            }
            if want_write {
                waiting_for.push(format!("{} to receive", links.next.describe()));
            }
            return Err(CollectiveError::Timeout {
                rank: ctx.rank,
                op: ctx.op,
                peer: waiting_for.join(" and "),
                timeout_ms: ctx.timeout.as_millis() as u64,
            });
        }
        wait_ready(links, want_read, want_write, ctx.timeout - idle)
            .map_err(|e| ctx.invalid(format!("poll failed: {e}")))?;
    }
}

/// One non-blocking read: `Some(n)` bytes, `None` when nothing is there yet.
fn read_some(link: &mut Link, ctx: &OpContext, dst: &mut [u8]) -> Result<Option<usize>, CollectiveError> {
    loop {
        match link.stream.read(dst) {
            Ok(0) => {
                let e =
                    io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed in the middle of the op");
                return Err(ctx.peer_error(link, e));
            }
            Ok(n) => return Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ctx.peer_error(link, e)),
        }
    }
}

fn check_header(
    ctx: &OpContext,
    prev: &Link,
    received: &[u8; HEADER_LEN],
    ours: &OpHeader,
) -> Result<(), CollectiveError> {
    let theirs =
        OpHeader::parse(received).map_err(|why| ctx.invalid(format!("{} {why}", prev.describe())))?;
    if theirs != *ours {
        return Err(ctx.invalid(format!(
            "ranks disagree on the op: {} is in {}, this rank is in {}",
            prev.describe(),
            theirs.describe(),
            ours.describe()
        )));
    }
    Ok(())
}

/// Blocks until one of the wanted directions is ready, or `limit` passes.
fn wait_ready(links: &Links, read: bool, write: bool, limit: Duration) -> io::Result<()> {
    let mut fds = Vec::with_capacity(2);
    if read {
        fds.push(libc::pollfd { fd: links.prev.stream.as_raw_fd(), events: libc::POLLIN, revents: 0 });
    }
    if write {
        fds.push(libc::pollfd { fd: links.next.stream.as_raw_fd(), events: libc::POLLOUT, revents: 0 });
    }
    // Round up so that a sub-millisecond rest does not spin.
    let millis = limit.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
    // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs for the whole call.
    let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, millis) };
    if ready < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combine_applies_the_documented_arithmetic() {
        let mut d = [1.0f32, 2.0, 3.0];
        combine_into(&mut d, &[1.0, 1.0, 1.0], Combine::Add);
        assert_eq!(d, [2.0, 3.0, 4.0]);
        combine_into(&mut d, &[1.0, 0.0, 2.0], Combine::AddThenDivide(3.0));
        assert_eq!(d, [1.0, 1.0, 2.0]);
        combine_into(&mut d, &[9.0, 8.0, 7.0], Combine::Copy);
        assert_eq!(d, [9.0, 8.0, 7.0]);
    }

    #[test]
    fn byte_views_cover_the_floats() {
        let mut v = [1.5f32, -2.0];
        assert_eq!(f32_bytes(&v).len(), 8);
        assert_eq!(&f32_bytes(&v)[0..4], &1.5f32.to_ne_bytes());
        f32_bytes_mut(&mut v)[4..8].copy_from_slice(&7.25f32.to_ne_bytes());
        assert_eq!(v, [1.5, 7.25]);
    }
}
