//! Sockets inside a pod's network namespace. A socket belongs to the netns it was created
//! in, so only creation has to happen there: one long-lived thread per pod sits in the pod's
//! netns and creates sockets on request; binding, listening and connecting then happen on
//! the async runtime as usual. Every socket the agent connects from carries the agent's
//! mark so the capture programs never take the agent's own traffic.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use ambit_common::AGENT_MARK;
use futures::future::BoxFuture;
use socket2::{Domain, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::oneshot;

use crate::netns::NetNs;
use crate::tunnel::Dialer;

/// Which kind of socket to create: the agent's outgoing connections carry its mark; its
/// listeners must not, or their replies would follow the mark's routing (table 133 sends
/// marked packets to lo for source preservation) instead of the normal routes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// The agent's own connections (HBONE to a peer agent).
    Connect,
    /// A connection to an application, armed to reset on close (SO_LINGER 0) at creation.
    ConnectToApp,
    /// [`Purpose::ConnectToApp`] from a client's address with any port (inbound dials with
    /// source preservation): also IP_TRANSPARENT and IP_BIND_ADDRESS_NO_PORT, set at
    /// creation so a dial pays only for bind and connect.
    ConnectToAppAsClient,
    Listen,
}

enum Request {
    /// One socket, answered on the channel (listeners, and dials when the stock is empty).
    One(Domain, Purpose, oneshot::Sender<io::Result<Socket>>),
    /// Top the stock of connect sockets of this kind up to [`STOCK_FILL`]; nobody waits.
    Refill(Domain, Purpose),
}

/// Connect sockets created ahead of need, so that a dial takes one from here instead of
/// waiting for the pod's thread to be scheduled (a futex wake-up and a context switch each
/// way, per connection). The thread refills the stock in batches, asked when it runs low.
const STOCK_FILL: usize = 16;
const STOCK_LOW: usize = 4;

/// One stock per domain and connect purpose (see [`Stock::slot`]).
const STOCKS: usize = 6;

#[derive(Default)]
struct Stock {
    sockets: [Mutex<Vec<Socket>>; STOCKS],
    /// A refill of that stock is queued or running: at most one at a time.
    refilling: [AtomicBool; STOCKS],
}

impl Stock {
    /// `None` for listeners, which are not stocked.
    fn slot(domain: Domain, purpose: Purpose) -> Option<usize> {
        let v6 = usize::from(domain == Domain::IPV6);
        match purpose {
            Purpose::Connect => Some(v6),
            Purpose::ConnectToApp => Some(2 + v6),
            Purpose::ConnectToAppAsClient => Some(4 + v6),
            Purpose::Listen => None,
        }
    }

    fn refill(&self, domain: Domain, purpose: Purpose) {
        let Some(slot) = Self::slot(domain, purpose) else {
            return;
        };
        let have = self.sockets[slot].lock().map_or(STOCK_FILL, |s| s.len());
        let mut fresh = Vec::with_capacity(STOCK_FILL.saturating_sub(have));
        for _ in have..STOCK_FILL {
            match new_socket(domain, purpose) {
                Ok(socket) => fresh.push(socket),
                // Dials fall back to asking the thread, which then reports the error.
                Err(e) => {
                    tracing::debug!(error = %e, "pre-creating pod sockets failed");
                    break;
                }
            }
        }
        if let Ok(mut stock) = self.sockets[slot].lock() {
            stock.append(&mut fresh);
        }
        self.refilling[slot].store(false, Ordering::Release);
    }
}

pub struct PodSockets {
    /// `Sync` itself: dials on every shard and the enrollment's listener requests send
    /// without a lock between them.
    requests: mpsc::Sender<Request>,
    stock: Arc<Stock>,
}

