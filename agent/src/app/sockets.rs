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
    Connect,
    /// A connection from a client's address with any port (inbound dials with source
    /// preservation): also IP_TRANSPARENT and IP_BIND_ADDRESS_NO_PORT, set at creation so
    /// a dial pays only for bind and connect.
    ConnectAsClient,
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
const STOCKS: usize = 4;

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
            Purpose::ConnectAsClient => Some(2 + v6),
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
    requests: Mutex<mpsc::Sender<Request>>,
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
            requests: Mutex::new(tx),
            stock,
        })
    }

    fn request(&self, request: Request) -> io::Result<()> {
        self.requests
            .lock()
            .map_err(|_| io::Error::other("pod socket lock poisoned"))?
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
    if purpose == Purpose::ConnectAsClient {
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
        Box::pin(async move {
            // A client's address with any port (every inbound dial under source
            // preservation) takes a socket already prepared for it.
            let purpose = match source {
                Some(source) if source.port() == 0 => Purpose::ConnectAsClient,
                _ => Purpose::Connect,
            };
            let socket = self.socket(Domain::for_address(target), purpose).await?;
            let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(socket));
            match purpose {
                Purpose::ConnectAsClient => {
                    crate::tunnel::connect_prepared(socket, target, source).await
                }
                _ => crate::tunnel::connect_from(socket, target, source).await,
            }
        })
    }
}
