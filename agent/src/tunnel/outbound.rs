//! Outbound: a captured connection becomes an HTTP/2 CONNECT stream to the destination
//! workload's HBONE address, over a pooled mTLS connection that presents the source
//! workload's certificate.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use futures::FutureExt as _;
use futures::future::Either;
use http::header::{HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri};
use prometheus_client::metrics::counter::Counter;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::{debug, warn};

use super::access_log::AddrText;
use super::copy::{CopyStats, copy_bidirectional};
use super::held_writes::HeldWrites;
use super::keepalive::Keepalive;
use super::metrics::Metrics;
use super::pool::{Driver, Pool, PoolKey, StreamLease};
use super::tls::{HandshakeFailure, client_config_for};
use super::{Dialer, TunnelConfig, TunnelError, dial_with_timeout};
use crate::identity::{CertManager, SpiffeId};

/// Everything the outbound side needs to know about one captured connection; decided
/// before any I/O (routing builds it, this module dials it).
#[derive(Clone, Debug)]
pub struct OutboundRequest {
    pub source: SpiffeId,
    /// The captured client's address, sent in `Forwarded`.
    pub source_addr: SocketAddr,
    /// Source workload's name, sent in `baggage`.
    pub source_workload: String,
    pub destination: SpiffeId,
    /// `<destination pod ip>:15008`.
    pub hbone_addr: SocketAddr,
    /// The address the client dialled: the CONNECT `:authority`.
    pub original_destination: SocketAddr,
}

impl OutboundRequest {
    /// The CONNECT request as other HBONE peers expect it (docs/HBONE.md).
    ///
    /// Built in place rather than through `Request::builder()`: the builder moves the whole
    /// request head through each step and parses the header names each time, and
    /// `format!` runs the general formatting machinery for what is a few concatenations
    /// (about 2 K instructions of every proxied connection together).
    fn to_http(&self) -> Result<Request<()>, http::Error> {
        let mut request = Request::new(());
        *request.method_mut() = Method::CONNECT;
        *request.uri_mut() = Uri::try_from(AddrText(self.original_destination).to_string())?;
        let namespace = self.source.namespace();
        let workload = &self.source_workload;
        let mut baggage = String::with_capacity(
            BAGGAGE_PARTS.iter().map(|p| p.len()).sum::<usize>()
                + namespace.len()
                + 2 * workload.len(),
        );
        for (part, value) in BAGGAGE_PARTS.iter().zip([namespace, workload, workload]) {
            baggage.push_str(part);
            baggage.push_str(value);
        }
        let headers = request.headers_mut();
        headers.reserve(2);
        headers.insert(
            FORWARDED,
            HeaderValue::try_from(forwarded_for(self.source_addr))?,
        );
        headers.insert(BAGGAGE, HeaderValue::try_from(baggage)?);
        Ok(request)
    }
}

/// Streams refused by a GOAWAY that are tried again on another connection: each try retires
/// the connection that refused it, so a peer with several connections draining at once
/// costs one try each, up to this many.
const MAX_GOAWAY_RETRIES: usize = 3;

const FORWARDED: HeaderName = HeaderName::from_static("forwarded");
const BAGGAGE: HeaderName = HeaderName::from_static("baggage");
/// `baggage`: each part is followed by the source's namespace, workload and workload.
const BAGGAGE_PARTS: [&str; 3] = [
    "k8s.namespace.name=",
    ",k8s.deployment.name=",
    ",service.name=",
];

/// RFC 7239 `for=` with the port: IPv6 addresses go in brackets and the value is quoted.
fn forwarded_for(addr: SocketAddr) -> String {
    use std::fmt::Write as _;
    // `for="` + the longest IPv6 socket address (47) + `"`.
    let mut value = String::with_capacity(54);
    value.push_str("for=\"");
    // Writing to a String cannot fail.
    let _ = write!(value, "{}", AddrText(addr));
    value.push('"');
    value
}

pub struct Outbound {
    certs: CertManager,
    dialer: Arc<dyn Dialer>,
    pool: Arc<Pool>,
    config: TunnelConfig,
    tls_configs: super::tls::ConfigCache<rustls::ClientConfig>,
    metrics: Option<Arc<Metrics>>,
    keepalive: Keepalive,
}

impl Outbound {
    pub fn new(certs: CertManager, dialer: Arc<dyn Dialer>, config: TunnelConfig) -> Self {
        Self {
            keepalive: config.keepalive(Counter::default()),
            pool: Pool::new(config.max_streams_per_connection, config.pool_idle_timeout),
            certs,
            dialer,
            config,
            tls_configs: super::tls::ConfigCache::default(),
            metrics: None,
        }
    }

