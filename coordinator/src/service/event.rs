//! What the gRPC side (and the local launcher) tells the job driver.

use std::net::SocketAddr;

use trainer_proto::v1::worker_message;

/// What the service tells the driver. Events of the gRPC side carry the attempt they belong
/// to: the driver ignores those of an attempt it has already given up (a session of a killed
/// worker that closes late).
#[derive(Debug)]
pub enum Event {
    Registered {
        attempt: u32,
        rank: usize,
        hostname: String,
        pid: u32,
        peer: Option<SocketAddr>,
    },
    SessionOpened {
        attempt: u32,
        rank: usize,
    },
    Message {
        attempt: u32,
        rank: usize,
        body: worker_message::Body,
    },
    SessionClosed {
        attempt: u32,
        rank: usize,
        reason: String,
    },
    /// A worker asked to join while every rank of the attempt was taken and the job runs
    /// below its most workers (`--workers MIN:MAX`): it is admitted at the next checkpoint.
    JoinWaiting {
        hostname: String,
        pid: u32,
    },
    /// A local worker process ended (sent by the launcher).
    ChildExited {
        pid: u32,
        status: String,
    },
    /// Ctrl-C or SIGTERM.
    Interrupted {
        signal: &'static str,
    },
}
