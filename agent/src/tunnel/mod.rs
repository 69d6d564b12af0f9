//! HBONE: HTTP/2 CONNECT inside mutual TLS 1.3 on port 15008.
//!
//! [`Outbound`] turns a captured TCP connection into a CONNECT stream to the destination
//! workload's agent, over a pooled mTLS connection; [`Inbound`] terminates those streams,
//! asks the authorizer, and connects to the local workload. The wire contract is in
//! docs/HBONE.md.

mod accept;
mod access_log;
mod copy;
mod held_writes;
mod inbound;
mod keepalive;
mod metrics;
mod outbound;
mod pool;
mod shards;
mod tls;

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::net::{TcpSocket, TcpStream};

pub use accept::{AcceptBackoff, Listener, accept_loop};
pub use access_log::{ABSENT, AccessKind, AccessLog, WorkloadName, outcome};
pub use copy::{CopyStats, copy_tcp};
pub use inbound::{
    AllowAll, Authorizer, ConnectRefusal, ConnectRequest, Inbound, InboundConnection,
    LocalWorkload, LocalWorkloads, Verdict, check_connect_request,
};
pub use metrics::{
    ConnectionLabels, ConnectionRecord, ConnectionSeries, Metrics, RefusalReason, Reporter,
    SeriesCache, UNKNOWN, UPSTREAM_FAILURE, WorkloadMeta,
};
pub use outbound::{Outbound, OutboundRequest};
pub use shards::Shards;
pub use tls::{HandshakeFailure, client_config};

use crate::identity::IdentityError;
use keepalive::Keepalive;

/// HBONE's well-known port.
pub const HBONE_PORT: u16 = ambit_common::HBONE_PORT;

/// Tunables, defaulting to what other HBONE peers use (docs/HBONE.md).
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TunnelConfig {
    /// Streams on one pooled client connection before another is opened.
    pub max_streams_per_connection: usize,
    /// Concurrent streams a server connection accepts.
    pub server_max_streams: u32,
    /// The one idle pooled connection kept per destination (and data-path thread) closes
    /// after this long without a stream; other idle ones close at the pool's next reap
    /// (within 5 s).
    #[serde(serialize_with = "crate::observability::readable::duration")]
    pub pool_idle_timeout: Duration,
    /// Share HBONE connections between proxied connections. When false every proxied
    /// connection opens its own (TCP + TLS + HTTP/2 handshakes) and closes it at the end.
    pub pooling: bool,
    /// HTTP/2 flow-control windows.
    pub stream_window: u32,
    pub connection_window: u32,
    pub max_frame_size: u32,
    /// TCP connect timeout, both for HBONE connections and for the inbound upstream.
    #[serde(serialize_with = "crate::observability::readable::duration")]
    pub connect_timeout: Duration,
    /// Inbound: the TLS and HTTP/2 handshakes of a new HBONE connection must finish within
    /// this, or the connection is reset (a peer that never sends a ClientHello is dropped).
    /// Outbound: a new stream (dial, handshakes, the peer's CONNECT reply) must be open
    /// within `connect_timeout` + this, or the client's connection is reset.
    #[serde(serialize_with = "crate::observability::readable::duration")]
    pub tls_handshake_timeout: Duration,
    /// Inbound: an HBONE connection with no open stream for this long is closed (GOAWAY).
    /// Longer than the clients' `pool_idle_timeout`, so a client normally releases an idle
    /// connection itself before the server does and never races it with a new stream.
    #[serde(serialize_with = "crate::observability::readable::duration")]
    pub hbone_idle_timeout: Duration,
    /// Inbound: largest request header list (RFC 7540 size: names + values + 32 per field)
    /// accepted on a CONNECT; larger ones get 431.
    pub max_header_list_size: u32,
    /// Inbound: a new HBONE connection's HTTP/2 SETTINGS and SETTINGS ACK wait for its
    /// first answer to leave with it (`held_writes`), at most this long.
    #[serde(serialize_with = "crate::observability::readable::duration")]
    pub first_frames_hold: Duration,
    /// Both sides: an HTTP/2 PING on every HBONE connection this often...
    #[serde(serialize_with = "crate::observability::readable::duration")]
    pub keepalive_interval: Duration,
    /// ...answered within this, or the connection is dropped and its streams reset
    /// (`keepalive`).
    #[serde(serialize_with = "crate::observability::readable::duration")]
    pub keepalive_timeout: Duration,
}

impl TunnelConfig {
    /// The keepalive of this configuration, counting its timeouts in `timeouts`.
    fn keepalive(&self, timeouts: prometheus_client::metrics::counter::Counter) -> Keepalive {
        Keepalive {
            interval: self.keepalive_interval,
            timeout: self.keepalive_timeout,
            timeouts,
        }
    }
}