impl PodSockets {
    /// Starts the pod's socket thread; fails if the netns cannot be entered.
    pub fn spawn(netns: &NetNs) -> io::Result<Self> {
        let fd = std::fs::File::open(netns.path())?;
        let (tx, rx) = mpsc::channel::<Request>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let stock = Arc::new(Stock::default());
        let thread_stock = stock.clone();
        std::thread::Builder::new()
            .name("ambit-pod-sockets".into())
            .spawn(move || {
                if let Err(e) = crate::sys::setns_net(std::os::fd::AsFd::as_fd(&fd)) {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
                let _ = ready_tx.send(Ok(()));
                // Ends when the PodSockets (the only sender) is dropped.
                while let Ok(request) = rx.recv() {
                    match request {
                        Request::One(domain, purpose, reply) => {
                            let _ = reply.send(new_socket(domain, purpose));
                        }
                        Request::Refill(domain, purpose) => thread_stock.refill(domain, purpose),
                    }
                }
            })?;
        ready_rx
            .recv()
            .map_err(|_| io::Error::other("pod socket thread died"))??;
        Ok(Self {
            requests: tx,
            stock,
        })
    }

    fn request(&self, request: Request) -> io::Result<()> {
        self.requests
            .send(request)
            .map_err(|_| io::Error::other("pod socket thread is gone"))
    }

    async fn socket(&self, domain: Domain, purpose: Purpose) -> io::Result<Socket> {
        if let Some(slot) = Stock::slot(domain, purpose) {
            let (taken, left) = match self.stock.sockets[slot].lock() {
                Ok(mut stock) => (stock.pop(), stock.len()),
                Err(_) => (None, 0),
            };
            if left < STOCK_LOW
                && !self.stock.refilling[slot].swap(true, Ordering::AcqRel)
                && let Err(e) = self.request(Request::Refill(domain, purpose))
                && taken.is_none()
            {
                return Err(e);
            }
            if let Some(socket) = taken {
                return Ok(socket);
            }
        }
        let (reply, response) = oneshot::channel();
        self.request(Request::One(domain, purpose, reply))?;
        response
            .await
            .map_err(|_| io::Error::other("pod socket thread is gone"))?
    }

    /// A listener inside the pod on `addr`, not yet registered with a runtime: the
    /// kernel (sk_lookup's socket map) and the shard that will serve it take it from here.
    /// `options` runs before `listen()`: every connection it accepts inherits them, none
    /// can complete before they are set.
    pub async fn listen_std(
        &self,
        addr: SocketAddr,
        options: impl FnOnce(&Socket) -> io::Result<()>,
    ) -> io::Result<std::net::TcpListener> {
        let socket = self
            .socket(Domain::for_address(addr), Purpose::Listen)
            .await?;
        options(&socket)?;
        socket.set_reuse_address(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        Ok(socket.into())
    }
}

fn new_socket(domain: Domain, purpose: Purpose) -> io::Result<Socket> {
    let socket = Socket::new(domain, Type::STREAM.nonblocking().cloexec(), None)?;
    if purpose != Purpose::Listen {
        crate::sys::set_mark(&socket, AGENT_MARK)?;
        socket.set_tcp_nodelay(true)?;
    }
    if matches!(
        purpose,
        Purpose::ConnectToApp | Purpose::ConnectToAppAsClient
    ) {
        socket.set_linger(Some(std::time::Duration::ZERO))?;
    }
    if purpose == Purpose::ConnectToAppAsClient {
        crate::tunnel::prepare_for_client_source(&socket, true)?;
    }
    Ok(socket)
}

impl Dialer for PodSockets {
    fn dial(
        &self,
        target: SocketAddr,
        source: Option<SocketAddr>,
    ) -> BoxFuture<'_, io::Result<TcpStream>> {
        self.dial_as(Purpose::Connect, target, source)
    }

    fn dial_app(
        &self,
        target: SocketAddr,
        source: Option<SocketAddr>,
    ) -> BoxFuture<'_, io::Result<TcpStream>> {
        // A client's address with any port (every inbound dial under source preservation)
        // takes a socket already prepared for it.
        let purpose = match source {
            Some(source) if source.port() == 0 => Purpose::ConnectToAppAsClient,
            _ => Purpose::ConnectToApp,
        };
        self.dial_as(purpose, target, source)
    }
}

impl PodSockets {
    fn dial_as(
        &self,
        purpose: Purpose,
        target: SocketAddr,
        source: Option<SocketAddr>,
    ) -> BoxFuture<'_, io::Result<TcpStream>> {
        Box::pin(async move {
            let socket = self.socket(Domain::for_address(target), purpose).await?;
            let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(socket));
            match purpose {
                Purpose::ConnectToAppAsClient => {
                    crate::tunnel::connect_prepared(socket, target, source).await
                }
                _ => crate::tunnel::connect_from(socket, target, source).await,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn linger(tcp: &TcpStream) -> Option<std::time::Duration> {
        socket2::SockRef::from(tcp).linger().expect("SO_LINGER")
    }

    /// Sockets toward an application come armed to reset on close from the stock (nothing
    /// to set per connection); the agent's own HBONE dials come unarmed (the outbound arms
    /// them for their TLS handshake only).
    #[tokio::test]
    async fn dials_toward_applications_come_armed_to_reset_and_tunnel_dials_do_not() {
        let netns = NetNs::open("/proc/self/ns/net").expect("own netns");
        // setns needs CAP_SYS_ADMIN, the mark and IP_TRANSPARENT CAP_NET_ADMIN.
        let Ok(sockets) = PodSockets::spawn(&netns) else {
            eprintln!("skipping: cannot enter a network namespace (needs root)");
            return;
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let as_client = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        // Twice each: the first may be made on request, the second comes from the stock.
        for _ in 0..2 {
            let tunnel = sockets.dial(addr, None).await.expect("dial");
            assert_eq!(
                linger(&tunnel),
                None,
                "an HBONE connection closes with a FIN"
            );
            let app = sockets.dial_app(addr, None).await.expect("dial_app");
            assert_eq!(linger(&app), Some(std::time::Duration::ZERO));
            let app = sockets.dial_app(addr, as_client).await.expect("as client");
            assert_eq!(linger(&app), Some(std::time::Duration::ZERO));
            assert_eq!(app.local_addr().expect("addr").ip(), addr.ip());
        }
    }
}
