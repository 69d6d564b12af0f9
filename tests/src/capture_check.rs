//! The smallest real proof of the capture chain: one "pod" netns wired to one "peer" netns,
//! ambit's programs attached at the cgroup v2 root through the agent's loader, and plain TCP
//! clients inside the pod. The end-to-end test asserts on it; `cargo xtask demo` narrates it.

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ambit_agent::capture::{Capture, CaptureConfig};
use ambit_agent::netns::NetNs;
use ambit_common::{AGENT_MARK, OUTBOUND_CAPTURE_PORT};
use anyhow::{Context as _, bail};
use socket2::{Domain, Socket, Type};

use crate::{Netns, PinDir, wire};

pub const POD_ADDR: &str = "10.201.0.1";
pub const PEER_ADDR: &str = "10.201.0.2";
pub const PEER_PORT: u16 = 8080;
/// What the peer's server writes: proof that a connection went straight to the peer.
pub const PEER_GREETING: &str = "direct from peer";

const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// What happened to one connect() from inside the pod.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Reached the peer's server unchanged; carries its greeting.
    Direct(String),
    /// Arrived at the agent's in-pod listener; carries the original destination the agent
    /// recovered from the ORIG_DST map.
    Captured(Option<SocketAddr>),
    /// The connection was refused (nobody listening where it was sent).
    Refused,
    /// connect() itself was denied (EPERM from the capture hook).
    Denied,
}

pub struct CaptureBed {
    pub pins: PinDir,
    pub capture: Option<Capture>,
    pub pod_cookie: u64,
    pod_ns: NetNs,
    agent_listener: Option<TcpListener>,
    server_stop: Arc<AtomicBool>,
    // Declared last: the namespaces go after everything that lives in them.
    _peer: Netns,
    _pod: Netns,
}

impl CaptureBed {
    /// Builds the two namespaces, starts the peer's server and the agent's in-pod listener,
    /// and attaches the capture programs with a unique pin directory.
    pub fn new() -> anyhow::Result<Self> {
        let pod = Netns::create("apod")?;
        let peer = Netns::create("apeer")?;
        wire(
            &pod,
            &format!("{POD_ADDR}/24"),
            &peer,
            &format!("{PEER_ADDR}/24"),
        )?;
        let pod_ns = pod.open()?;
        let pod_cookie = pod_ns.cookie()?;

        let server_stop = Arc::new(AtomicBool::new(false));
        let server = peer.open()?.run(|| {
            let l = TcpListener::bind((PEER_ADDR, PEER_PORT))?;
            l.set_nonblocking(true)?;
            Ok(l)
        })?;
        spawn_greeter(server, server_stop.clone());

        let pins = PinDir::unique();
        let capture = Capture::attach(&CaptureConfig {
            pin_dir: pins.path().to_path_buf(),
            ..CaptureConfig::default()
        })
        .context("attach capture programs")?;
        let mut bed = Self {
            pins,
            capture: Some(capture),
            pod_cookie,
            pod_ns,
            agent_listener: None,
            server_stop,
            _peer: peer,
            _pod: pod,
        };
        bed.open_agent_listener()?;
        Ok(bed)
    }

    pub fn peer(&self) -> SocketAddr {
        SocketAddr::from(([10, 201, 0, 2], PEER_PORT))
    }

    fn capture(&mut self) -> anyhow::Result<&mut Capture> {
        self.capture.as_mut().context("agent is not running")
    }

    pub fn enroll(&mut self) -> anyhow::Result<()> {
        let cookie = self.pod_cookie;
        Ok(self.capture()?.enroll(cookie)?)
    }

    pub fn unenroll(&mut self) -> anyhow::Result<()> {
        let cookie = self.pod_cookie;
        Ok(self.capture()?.unenroll(cookie)?)
    }

    /// Plays an agent crash: its listener and map handles vanish, the pins stay.
    pub fn crash_agent(&mut self) {
        if let Some(listener) = self.agent_listener.take() {
            crate::close_listener_everywhere(listener);
        }
        self.capture = None;
    }

    /// Plays an agent restart: reattach (reusing pins) and reopen the listener.
    pub fn restart_agent(&mut self) -> anyhow::Result<()> {
        self.capture = Some(Capture::attach(&CaptureConfig {
            pin_dir: self.pins.path().to_path_buf(),
            ..CaptureConfig::default()
        })?);
        self.open_agent_listener()
    }