impl Default for TunnelConfig {
    fn default() -> Self {
        Self {
            max_streams_per_connection: 100,
            server_max_streams: 200,
            pool_idle_timeout: Duration::from_secs(300),
            pooling: true,
            stream_window: 4 * 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
            max_frame_size: 1024 * 1024,
            connect_timeout: Duration::from_secs(10),
            // ztunnel sets no explicit deadline on its TLS accept; 10 s matches the connect
            // timeout and is ample for a handshake between nodes.
            tls_handshake_timeout: Duration::from_secs(10),
            // Twice the pool's 5 minutes (ztunnel's and ours).
            hbone_idle_timeout: Duration::from_secs(600),
            // ztunnel's value (src/proxy/h2/server.rs): CONNECT headers are small and bounded.
            max_header_list_size: 64 * 1024,
            // No earlier than the shards' one-second timer tick, so arming it costs no
            // wake-up (shards::keep_timer_deadline_near); an upstream that never answers
            // its SYN is the only thing that makes a first answer take this long.
            first_frames_hold: Duration::from_secs(1),
            // ztunnel's values.
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(20),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("connect to {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("connect to {0}: timed out")]
    ConnectTimeout(SocketAddr),
    #[error(
        "HBONE setup with {addr} did not finish within {after:?} (TLS, HTTP/2 or the CONNECT reply)"
    )]
    SetupTimeout { addr: SocketAddr, after: Duration },
    #[error("TLS handshake with {addr} failed: {reason}")]
    Handshake {
        addr: SocketAddr,
        reason: HandshakeFailure,
    },
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
    #[error("peer answered CONNECT with {0}")]
    Status(http::StatusCode),
    #[error("certificate: {0}")]
    Identity(#[from] IdentityError),
    #[error("TLS configuration: {0}")]
    TlsConfig(#[from] rustls::Error),
    #[error("building request: {0}")]
    Request(#[from] http::Error),
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    #[error("revoked: a policy change denies this connection")]
    Revoked,
    /// The proxied connection ended before its stream was open: the tunnel never carried
    /// it (Envoy's `UF`, upstream failure), whatever the cause.
    #[error(transparent)]
    NotCarried(Box<TunnelError>),
}

/// Opens TCP connections; the agent's implementation opens them inside a pod's netns with
/// the agent's mark, tests use [`DirectDialer`].
pub trait Dialer: Send + Sync {
    /// Connects to `target`, from `source` when given (the original client address, kept
    /// visible to the application where the kernel allows it).
    fn dial(
        &self,
        target: SocketAddr,
        source: Option<SocketAddr>,
    ) -> BoxFuture<'_, io::Result<TcpStream>>;

    /// [`Dialer::dial`] toward an application: the socket comes armed to reset on close
    /// ([`reset_on_close`]). A dialer that creates sockets ahead arms them then, off the
    /// connection's path.
    fn dial_app(
        &self,
        target: SocketAddr,
        source: Option<SocketAddr>,
    ) -> BoxFuture<'_, io::Result<TcpStream>> {
        Box::pin(async move {
            let tcp = self.dial(target, source).await?;
            reset_on_close(&tcp);
            Ok(tcp)
        })
    }
}

/// Plain connections from the current network namespace.
#[derive(Debug, Default)]
pub struct DirectDialer;

impl Dialer for DirectDialer {
    fn dial(
        &self,
        target: SocketAddr,
        source: Option<SocketAddr>,
    ) -> BoxFuture<'_, io::Result<TcpStream>> {
        Box::pin(async move {
            let socket = match target {
                SocketAddr::V4(_) => TcpSocket::new_v4()?,
                SocketAddr::V6(_) => TcpSocket::new_v6()?,
            };
            socket.set_nodelay(true)?;
            connect_from(socket, target, source).await
        })
    }
}

/// Connects `socket` to `target`, first binding it to `source` (a client's address, not
/// ours: IP_TRANSPARENT) when given. Shared by every [`Dialer`].
pub async fn connect_from(
    socket: TcpSocket,
    target: SocketAddr,
    source: Option<SocketAddr>,
) -> io::Result<TcpStream> {
    if let Some(source) = source {
        prepare_for_client_source(&socket, source.port() == 0)?;
    }
    connect_prepared(socket, target, source).await
}

/// What binding a socket to a client's address needs: IP_TRANSPARENT, and for port 0
/// IP_BIND_ADDRESS_NO_PORT. A dialer that creates its sockets ahead sets it then, off the
/// connection's path, and connects them with [`connect_prepared`].
pub fn prepare_for_client_source(
    socket: &impl std::os::fd::AsFd,
    any_port: bool,
) -> io::Result<()> {
    crate::sys::set_ip_transparent(socket)?;
    if any_port {
        crate::sys::set_bind_address_no_port(socket)?;
    }
    Ok(())
}

/// [`connect_from`] for a socket already given [`prepare_for_client_source`] when `source`
/// is set.
pub async fn connect_prepared(
    socket: TcpSocket,
    target: SocketAddr,
    source: Option<SocketAddr>,
) -> io::Result<TcpStream> {
    if let Some(source) = source {
        socket.bind(source)?;
    }
    socket.connect(target).await
}

/// Makes the coming close of `tcp` a reset (RST) instead of an orderly FIN: the peer must
/// see a torn connection as torn. A zero linger never blocks on close.
///
/// Set on every socket toward an application as soon as it is accepted or connected (pod
/// sockets toward applications are armed when created: [`Dialer::dial_app`]), and
/// lifted by [`fin_on_close`] only once the proxied connection finished cleanly: the kernel
/// closes the sockets of a dying process with their linger setting, so an agent crash
/// resets the application's connections instead of ending them like a complete reply.
pub fn reset_on_close(tcp: &TcpStream) {
    if let Err(e) = socket2::SockRef::from(tcp).set_linger(Some(Duration::ZERO)) {
        tracing::debug!(error = %e, "arming a reset on close (SO_LINGER 0) failed");
    }
}

/// Undoes [`reset_on_close`]: the default close, FIN after whatever is still queued.
pub fn fin_on_close(tcp: &TcpStream) {
    if let Err(e) = socket2::SockRef::from(tcp).set_linger(None) {
        tracing::debug!(error = %e, "clearing SO_LINGER failed");
    }
}

/// `dial` (a [`Dialer`]'s connect to `target`), given up after `timeout`.
async fn dial_with_timeout(
    dial: BoxFuture<'_, io::Result<TcpStream>>,
    target: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream, TunnelError> {
    match tokio::time::timeout(timeout, dial).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(source)) => Err(TunnelError::Connect {
            addr: target,
            source,
        }),
        Err(_) => Err(TunnelError::ConnectTimeout(target)),
    }
}

#[cfg(test)]
mod tests;
