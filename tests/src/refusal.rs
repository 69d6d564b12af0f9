//! Assertions about how a connection ends, for tests that expect the mesh to refuse or revoke
//! one. A refusal must be a reset (ECONNRESET): a read that times out means nothing ended the
//! connection, and a clean close (FIN) could be mistaken by the client for an empty reply, so
//! neither may pass for a refusal.

use std::fmt;
use std::io::{self, ErrorKind, Read, Write as _};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

use crate::testbed::Pod;

/// How a connection ended, seen from the client.
#[derive(Debug)]
pub enum Ending {
    /// The peer closed cleanly (FIN) after sending these bytes.
    Closed { received: Vec<u8> },
    /// ECONNRESET on a read, a write or a shutdown.
    Reset {
        during: &'static str,
        received: Vec<u8>,
    },
    /// The read timed out (WouldBlock / TimedOut): nothing ended the connection.
    TimedOut {
        during: &'static str,
        received: Vec<u8>,
    },
    /// Any other error.
    Failed {
        during: &'static str,
        error: io::Error,
    },
}

impl fmt::Display for Ending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        match self {
            Ending::Closed { received } => {
                write!(f, "closed cleanly after {:?}", text(received))
            }
            Ending::Reset { during, received } => {
                write!(f, "reset during {during} after {:?}", text(received))
            }
            Ending::TimedOut { during, received } => {
                write!(f, "timed out during {during} after {:?}", text(received))
            }
            Ending::Failed { during, error } => write!(f, "{during} failed: {error}"),
        }
    }
}

/// Classifies an I/O error. A shutdown or write on a socket the peer already reset can fail
/// with ENOTCONN or EPIPE while the reset itself is still pending on the socket: the pending
/// error decides then.
fn classify(
    during: &'static str,
    error: io::Error,
    stream: &TcpStream,
    received: Vec<u8>,
) -> Ending {
    match error.kind() {
        ErrorKind::ConnectionReset => Ending::Reset { during, received },
        ErrorKind::WouldBlock | ErrorKind::TimedOut => Ending::TimedOut { during, received },
        ErrorKind::NotConnected | ErrorKind::BrokenPipe => match stream.take_error() {
            Ok(Some(pending)) if pending.kind() == ErrorKind::ConnectionReset => {
                Ending::Reset { during, received }
            }
            _ => Ending::Failed { during, error },
        },
        _ => Ending::Failed { during, error },
    }
}

/// Reads what is left on `stream` (through `reader`, which may buffer it) until the
/// connection ends, and says how it ended.
pub fn read_until_end(reader: &mut impl Read, stream: &TcpStream) -> Ending {
    let mut received = Vec::new();
    match reader.read_to_end(&mut received) {
        Ok(_) => Ending::Closed { received },
        Err(e) => classify("read", e, stream, received),
    }
}

/// From inside `pod`: connects to `to`, sends `payload`, half-closes and reads until the
/// connection ends or `read_timeout` passes. The connect itself must succeed (the local
/// agent or the destination accepts it); what matters is how the exchange ends.
pub fn exchange(
    pod: &Pod,
    to: SocketAddr,
    payload: &[u8],
    read_timeout: Duration,
) -> anyhow::Result<Ending> {
    let stream = match pod.connect(to) {
        Ok(stream) => stream,
        // A refusal fast enough (same node) lands before connect() has looked at the
        // socket: the handshake completed and the reset came right after it.
        Err(e)
            if e.downcast_ref::<io::Error>()
                .is_some_and(|e| e.kind() == ErrorKind::ConnectionReset) =>
        {
            return Ok(Ending::Reset {
                during: "connect",
                received: Vec::new(),
            });
        }
        Err(e) => return Err(e),
    };
    stream.set_read_timeout(Some(read_timeout))?;
    let mut writer = &stream;
    if let Err(e) = writer.write_all(payload) {
        return Ok(classify("write", e, &stream, Vec::new()));
    }
    if let Err(e) = stream.shutdown(Shutdown::Write) {
        return Ok(classify("shutdown", e, &stream, Vec::new()));
    }
    let mut reader = &stream;
    Ok(read_until_end(&mut reader, &stream))
}

/// The connection was refused the way the mesh must refuse: reset, with nothing of the
/// destination's reply delivered.
#[track_caller]
pub fn assert_reset(ending: &Ending, what: &str) {
    match ending {
        Ending::Reset { received, .. } if received.is_empty() => {}
        other => panic!("{what}: expected a reset with nothing received, got: {other}"),
    }
}