    /// Records handshake failures in the agent's metrics (connections are recorded by the
    /// caller, which knows both workloads).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.tls_configs = super::tls::ConfigCache::with_chain_counters(metrics.verified_chains());
        self.keepalive = self.config.keepalive(metrics.keepalive_timeouts("client"));
        self.metrics = Some(metrics);
        self
    }

    /// How long a TCP connect may take (HBONE dials, and the agent's passthrough dials).
    pub fn connect_timeout(&self) -> std::time::Duration {
        self.config.connect_timeout
    }

    /// HBONE connections currently pooled.
    pub fn pooled_connections(&self) -> usize {
        self.pool.connection_count()
    }

    /// Tunnels `client` to the destination and copies until both sides are done. `client`
    /// must come armed to reset on close ([`super::reset_on_close`]; the outbound
    /// listener's options arm every socket it accepts, which saves a `setsockopt` per
    /// connection here): a setup that fails, a copy that fails or an agent that dies ends
    /// it with a reset, never a clean close.
    ///
    /// Not an `async fn`: its arguments would keep their space in the future for the whole
    /// connection. The request lives only in the boxed setup future, freed (with its
    /// strings and the handshake's state) before the copy starts, so an idle connection's
    /// task holds just the copy. Owns what it needs (`'static`), so a caller can build it
    /// before its own `async` block instead of keeping the arguments there too.
    pub fn proxy(
        self: &Arc<Self>,
        request: OutboundRequest,
        client: TcpStream,
        stats: CopyStats,
    ) -> impl Future<Output = Result<(), TunnelError>> + Send + 'static {
        let this = self.clone();
        let setup = Box::pin(async move { this.open_stream(&request).await });
        // `then` replaces the setup with the copy rather than nesting the two, and the copy
        // owns the client: nothing is kept twice while the connection idles.
        setup.then(move |stream| match stream {
            Ok((send, recv, lease)) => {
                Either::Left(
                    copy_bidirectional(client, send, recv, stats).map(move |copied| {
                        // The stream's slot in the pool frees only once the copy is done.
                        drop(lease);
                        copied.map_err(|e| match e {
                            super::copy::CopyError::Tcp(io) => TunnelError::Io(io),
                            super::copy::CopyError::Tunnel(h2) => TunnelError::H2(h2),
                        })
                    }),
                )
            }
            // The client's connect() already succeeded against the capture listener; its
            // reset (armed by the listener's options, closed with it here) is the closest it
            // can see to "refused" (e.g. a 401 from the peer).
            Err(e) => Either::Right(std::future::ready(Err(TunnelError::NotCarried(Box::new(
                e,
            ))))),
        })
    }

    /// Opens one CONNECT stream and waits for the peer's 200, all within the setup deadline
    /// (`connect_timeout` + `tls_handshake_timeout`): a peer that stalls the TLS or HTTP/2
    /// handshake or never answers the CONNECT cannot hold the client's connection open.
    /// Keep the lease until both stream halves are dropped: the connection gets a short
    /// grace to close once its last lease goes, then streams still on it break.
    pub async fn open_stream(
        &self,
        request: &OutboundRequest,
    ) -> Result<(h2::SendStream<Bytes>, h2::RecvStream, StreamLease), TunnelError> {
        let deadline = self.config.connect_timeout + self.config.tls_handshake_timeout;
        // Cancelling is safe: a pooled connect in progress holds only its key's
        // `connecting` guard and sockets, all released on drop.
        match tokio::time::timeout(deadline, self.open_stream_within_deadline(request)).await {
            Ok(result) => result,
            Err(_) => Err(TunnelError::SetupTimeout {
                addr: request.hbone_addr,
                after: deadline,
            }),
        }
    }

    async fn open_stream_within_deadline(
        &self,
        request: &OutboundRequest,
    ) -> Result<(h2::SendStream<Bytes>, h2::RecvStream, StreamLease), TunnelError> {
        let key = PoolKey {
            source: request.source.clone(),
            destination: request.destination.clone(),
            address: request.hbone_addr,
        };
        let mut goaway_retries = 0;
        let (response, send, lease) = loop {
            // The handshakes' state is boxed apart: inline, it would size every connection's
            // setup for it, though most streams find room on a pooled connection.
            let lease = if self.config.pooling {
                self.pool
                    .lease(&key, || Box::pin(self.connect(&key)))
                    .await?
            } else {
                let (send, driver) = Box::pin(self.connect(&key)).await?;
                StreamLease::unpooled(send, driver)
            };
            let opened = match lease.send_request().ready().await {
                Ok(mut sender) => match sender.send_request(request.to_http()?, false) {
                    Ok((response, send)) => response.await.map(|response| (response, send)),
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            };
            match opened {
                Ok((response, send)) => break (response, send, lease),
                // The peer sent GOAWAY on this connection: h2 refuses new streams on it, and
                // one sent just before the GOAWAY was not processed (RFC 9113 §6.8). Nothing
                // has been sent for the client yet, so it is tried again on another
                // connection; a peer that sends GOAWAY on several at once retires one per try.
                Err(e) if e.is_go_away() && e.is_remote() => {
                    lease.retire();
                    if goaway_retries == MAX_GOAWAY_RETRIES {
                        return Err(e.into());
                    }
                    goaway_retries += 1;
                    debug!(destination = %request.destination, error = %e, "HBONE connection refused the stream with GOAWAY; trying another");
                }
                Err(e) => return Err(e.into()),
            }
        };
        if response.status() != StatusCode::OK {
            debug!(status = %response.status(), destination = %request.destination, "CONNECT refused");
            return Err(TunnelError::Status(response.status()));
        }
        Ok((send, response.into_body(), lease))
    }

    /// TCP + TLS + HTTP/2 handshake to `key.address`, presenting the source's certificate and
    /// accepting only the expected destination identity.
    async fn connect(
        &self,
        key: &PoolKey,
    ) -> Result<(h2::client::SendRequest<Bytes>, Driver), TunnelError> {
        let cert = self.certs.get(&key.source).await?;
        let bundle = self.certs.trust_bundle();
        let (tls, _) = self.tls_configs.get_or_build(
            format!("{} -> {}", key.source, key.destination),
            &cert,
            &bundle,
            |anchors| client_config_for(&cert, anchors, &key.destination),
        )?;
        let tcp = dial_with_timeout(
            self.dialer.dial(key.address, None),
            key.address,
            self.config.connect_timeout,
        )
        .await?;
        // A handshake abandoned at the setup deadline or failed ends in a reset, not a close
        // that looks like an orderly end; lifted once TLS is up, so the connection's own
        // close (GOAWAY, then FIN) stays graceful. Past TLS, the client's HTTP/2 handshake
        // only queues its preface: nothing there waits on the peer.
        super::reset_on_close(&tcp);
        // No SNI is sent (HBONE peers select the certificate by local address); rustls still
        // wants a name, and the IP is the honest one.
        let name = ServerName::IpAddress(key.address.ip().into());
        // Holding from the start lets the last TLS flight leave with the HTTP/2 preface,
        // SETTINGS and the first CONNECT (see held_writes).
        let connecting = TlsConnector::from(tls).connect(name, HeldWrites::holding(tcp));
        let tls_stream = match connecting.into_fallible().await {
            Ok(mut s) => {
                super::fin_on_close(s.get_ref().0.get_ref());
                s.get_mut().0.hold_until_release();
                s
            }
            Err((e, mut tcp)) => {
                // The alert naming the reason, for the peer's own logs.
                tcp.release_without_waiting();
                let reason = handshake_failure(&e);
                if let Some(m) = &self.metrics {
                    m.handshake_failure(&reason);
                }
                warn!(peer = %key.address, expected = %key.destination, reason = %reason.label(), detail = %reason, "HBONE handshake failed");
                return Err(TunnelError::Handshake {
                    addr: key.address,
                    reason,
                });
            }
        };
        let (send, mut connection) = h2::client::Builder::new()
            .initial_window_size(self.config.stream_window)
            .initial_connection_window_size(self.config.connection_window)
            .max_frame_size(self.config.max_frame_size)
            .max_concurrent_reset_streams(1024)
            .handshake::<_, Bytes>(tls_stream)
            .await?;
        let ping_pong = connection.ping_pong();
        Ok((
            send,
            Driver::spawn(connection, ping_pong, self.keepalive.clone(), key.address),
        ))
    }
}