    /// `ambit uninstall`: detach and remove every pin.
    pub fn uninstall(&mut self) -> anyhow::Result<()> {
        if let Some(capture) = self.capture.take() {
            capture.uninstall()?;
        }
        Ok(())
    }

    fn open_agent_listener(&mut self) -> anyhow::Result<()> {
        let listener = self.pod_ns.run(|| {
            let l = TcpListener::bind(("127.0.0.1", OUTBOUND_CAPTURE_PORT))?;
            l.set_nonblocking(true)?;
            Ok(l)
        })?;
        self.agent_listener = Some(listener);
        Ok(())
    }

    /// connect() from inside the pod to `dst`; with `agent_mark` the socket carries the
    /// agent's SO_MARK first, as the agent's own upstream sockets do.
    pub fn connect_from_pod(
        &mut self,
        dst: SocketAddr,
        agent_mark: bool,
    ) -> anyhow::Result<Outcome> {
        let connected = self.pod_ns.run(move || {
            let socket = Socket::new(Domain::for_address(dst), Type::STREAM, None)?;
            if agent_mark {
                ambit_agent::sys::set_mark(&socket, AGENT_MARK)?;
            }
            match socket.connect_timeout(&dst.into(), IO_TIMEOUT) {
                Ok(()) => Ok(Ok(TcpStream::from(socket))),
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => Ok(Err(Outcome::Refused)),
                Err(e) if e.kind() == ErrorKind::PermissionDenied => Ok(Err(Outcome::Denied)),
                Err(e) => Err(e),
            }
        })?;
        let mut client = match connected {
            Ok(client) => client,
            Err(outcome) => return Ok(outcome),
        };
        let client_port = client.local_addr()?.port();
        if let Some(accepted_peer) = self.accept_captured(client_port)? {
            let cookie = self.pod_cookie;
            let capture = self.capture()?;
            let orig = capture.take_orig_dst(cookie, accepted_peer.port())?;
            anyhow::ensure!(
                orig.is_none()
                    || capture
                        .take_orig_dst(cookie, accepted_peer.port())?
                        .is_none(),
                "the original destination of {accepted_peer} is still recorded after it was taken"
            );
            return Ok(Outcome::Captured(orig));
        }
        client.set_read_timeout(Some(IO_TIMEOUT))?;
        let mut reply = String::new();
        client.read_to_string(&mut reply)?;
        Ok(Outcome::Direct(reply.trim().to_string()))
    }

    /// connect() from inside the pod to `dst`, as an unmarked app; returns what the app's
    /// getpeername() reports once the agent has taken the connection. Errors when the
    /// connection was not captured.
    pub fn peer_name_seen_by_pod_app(&mut self, dst: SocketAddr) -> anyhow::Result<SocketAddr> {
        let client = self.pod_ns.run(move || {
            let socket = Socket::new(Domain::for_address(dst), Type::STREAM, None)?;
            socket.connect_timeout(&dst.into(), IO_TIMEOUT)?;
            Ok(TcpStream::from(socket))
        })?;
        let client_port = client.local_addr()?.port();
        self.accept_captured(client_port)?
            .context("connection was not captured by the agent")?;
        Ok(client.peer_addr()?)
    }

    /// The connection from `client_port`, if it is waiting in the agent's accept queue.
    /// The kernel completes the handshake before connect() returns, so a captured connection
    /// is already queued here; a short grace period covers scheduling only.
    fn accept_captured(&mut self, client_port: u16) -> anyhow::Result<Option<SocketAddr>> {
        let Some(listener) = &self.agent_listener else {
            return Ok(None);
        };
        let deadline = Instant::now() + Duration::from_millis(200);
        loop {
            match listener.accept() {
                Ok((stream, peer)) if peer.port() == client_port => {
                    let _ = stream.shutdown(Shutdown::Both);
                    return Ok(Some(peer));
                }
                Ok((_, peer)) => bail!("unexpected connection from {peer} on the agent listener"),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return Ok(None);
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl Drop for CaptureBed {
    fn drop(&mut self) {
        self.server_stop.store(true, Ordering::Relaxed);
    }
}

/// Serves PEER_GREETING to every connection until `stop` is set.
fn spawn_greeter(listener: TcpListener, stop: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    let _ = stream.write_all(PEER_GREETING.as_bytes());
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return,
            }
        }
    });
}
