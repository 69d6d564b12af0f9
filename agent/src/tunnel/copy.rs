//! Moving bytes between a TCP connection and an HTTP/2 stream, both ways, with half-close
//! carried across (TCP FIN <-> END_STREAM) and resets propagated (TCP error -> RST_STREAM,
//! RST_STREAM -> TCP RST).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use bytes::{Buf as _, Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncReadExt as _, AsyncWrite as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Read buffers are allocated only once data is there, start small, and grow while a
/// connection keeps filling them (bulk transfers then move large chunks per syscall).
const INITIAL_READ_BUF: usize = 4 * 1024;
const MAX_READ_BUF: usize = 256 * 1024;

/// Bytes moved so far, readable while the connection is open. One allocation per
/// connection, shared by its clones.
#[derive(Debug, Default, Clone)]
pub struct CopyStats(Arc<Counts>);

#[derive(Debug, Default)]
struct Counts {
    /// From the TCP side into the tunnel.
    sent: AtomicU64,
    /// From the tunnel to the TCP side.
    received: AtomicU64,
    /// Metric counters bumped alongside (sent, received), so scrapes see open connections.
    metrics: Option<(Counter, Counter)>,
}

impl CopyStats {
    /// Stats that also add to the given metric counters as bytes move.
    pub fn with_counters(sent: Counter, received: Counter) -> Self {
        Self(Arc::new(Counts {
            metrics: Some((sent, received)),
            ..Counts::default()
        }))
    }

    pub fn add_sent(&self, n: u64) {
        self.0.sent.fetch_add(n, Ordering::Relaxed);
        if let Some((sent, _)) = &self.0.metrics {
            sent.inc_by(n);
        }
    }

    pub fn add_received(&self, n: u64) {
        self.0.received.fetch_add(n, Ordering::Relaxed);
        if let Some((_, received)) = &self.0.metrics {
            received.inc_by(n);
        }
    }

    pub fn sent(&self) -> u64 {
        self.0.sent.load(Ordering::Relaxed)
    }

    pub fn received(&self) -> u64 {
        self.0.received.load(Ordering::Relaxed)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("TCP side: {0}")]
    Tcp(std::io::Error),
    #[error("tunnel side: {0}")]
    Tunnel(h2::Error),
}

/// Copies until both directions have finished. On an error of either side the other is
/// torn down the matching way (RST_STREAM or TCP RST).
///
/// `tcp` (the application's side) must come armed to reset ([`super::reset_on_close`]: from
/// the listener that accepted it, or [`super::Dialer::dial_app`], before any setup that can
/// fail); it is disarmed only once both directions ended cleanly: if the copy fails, or the
/// agent dies mid-copy and the kernel closes the socket, the application sees a reset rather
/// than a clean end of a truncated stream.
///
/// Owns what it copies between, and is `Unpin`: a caller can build it outside its own
/// `async` block and await it by `&mut`, so none of it is stored twice in the task.
pub fn copy_bidirectional(
    tcp: TcpStream,
    send: SendStream<Bytes>,
    recv: RecvStream,
    stats: CopyStats,
) -> CopyBidirectional {
    CopyBidirectional {
        tcp,
        send,
        recv,
        stats,
        upstream: Upstream::Reading {
            buf_size: INITIAL_READ_BUF,
        },
        downstream: Downstream::Receiving,
    }
}

/// The copy as a hand-written future rather than an `async` block: it lives in every
/// proxied connection's task for the connection's whole life, and this state (the two
/// halves' positions, a chunk in flight) is a fraction of what the compiler lays out for
/// the equivalent `async` code (two joined loops with their `select!` and write futures).
/// Waiting uses the sockets' and streams' own wakers (`poll_read_ready`, `poll_reset`,
/// `poll_data`), which need no waiter stored here.
pub struct CopyBidirectional {
    tcp: TcpStream,
    send: SendStream<Bytes>,
    recv: RecvStream,
    stats: CopyStats,
    upstream: Upstream,
    downstream: Downstream,
}

/// TCP side into the tunnel.
enum Upstream {
    /// Waiting for the application's data (or the stream's reset); no buffer is held.
    Reading { buf_size: usize },
    /// Sending `data` as the stream's flow control allows; capacity for it is reserved.
    Sending { data: Bytes, buf_size: usize },
    /// END_STREAM sent after the application's FIN.
    Done,
}

/// Tunnel to the TCP side.
enum Downstream {
    Receiving,
    /// Writing the rest of a chunk of `len` bytes to the application.
    Writing {
        rest: Bytes,
        len: usize,
    },
    /// END_STREAM received: half-closing toward the application.
    ShuttingDown,
    Done,
}

