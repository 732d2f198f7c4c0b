//! A TCP proxy on 127.0.0.1 whose client -> server direction the test can hold: a slow or
//! stalled link between one worker and the coordinator, so that something (a checkpoint
//! upload) is still in flight when the test makes something else happen. The server ->
//! client direction is never held, so the held worker still hears the coordinator.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

#[derive(Default)]
struct Gate {
    /// Bytes forwarded client -> server so far, over every connection.
    passed: u64,
    /// Forward no byte beyond this count of `passed` (None: no limit).
    limit: Option<u64>,
    /// A connection has bytes it may not forward yet.
    holding: bool,
    closed: bool,
}

/// The proxy; it stops accepting when dropped (connections already open go on until either
/// side closes them).
pub struct GatedProxy {
    /// Where clients connect (`127.0.0.1:port`).
    pub addr: String,
    gate: Arc<(Mutex<Gate>, Condvar)>,
}

impl GatedProxy {
    /// Listens on 127.0.0.1 and forwards every connection to `target` (`host:port`).
    pub fn start(target: &str) -> GatedProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let addr = listener.local_addr().expect("the proxy's address").to_string();
        let gate = Arc::new((Mutex::new(Gate::default()), Condvar::new()));
        let (shared, target) = (gate.clone(), target.to_string());
        thread::spawn(move || {
            for client in listener.incoming() {
                if shared.0.lock().unwrap().closed {
                    break;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(&target) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                let _ = (client.set_nodelay(true), server.set_nodelay(true));
                let (up_from, up_to) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let gate = shared.clone();
                thread::spawn(move || forward(up_from, up_to, Some(gate)));
                thread::spawn(move || forward(server, client, None));
            }
        });
        GatedProxy { addr, gate }
    }

    /// Lets `bytes` more go client -> server (counted from now, over every connection), then
    /// holds the rest until [`GatedProxy::release`].
    pub fn hold_after(&self, bytes: u64) {
        let mut g = self.gate.0.lock().unwrap();
        g.limit = Some(g.passed + bytes);
        g.holding = false;
    }

    /// Forwards everything again, the held bytes first.
    pub fn release(&self) {
        let mut g = self.gate.0.lock().unwrap();
        g.limit = None;
        g.holding = false;
        self.gate.1.notify_all();
    }

    /// Whether bytes are being held now.
    pub fn holding(&self) -> bool {
        self.gate.0.lock().unwrap().holding
    }

    /// Bytes forwarded client -> server so far.
    pub fn passed(&self) -> u64 {
        self.gate.0.lock().unwrap().passed
    }

    /// Waits (up to `within`) until bytes are held; false if none were.
    pub fn wait_until_holding(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while !self.holding() {
            if Instant::now() > deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(20));
        }
        true
    }
}

impl Drop for GatedProxy {
    fn drop(&mut self) {
        let mut g = self.gate.0.lock().unwrap();
        g.closed = true;
        g.limit = None;
        self.gate.1.notify_all();
        drop(g);
        // Wakes the accept loop so that it sees `closed`.
        let _ = TcpStream::connect(&self.addr);
    }
}

/// Copies `from` to `to` until either ends; through `gate` when given. Then closes both, as
/// a proxy whose one side went away does.
fn forward(mut from: TcpStream, mut to: TcpStream, gate: Option<Arc<(Mutex<Gate>, Condvar)>>) {
    let mut buf = vec![0u8; 16 * 1024];
    'copy: loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut sent = 0;
        while sent < n {
            let mut take = n - sent;
            if let Some(gate) = &gate {
                let (lock, wake) = &**gate;
                let mut g = lock.lock().unwrap();
                while g.limit.is_some_and(|l| g.passed >= l) {
                    g.holding = true;
                    g = wake.wait(g).unwrap();
                }
                if let Some(limit) = g.limit {
                    take = take.min((limit - g.passed) as usize);
                }
                g.passed += take as u64;
            }
            if to.write_all(&buf[sent..sent + take]).is_err() {
                break 'copy;
            }
            sent += take;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