/// rustls reports verification errors through io::Error; find the TLS error inside.
pub(super) fn handshake_failure(err: &std::io::Error) -> HandshakeFailure {
    err.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .map(HandshakeFailure::from_tls_error)
        .unwrap_or_else(|| HandshakeFailure::Protocol(err.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connect_request_carries_the_target_forwarded_and_baggage_as_hbone_peers_expect() {
        let id = |sa: &str| SpiffeId::new("cluster.local", "shop", sa).expect("id");
        let mut request = OutboundRequest {
            source: id("client"),
            source_addr: "10.0.0.1:40000".parse().expect("addr"),
            source_workload: "client-v1".into(),
            destination: id("server"),
            hbone_addr: "10.0.0.2:15008".parse().expect("addr"),
            original_destination: "10.96.0.10:80".parse().expect("addr"),
        };
        let http = request.to_http().expect("request");
        assert_eq!(http.method(), Method::CONNECT);
        assert_eq!(http.uri().to_string(), "10.96.0.10:80");
        assert_eq!(
            http.uri().authority().map(|a| a.as_str()),
            Some("10.96.0.10:80")
        );
        let headers: Vec<(&str, &str)> = http
            .headers()
            .iter()
            .map(|(n, v)| (n.as_str(), v.to_str().expect("ascii")))
            .collect();
        assert_eq!(
            headers,
            [
                ("forwarded", "for=\"10.0.0.1:40000\""),
                (
                    "baggage",
                    "k8s.namespace.name=shop,k8s.deployment.name=client-v1,service.name=client-v1"
                ),
            ]
        );
        request.source_addr = "[fd00::1]:40000".parse().expect("addr");
        request.original_destination = "[fd00::2]:8080".parse().expect("addr");
        let http = request.to_http().expect("request");
        assert_eq!(http.uri().to_string(), "[fd00::2]:8080");
        assert_eq!(
            http.headers().get("forwarded").map(|v| v.as_bytes()),
            Some(&b"for=\"[fd00::1]:40000\""[..])
        );
    }
}
