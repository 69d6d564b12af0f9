//! Moving bytes between a TCP connection and an HTTP/2 stream, both ways, with half-close
//! carried across (TCP FIN <-> END_STREAM) and resets propagated (TCP error -> RST_STREAM,
//! RST_STREAM -> TCP RST).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
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
/// `tcp` (the application's side) is armed to reset from the start and disarmed only once
/// both directions ended cleanly: if the copy fails, or the agent dies mid-copy and the
/// kernel closes the socket, the application sees a reset rather than a clean end of a
/// truncated stream.
pub async fn copy_bidirectional(
    tcp: &mut TcpStream,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
    stats: &CopyStats,
) -> Result<(), CopyError> {
    super::reset_on_close(tcp);
    let (tcp_read, mut tcp_write) = tcp.split();
    let upstream = async {
        let mut buf_size = INITIAL_READ_BUF;
        loop {
            // Wait for data before allocating: an idle connection then holds no buffer
            // (thousands of idle connections would otherwise pin one each).
            let tcp_ref: &TcpStream = tcp_read.as_ref();
            // While the application is quiet, still notice the stream being reset (or its
            // connection dying): otherwise its socket would stay open, waiting for nothing.
            tokio::select! {
                readable = tcp_ref.readable() => readable.map_err(CopyError::Tcp)?,
                reset = futures::future::poll_fn(|cx| send.poll_reset(cx)) => {
                    return Err(CopyError::Tunnel(reset.map_or_else(|e| e, h2::Error::from)));
                }
            }
            let mut buf = BytesMut::with_capacity(buf_size);
            let n = match tcp_ref.try_read_buf(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(CopyError::Tcp(e)),
            };
            if n == 0 {
                // Client half-closed: END_STREAM, but keep receiving.
                send.send_data(Bytes::new(), true)
                    .map_err(CopyError::Tunnel)?;
                return Ok(());
            }
            if n == buf_size && buf_size < MAX_READ_BUF {
                buf_size *= 4;
            }
            stats.add_sent(n as u64);
            send_all(&mut send, buf.freeze()).await?;
        }
    };
    let downstream = async {
        while let Some(chunk) = recv.data().await {
            let chunk = chunk.map_err(CopyError::Tunnel)?;
            let len = chunk.len();
            tcp_write.write_all(&chunk).await.map_err(CopyError::Tcp)?;
            stats.add_received(len as u64);
            recv.flow_control()
                .release_capacity(len)
                .map_err(CopyError::Tunnel)?;
        }
        // Peer sent END_STREAM: half-close toward the TCP peer.
        tcp_write.shutdown().await.map_err(CopyError::Tcp)
    };
    let result = tokio::try_join!(upstream, downstream).map(drop);
    if result.is_ok() {
        // Both directions ended with a FIN each way: the close may be orderly (a reset
        // now could discard reply bytes still in the send buffer).
        super::fin_on_close(tcp);
    }
    // Otherwise the TCP side stays armed and its close is a reset; on a TCP error the
    // SendStream is dropped unfinished here, and h2 resets the stream (RST_STREAM CANCEL).
    result
}

/// Sends `data` respecting HTTP/2 flow control: never queue more than the window allows.
async fn send_all(send: &mut SendStream<Bytes>, mut data: Bytes) -> Result<(), CopyError> {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let granted = futures::future::poll_fn(|cx| send.poll_capacity(cx))
            .await
            .ok_or_else(|| CopyError::Tunnel(h2::Error::from(h2::Reason::CANCEL)))?
            .map_err(CopyError::Tunnel)?;
        if granted == 0 {
            continue;
        }
        let part = data.split_to(granted.min(data.len()));
        send.send_data(part, false).map_err(CopyError::Tunnel)?;
    }
    Ok(())
}

/// Plain TCP to TCP (the plaintext inbound path and passthrough), counting as it goes like
/// the tunnel copy: `stats.sent` is `a` to `b`. Half-close is carried across; the first
/// error ends both, with a reset on both sides. Both sockets are armed to reset until both
/// directions ended cleanly, so the agent dying mid-copy resets them too.
pub async fn copy_tcp(
    a: &mut TcpStream,
    b: &mut TcpStream,
    stats: &CopyStats,
) -> std::io::Result<()> {
    super::reset_on_close(a);
    super::reset_on_close(b);
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