impl CopyBidirectional {
    /// The application's side.
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    fn poll_upstream(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), CopyError>> {
        loop {
            match &mut self.upstream {
                Upstream::Reading { buf_size } => {
                    let buf_size = *buf_size;
                    // While the application is quiet, still notice the stream being reset (or
                    // its connection dying): otherwise its socket would stay open, waiting for
                    // nothing.
                    if let Poll::Ready(reset) = self.send.poll_reset(cx) {
                        return Poll::Ready(Err(CopyError::Tunnel(
                            reset.map_or_else(|e| e, h2::Error::from),
                        )));
                    }
                    ready!(self.tcp.poll_read_ready(cx)).map_err(CopyError::Tcp)?;
                    // Allocated only once data is there: an idle connection then holds no
                    // buffer (thousands of idle connections would otherwise pin one each).
                    let mut buf = BytesMut::with_capacity(buf_size);
                    // `poll_read` rather than `try_read`: tokio takes a short read as the
                    // socket drained and clears its readiness, so the next wait goes to epoll
                    // instead of a recvfrom that finds nothing (one syscall per message).
                    let n = match tokio_util::io::poll_read_buf(
                        Pin::new(&mut self.tcp),
                        cx,
                        &mut buf,
                    ) {
                        Poll::Ready(Ok(n)) => n,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(CopyError::Tcp(e))),
                        // The readiness was stale: cleared, and the waker registered.
                        Poll::Pending => return Poll::Pending,
                    };
                    if n == 0 {
                        // Client half-closed: END_STREAM, but keep receiving.
                        self.send
                            .send_data(Bytes::new(), true)
                            .map_err(CopyError::Tunnel)?;
                        self.upstream = Upstream::Done;
                        continue;
                    }
                    let next_size = if n == buf_size && buf_size < MAX_READ_BUF {
                        buf_size * 4
                    } else {
                        buf_size
                    };
                    self.stats.add_sent(n as u64);
                    let data = buf.freeze();
                    // Never queue more than the window allows: reserve, then send what is
                    // granted.
                    self.send.reserve_capacity(data.len());
                    self.upstream = Upstream::Sending {
                        data,
                        buf_size: next_size,
                    };
                }
                Upstream::Sending { data, buf_size } => {
                    let granted = match ready!(self.send.poll_capacity(cx)) {
                        None => {
                            return Poll::Ready(Err(CopyError::Tunnel(h2::Error::from(
                                h2::Reason::CANCEL,
                            ))));
                        }
                        Some(granted) => granted.map_err(CopyError::Tunnel)?,
                    };
                    if granted == 0 {
                        self.send.reserve_capacity(data.len());
                        continue;
                    }
                    let part = data.split_to(granted.min(data.len()));
                    self.send
                        .send_data(part, false)
                        .map_err(CopyError::Tunnel)?;
                    if data.is_empty() {
                        self.upstream = Upstream::Reading {
                            buf_size: *buf_size,
                        };
                    } else {
                        self.send.reserve_capacity(data.len());
                    }
                }
                Upstream::Done => return Poll::Ready(Ok(())),
            }
        }
    }

    fn poll_downstream(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), CopyError>> {
        loop {
            match &mut self.downstream {
                Downstream::Receiving => match ready!(self.recv.poll_data(cx)) {
                    Some(chunk) => {
                        let rest = chunk.map_err(CopyError::Tunnel)?;
                        let len = rest.len();
                        self.downstream = Downstream::Writing { rest, len };
                    }
                    // Peer sent END_STREAM: half-close toward the TCP peer.
                    None => self.downstream = Downstream::ShuttingDown,
                },
                Downstream::Writing { rest, len } => {
                    while !rest.is_empty() {
                        let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, rest))
                            .map_err(CopyError::Tcp)?;
                        if n == 0 {
                            return Poll::Ready(Err(CopyError::Tcp(
                                std::io::ErrorKind::WriteZero.into(),
                            )));
                        }
                        rest.advance(n);
                    }
                    let len = *len;
                    self.stats.add_received(len as u64);
                    self.recv
                        .flow_control()
                        .release_capacity(len)
                        .map_err(CopyError::Tunnel)?;
                    self.downstream = Downstream::Receiving;
                }
                Downstream::ShuttingDown => {
                    ready!(Pin::new(&mut self.tcp).poll_shutdown(cx)).map_err(CopyError::Tcp)?;
                    self.downstream = Downstream::Done;
                }
                Downstream::Done => return Poll::Ready(Ok(())),
            }
        }
    }
}

impl Future for CopyBidirectional {
    type Output = Result<(), CopyError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        // Either side's error ends both at once; the other keeps its progress otherwise.
        let up = this.poll_upstream(cx)?;
        let down = this.poll_downstream(cx)?;
        if up.is_pending() || down.is_pending() {
            return Poll::Pending;
        }
        // Both directions ended with a FIN each way: the close may be orderly (a reset
        // now could discard reply bytes still in the send buffer). Otherwise the TCP side
        // stays armed and its close is a reset; on an error the SendStream is dropped
        // unfinished with this future, and h2 resets the stream (RST_STREAM CANCEL).
        super::fin_on_close(&this.tcp);
        Poll::Ready(Ok(()))
    }
}

/// Plain TCP to TCP (the plaintext inbound path and passthrough), counting as it goes like
/// the tunnel copy: `stats.sent` is `a` to `b`. Half-close is carried across; the first
/// error ends both, with a reset on both sides. Both sockets must come armed to reset
/// ([`super::reset_on_close`]: from the listener that accepted them, or
/// [`super::Dialer::dial_app`]); they are disarmed only once both directions ended cleanly,
/// so the agent dying mid-copy resets them too.
pub async fn copy_tcp(
    a: &mut TcpStream,
    b: &mut TcpStream,
    stats: &CopyStats,
) -> std::io::Result<()> {
    let result = copy_tcp_both_ways(a, b, stats).await;
    if result.is_ok() {
        super::fin_on_close(a);
        super::fin_on_close(b);
    }
    result
}

async fn copy_tcp_both_ways(
    a: &mut TcpStream,
    b: &mut TcpStream,
    stats: &CopyStats,
) -> std::io::Result<()> {
    let (mut a_read, mut a_write) = a.split();
    let (mut b_read, mut b_write) = b.split();
    let forward = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = a_read.read(&mut buf).await?;
            if n == 0 {
                return b_write.shutdown().await;
            }
            b_write.write_all(&buf[..n]).await?;
            stats.add_sent(n as u64);
        }
    };
    let backward = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = b_read.read(&mut buf).await?;
            if n == 0 {
                return a_write.shutdown().await;
            }
            a_write.write_all(&buf[..n]).await?;
            stats.add_received(n as u64);
        }
    };
    tokio::try_join!(forward, backward).map(drop)
}
