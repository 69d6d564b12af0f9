//! Helpers for the fault tests: long transfers whose ends record exactly how they ended, so
//! a reset can be told from a clean close and from a stall.

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::testbed::Pod;

/// How one side of a connection saw it end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ending {
    /// ECONNRESET: the peer reset the connection.
    Reset,
    /// A read returned 0: the peer closed cleanly (FIN).
    Eof,
    /// Nothing happened before the read timeout.
    TimedOut,
    /// Any other error.
    Error(ErrorKind),
}

impl Ending {
    fn of(result: std::io::Result<usize>) -> Option<Self> {
        match result {
            Ok(0) => Some(Self::Eof),
            Ok(_) => None,
            Err(e) => match e.kind() {
                ErrorKind::ConnectionReset => Some(Self::Reset),
                ErrorKind::WouldBlock | ErrorKind::TimedOut => Some(Self::TimedOut),
                kind => Some(Self::Error(kind)),
            },
        }
    }
}

/// A server in a pod that, once a client sends a line, writes to it without end and
/// records how each connection ended.
pub struct StreamServer {
    endings: Arc<Mutex<Vec<(SocketAddr, Ending)>>>,
    accepted: Arc<Mutex<usize>>,
}

impl StreamServer {
    /// Listens on `port` of `pod`'s address, inside the pod.
    pub fn start(pod: &Pod, port: u16) -> anyhow::Result<Self> {
        let ip = pod.ip;
        let listener = pod.ns.open()?.run(move || TcpListener::bind((ip, port)))?;
        let endings = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(Mutex::new(0));
        let (e, a) = (endings.clone(), accepted.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                if let Ok(mut n) = a.lock() {
                    *n += 1;
                }
                let endings = e.clone();
                std::thread::spawn(move || {
                    let peer = stream
                        .peer_addr()
                        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
                    let ending = stream_until_the_end(stream);
                    if let Ok(mut list) = endings.lock() {
                        list.push((peer, ending));
                    }
                });
            }
        });
        Ok(Self { endings, accepted })
    }

    pub fn accepted(&self) -> usize {
        self.accepted.lock().map_or(0, |n| *n)
    }

    /// Waits until `count` connections have ended, or `timeout`; returns the endings seen.
    pub fn wait_endings(&self, count: usize, timeout: Duration) -> Vec<(SocketAddr, Ending)> {
        let deadline = Instant::now() + timeout;
        loop {
            let endings = self.endings.lock().map(|l| l.clone()).unwrap_or_default();
            if endings.len() >= count || Instant::now() > deadline {
                return endings;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Waits for the request line, then writes until the connection ends. Every round reads
/// before it writes, so a FIN is always seen as the end of input (a later write could
/// provoke a reset and hide it) and the first error reported is the connection's own.
fn stream_until_the_end(mut stream: TcpStream) -> Ending {
    let mut buf = [0u8; 4096];
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    match stream.read(&mut buf) {
        Ok(n) if n > 0 => {}
        other => return Ending::of(other).unwrap_or(Ending::TimedOut),
    }
    if stream.set_nonblocking(true).is_err() {
        return Ending::Error(ErrorKind::Other);
    }
    let chunk = vec![b'x'; 16 * 1024];
    // A stall this long means nobody will ever end the connection: report it.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match stream.read(&mut buf) {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            other => {
                if let Some(ending) = Ending::of(other) {
                    return ending;
                }
            }
        }
        match stream.write(&chunk) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Ending::Reset,
            Err(e) => return Ending::Error(e.kind()),
        }
        if Instant::now() > deadline {
            return Ending::TimedOut;
        }
    }
}

/// A client transfer: sends a line, then reads until the connection ends. `started` fires
/// once `warm` bytes have arrived, i.e. the transfer is flowing end to end.
pub fn download(
    mut stream: TcpStream,
    warm: usize,
    started: std::sync::mpsc::Sender<()>,
) -> (usize, Ending) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    if let Err(e) = stream.write_all(b"go\n") {
        return (0, Ending::of(Err(e)).unwrap_or(Ending::TimedOut));
    }
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    let mut signalled = false;
    loop {
        match stream.read(&mut buf) {
            Ok(n) if n > 0 => total += n,
            other => return (total, Ending::of(other).unwrap_or(Ending::Eof)),
        }
        if !signalled && total >= warm {
            signalled = true;
            let _ = started.send(());
        }
    }
}
