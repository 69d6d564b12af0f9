//! Inbound: terminates HBONE on :15008 (mTLS with the destination workload's certificate,
//! HTTP/2 CONNECT streams), asks the authorizer, and connects each stream to the local
//! workload. Also the plaintext path (:15006) for connections that arrive without HBONE.
//!
//! Each pod's listeners live in that pod's netns and serve that pod only
//! ([`Inbound::for_pod`]). Every refusal (400, 431, 503, a handshake that does not finish,
//! an idle connection closed, a protocol error) is logged once with the peer's identity
//! and counted in `ambit_hbone_refusals_total{reason}`.

use std::any::Any;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::Bytes;
use futures::FutureExt as _;
use futures::future::Either;
use h2::server::SendResponse;
use http::{Method, Request, Response, StatusCode};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use super::access_log::{ABSENT, AccessKind, AccessLog, WorkloadName};
use super::copy::{CopyStats, copy_bidirectional};
use super::held_writes::HeldWrites;
use super::metrics::{
    ConnectionLabels, ConnectionRecord, ConnectionSeries, Metrics, RefusalReason, Reporter,
    SeriesCache, WorkloadMeta,
};
use super::outbound::handshake_failure;
use super::tls::server_config_for;
use super::{Dialer, TunnelConfig, TunnelError, dial_with_timeout};
use crate::identity::{CertManager, SpiffeId};

/// A workload served by this agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalWorkload {
    pub name: String,
    pub namespace: String,
    pub identity: SpiffeId,
}

/// Which local workload owns an address; the HBONE certificate and the allowed CONNECT
/// targets both come from this.
pub trait LocalWorkloads: Send + Sync {
    fn by_ip(&self, ip: IpAddr) -> Option<LocalWorkload>;

    /// Metric labels of any mesh workload with this IP (local or not); `None` when unknown.
    fn describe(&self, _ip: IpAddr) -> Option<WorkloadMeta> {
        None
    }

    /// What [`Self::by_ip`] and [`Self::describe`] answer from, so an [`Inbound`] may keep
    /// the metric series it resolved for a peer: while the same object (the same
    /// allocation) is returned, both give the same answers. `None` (the default): nothing
    /// is kept, every connection describes its peers anew.
    fn describe_epoch(&self) -> Option<Arc<dyn Any + Send + Sync>> {
        None
    }
}

/// What the authorizer is asked about each inbound connection.
#[derive(Clone, Debug)]
pub struct InboundConnection {
    /// Verified peer identity; `None` for plaintext.
    pub source_identity: Option<SpiffeId>,
    pub source_addr: SocketAddr,
    pub destination: SocketAddr,
    pub workload: LocalWorkload,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny { reason: String },
}

/// The policy decision point (the policy module implements it).
pub trait Authorizer: Send + Sync {
    fn authorize(&self, conn: &InboundConnection) -> Verdict;

    /// The verdict plus, for the access log, the decision and the policy that made it.
    fn authorize_explained(&self, conn: &InboundConnection) -> (Verdict, String) {
        let verdict = self.authorize(conn);
        let text = match &verdict {
            Verdict::Allow => "ALLOW".to_owned(),
            Verdict::Deny { reason } => format!("DENY ({reason})"),
        };
        (verdict, text)
    }
}

/// Allows everything; the default until policies are configured.
#[derive(Debug, Default)]
pub struct AllowAll;

impl Authorizer for AllowAll {
    fn authorize(&self, _conn: &InboundConnection) -> Verdict {
        Verdict::Allow
    }
}

pub struct Inbound {
    certs: CertManager,
    workloads: Arc<dyn LocalWorkloads>,
    authorizer: Arc<dyn Authorizer>,
    dialer: Arc<dyn Dialer>,
    config: TunnelConfig,
    /// Connect to the workload from the client's own address (IP_TRANSPARENT) so the
    /// application sees its real peer; needs CAP_NET_ADMIN and the pod-side routing.
    preserve_source: bool,
    tls_configs: super::tls::ConfigCache<rustls::ServerConfig>,
    live: LiveConnections,
    metrics: Option<Arc<Metrics>>,
    keepalive: super::Keepalive,
    /// Turns true when the agent drains: HBONE connections get a GOAWAY.
    drain: Option<watch::Receiver<bool>>,
    /// The addresses of the one pod this Inbound serves; `None` serves every local workload
    /// (tests on loopback).
    own_ips: Option<Vec<IpAddr>>,
    /// Metric counters by peer: (source IP, source identity, destination IP, destination
    /// identity), what the labels are made from.
    series: SeriesCache<dyn Any + Send + Sync, PeerKey>,
    /// Where accepted connections run.
    shards: Arc<super::Shards>,
}

type PeerKey = (IpAddr, Option<SpiffeId>, IpAddr, SpiffeId);

/// A CONNECT stream that passed its checks and got its 200: what its copy phase needs.
struct AcceptedStream {
    upstream: TcpStream,
    send: h2::SendStream<Bytes>,
    recv: h2::RecvStream,
    conn: Arc<InboundConnection>,
    /// The authorizer's explanation, for the access log.
    authz: String,
    /// In the live set since before its authorization, so no policy change is missed.
    live: LiveGuard,
    revoked: Arc<Notify>,
}

/// Connections in flight, so a policy change can close the ones it no longer allows. The
/// lock is held only for one insert or remove (a connection starting or ending; after a
/// burst, now and then a shrink of what is left) or the
/// revoker's copy of the entries (pointer clones into a vector sized beforehand, once per
/// policy change): never across I/O, an await or a policy check. Status reads the count,
/// not the map.
#[derive(Default)]
struct LiveConnections {
    next_id: std::sync::atomic::AtomicU64,
    count: AtomicUsize,
    map: std::sync::Mutex<std::collections::HashMap<u64, LiveEntry>>,
}

/// A connection in flight and the signal that revokes it.
type LiveEntry = (Arc<InboundConnection>, Arc<Notify>);

/// Removes a connection from the live set however its task ends. Holds its `Inbound`, so
/// a connection's future can own it (`'static`) instead of borrowing.
struct LiveGuard {
    inbound: Arc<Inbound>,
    id: u64,
}

impl LiveGuard {
    fn register(inbound: &Arc<Inbound>, conn: &Arc<InboundConnection>) -> (Self, Arc<Notify>) {
        let live = &inbound.live;
        let id = live
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let revoke = Arc::new(Notify::new());
        if let Ok(mut map) = live.map.lock() {
            map.insert(id, (conn.clone(), revoke.clone()));
        }
        live.count.fetch_add(1, Ordering::Relaxed);
        let guard = Self {
            inbound: inbound.clone(),
            id,
        };
        (guard, revoke)
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        let live = &self.inbound.live;
        if let Ok(mut map) = live.map.lock() {
            map.remove(&self.id);
            // Give back what a burst grew, a few times on the way down (each a rehash of
            // what is left), rather than hold the peak's table for the agent's life.
            // Wide margins, so a count that swings does not rehash again and again.
            let left = map.len();
            if map.capacity() > 1024 && left * 8 < map.capacity() {
                map.shrink_to(left * 4);
            }
        }
        live.count.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Inbound {
    pub fn new(
        certs: CertManager,
        workloads: Arc<dyn LocalWorkloads>,
        authorizer: Arc<dyn Authorizer>,
        dialer: Arc<dyn Dialer>,
        config: TunnelConfig,
        preserve_source: bool,
    ) -> Self {
        Self {
            keepalive: config.keepalive(prometheus_client::metrics::counter::Counter::default()),
            certs,
            workloads,
            authorizer,
            dialer,
            config,
            preserve_source,
            tls_configs: super::tls::ConfigCache::default(),
            live: LiveConnections::default(),
            metrics: None,
            drain: None,
            own_ips: None,
            series: SeriesCache::default(),
            shards: Arc::new(super::Shards::inline()),
        }
    }

    /// Runs accepted connections on these shards (default: the caller's runtime).
    pub fn with_shards(mut self, shards: Arc<super::Shards>) -> Self {
        self.shards = shards;
        self
    }

    /// Serves only the pod with these addresses: its listeners live in its netns, so a
    /// connection or CONNECT for any other address (even another local pod) is refused
    /// with 400 rather than dialled from the wrong netns.
    pub fn for_pod(mut self, ips: Vec<IpAddr>) -> Self {
        self.own_ips = Some(ips);
        self
    }

    /// The workload this Inbound serves at `ip`, if any.
    fn own_workload(&self, ip: IpAddr) -> Option<LocalWorkload> {
        if let Some(own) = &self.own_ips
            && !own.contains(&ip)
        {
            return None;
        }
        self.workloads.by_ip(ip)
    }

    /// Logs a refusal once, with who asked, and counts it.
    fn refuse(
        &self,
        reason: RefusalReason,
        peer: SocketAddr,
        source: Option<&SpiffeId>,
        target: Option<SocketAddr>,
        detail: &dyn std::fmt::Display,
    ) {
        if let Some(m) = &self.metrics {
            m.refusal(reason);
        }
        warn!(
            %reason, %peer,
            source = %source.map_or_else(|| ABSENT.to_owned(), ToString::to_string),
            target = %target.map_or_else(|| ABSENT.to_owned(), |t| t.to_string()),
            %detail,
            "inbound refused"
        );
    }

    /// Records connections and handshake failures in the agent's metrics.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.tls_configs = super::tls::ConfigCache::with_chain_counters(metrics.verified_chains());
        self.keepalive = self.config.keepalive(metrics.keepalive_timeouts("server"));
        self.metrics = Some(metrics);
        self
    }

    /// Where this Inbound runs its accepted connections.
    pub fn shards(&self) -> &Arc<super::Shards> {
        &self.shards
    }

    /// Where accept loops count their errors (a throwaway counter without metrics).
    pub fn accept_errors(&self) -> prometheus_client::metrics::counter::Counter {
        self.metrics
            .as_ref()
            .map(|m| m.accept_errors())
            .unwrap_or_default()
    }

    /// Sends GOAWAY on every HBONE connection once `drain` turns true.
    pub fn with_drain(mut self, drain: watch::Receiver<bool>) -> Self {
        self.drain = Some(drain);
        self
    }

    /// Counts an accepted connection as opened (reporter: destination) and returns its
    /// record, whose drop counts the close, with the byte counters the copy loop feeds.
    /// mTLS is derived from the connection having a verified identity.
    fn open_record(
        &self,
        conn: &InboundConnection,
        source_addr: SocketAddr,
        destination: SocketAddr,
        tcp_is_source: bool,
    ) -> (Option<ConnectionRecord>, CopyStats) {
        let record = self.metrics.as_ref().map(|m| {
            let series = self.series(m, conn, source_addr.ip(), destination.ip());
            m.open_series(&series, tcp_is_source)
        });
        let stats = record
            .as_ref()
            .map_or_else(CopyStats::default, |r| r.stats().clone());
        (record, stats)
    }

    /// The metric counters of `conn`, resolved once per peer while the workloads' epoch
    /// stays: a connection then neither describes both ends (a dozen label strings) nor
    /// hashes the labels again.
    fn series(
        &self,
        metrics: &Metrics,
        conn: &InboundConnection,
        source_ip: IpAddr,
        destination_ip: IpAddr,
    ) -> ConnectionSeries {
        let build = || {
            metrics.series_of(ConnectionLabels::new(
                Reporter::Destination,
                self.meta(source_ip, conn.source_identity.as_ref()),
                self.meta(destination_ip, Some(&conn.workload.identity)),
                None,
                conn.source_identity.is_some(),
            ))
        };
        let Some(epoch) = self.workloads.describe_epoch() else {
            return build();
        };
        let key = (
            source_ip,
            conn.source_identity.clone(),
            destination_ip,
            conn.workload.identity.clone(),
        );
        self.series.get_or_build(&epoch, key, build)
    }

    fn meta(&self, ip: IpAddr, identity: Option<&SpiffeId>) -> WorkloadMeta {
        let mut meta = self
            .workloads
            .describe(ip)
            .unwrap_or_else(WorkloadMeta::unknown);
        // The verified certificate, not the address, says who the peer is.
        match identity {
            Some(id) => {
                meta.principal = id.to_string();
                id.namespace().clone_into(&mut meta.namespace);
            }
            None => meta.principal = super::metrics::UNKNOWN.into(),
        }
        meta
    }

    /// Accepts HBONE connections until the task is aborted; accept errors are retried. The
    /// listener should have TCP_NODELAY set before connections can reach it: its accepted
    /// sockets inherit it (`app/pod.rs` sets it when it opens the pod's listener).
    pub async fn serve(self: Arc<Self>, listener: super::Listener) -> std::io::Result<()> {
        super::accept_loop(
            &listener,
            "HBONE :15008",
            super::AcceptBackoff::default(),
            self.accept_errors(),
            std::future::pending(),
            |tcp, peer| {
                let this = self.clone();
                self.shards.spawn_connection(tcp, move |tcp| async move {
                    if let Err(e) = this.handle_hbone(tcp, peer).await {
                        debug!(%peer, error = %e, "HBONE connection ended with an error");
                    }
                });
            },
        )
        .await;
        Ok(())
    }

    /// One HBONE connection from `peer` (as accept returned it: no getpeername): TLS as the
    /// workload that owns the local address, then every CONNECT stream on it.
    pub async fn handle_hbone(
        self: &Arc<Self>,
        mut tcp: TcpStream,
        peer: SocketAddr,
    ) -> Result<(), TunnelError> {
        let local = tcp.local_addr()?;
        let Some(workload) = self.own_workload(local.ip()) else {
            super::reset_on_close(&tcp);
            self.refuse(
                RefusalReason::NotLocalPod,
                peer,
                None,
                Some(local),
                &"HBONE connection to an address this pod does not own",
            );
            return Ok(());
        };
        // Set by the first stream task to answer: the connection's first frames wait
        // for that answer to leave with it (see held_writes).
        let answered = Arc::new(AtomicBool::new(false));
        // The handshakes and the connection borrow the socket, which stays here: a handshake
        // abandoned at the deadline can still be made to end in a reset.
        // Boxed: the handshakes' state is large and only lives during setup; inline it would
        // size every connection's task for it while the connection idles.
        let Ok(established) = tokio::time::timeout(
            self.config.tls_handshake_timeout,
            Box::pin(self.establish(&mut tcp, &workload, peer, answered.clone())),
        )
        .await
        else {
            // The abandoned handshake no longer holds the socket: with a zero linger its
            // close (when this returns) is the reset.
            super::reset_on_close(&tcp);
            self.refuse(
                RefusalReason::HandshakeTimeout,
                peer,
                None,
                Some(local),
                &format_args!(
                    "TLS and HTTP/2 handshakes not finished within {:?}",
                    self.config.tls_handshake_timeout
                ),
            );
            return Ok(());
        };
        // Moved whole out of `established` (by a method call), so no part of it stays to
        // borrow the socket until the end: a silent peer's connection, once dropped, leaves
        // the socket to be reset below.
        let (mut connection, source_identity) = match established.map_err(Some) {
            Ok(established) => established,
            failed => {
                // Consumed whole, so nothing of it borrows the socket any more.
                let error = failed.err().flatten();
                // Not finished (refused, or the TLS alert already written): a reset, never
                // a clean close.
                super::reset_on_close(&tcp);
                return error.map_or(Ok(()), Err);
            }
        };
        let streams = Arc::new(StreamCount::default());
        let idle = tokio::time::sleep(self.config.hbone_idle_timeout);
        tokio::pin!(idle);
        let drain = drain_signal(self.drain.clone());
        tokio::pin!(drain);
        let ping_pong = connection.ping_pong();
        let silent = self.keepalive.expire(ping_pong);
        tokio::pin!(silent);
        let mut closing = false;
        let mut peer_silent = false;
        loop {
            let stream = tokio::select! {
                // The connection first: after a stall (a paused VM, a busy shard) a PONG
                // already in the socket must be read before the keepalive can expire.
                biased;
                stream = connection.accept() => stream,
                unanswered_for = &mut silent => {
                    warn!(%peer, source = %source_identity, ?unanswered_for, "HBONE peer left a keepalive PING unanswered; connection dropped, its streams reset");
                    peer_silent = true;
                    break;
                }
                () = &mut drain, if !closing => {
                    // GOAWAY: the peer opens no new streams here; those in flight finish.
                    connection.graceful_shutdown();
                    closing = true;
                    continue;
                }
                () = streams.idle.notified() => {
                    // The last stream ended: the idle period starts now.
                    idle.as_mut().reset(tokio::time::Instant::now() + self.config.hbone_idle_timeout);
                    continue;
                }
                () = &mut idle, if !closing && streams.active() == 0 => {
                    self.refuse(
                        RefusalReason::IdleTimeout,
                        peer,
                        Some(&source_identity),
                        None,
                        &format_args!("no stream for {:?}", self.config.hbone_idle_timeout),
                    );
                    // No stream to finish: GOAWAY and close at once.
                    connection.abrupt_shutdown(h2::Reason::NO_ERROR);
                    closing = true;
                    continue;
                }
            };
            let Some(stream) = stream else { break };
            let (request, respond) = match stream {
                Ok(stream) => stream,
                Err(e) => {
                    self.refuse_h2_error(&e, peer, &source_identity);
                    return Err(e.into());
                }
            };
            let active = StreamGuard::new(streams.clone());
            tokio::spawn(self.stream_task(
                request,
                respond,
                source_identity.clone(),
                peer,
                active,
                answered.clone(),
            ));
        }
        if peer_silent {
            // Dropping the connection fails its streams: their copies reset the workloads'
            // connections. Nothing more is written to a silent peer.
            drop(connection);
            super::reset_on_close(&tcp);
        }
        Ok(())
    }

    /// Counts a connection-level HTTP/2 error this side raised (h2 has sent the GOAWAY); a
    /// peer that closed, reset or GOAWAYed the connection itself is not a refusal.
    fn refuse_h2_error(&self, e: &h2::Error, peer: SocketAddr, source: &SpiffeId) {
        if !(e.is_io() || e.is_remote()) {
            self.refuse(RefusalReason::ProtocolError, peer, Some(source), None, e);
        }
    }

    /// TLS as `workload`, the client's verified identity, then the HTTP/2 handshake; the
    /// caller bounds it all with the handshake deadline.
    async fn establish<'tcp>(
        &self,
        tcp: &'tcp mut TcpStream,
        workload: &LocalWorkload,
        peer: SocketAddr,
        answered: Arc<AtomicBool>,
    ) -> Result<(h2::server::Connection<HboneTls<'tcp>, Bytes>, SpiffeId), TunnelError> {
        let prepared = match self.certs.get(&workload.identity).await {
            Ok(cert) => self.tls_configs.get_or_build(
                workload.identity.to_string(),
                &cert,
                &self.certs.trust_bundle(),
                |anchors| server_config_for(&cert, anchors, workload.identity.trust_domain()),
            ),
            Err(e) => Err(e.into()),
        };
        let (tls, anchors) = match prepared {
            Ok(prepared) => prepared,
            Err(e) => {
                self.refuse(RefusalReason::NoCertificate, peer, None, None, &e);
                return Err(e);
            }
        };
        // The server's one TLS flight leaves at once; its HTTP/2 SETTINGS and SETTINGS ACK
        // then wait to leave with its answer to the first CONNECT (see held_writes).
        let tls_stream = match TlsAcceptor::from(tls)
            .accept(HeldWrites::passing(tcp))
            .await
        {
            Ok(mut s) => {
                // Bounded by half the idle timeout too: a connection that never opens a
                // stream gets its SETTINGS well before its GOAWAY, so the client's ACK of
                // them does not meet a closed socket.
                let hold = self
                    .config
                    .first_frames_hold
                    .min(self.config.hbone_idle_timeout / 2);
                s.get_mut().0.hold_until_answered(answered, hold);
                s
            }
            Err(e) => {
                let reason = handshake_failure(&e);
                if let Some(m) = &self.metrics {
                    m.handshake_failure(&reason);
                }
                warn!(%peer, workload = %workload.identity, reason = %reason.label(), detail = %reason, "inbound HBONE handshake failed");
                return Err(TunnelError::Handshake { addr: peer, reason });
            }
        };
        // What the verifier recorded for this chain rather than a second parse of it.
        let Some(source_identity) =
            anchors.verified_client_identity(tls_stream.get_ref().1.peer_certificates())
        else {
            // The verifier already insisted on a SPIFFE ID; this is unreachable in practice,
            // and still counted and logged like any other handshake failure.
            let reason = super::HandshakeFailure::NoSpiffeId;
            if let Some(m) = &self.metrics {
                m.handshake_failure(&reason);
            }
            warn!(%peer, workload = %workload.identity, reason = %reason.label(), detail = %reason, "inbound HBONE handshake failed");
            return Err(TunnelError::Handshake { addr: peer, reason });
        };
        let connection = h2::server::Builder::new()
            .initial_window_size(self.config.stream_window)
            .initial_connection_window_size(self.config.connection_window)
            .max_frame_size(self.config.max_frame_size)
            .max_concurrent_streams(self.config.server_max_streams)
            // h2's own bound (it answers 431 itself, unseen by us, above it); the configured
            // limit is enforced per stream below it, where the refusal can be logged.
            .max_header_list_size(
                self.config
                    .max_header_list_size
                    .saturating_mul(HEADER_HARD_LIMIT_FACTOR),
            )
            .handshake::<_, Bytes>(tls_stream)
            .await;
        match connection {
            Ok(connection) => Ok((connection, source_identity)),
            Err(e) => {
                self.refuse_h2_error(&e, peer, &source_identity);
                Err(e.into())
            }
        }
    }

    /// Everything before the copy: the request's checks, the authorizer, the upstream
    /// connect and the 200. `None` when the stream was refused (and answered).
    async fn setup_stream(
        self: Arc<Self>,
        request: Request<h2::RecvStream>,
        mut respond: SendResponse<Bytes>,
        source_identity: SpiffeId,
        peer: SocketAddr,
    ) -> Result<Option<AcceptedStream>, TunnelError> {
        let ConnectRequest { target, forwarded } =
            match check_connect_request(&request, self.config.max_header_list_size) {
                Ok(checked) => checked,
                Err(refusal) => {
                    self.refuse(
                        refusal.reason,
                        peer,
                        Some(&source_identity),
                        None,
                        &refusal.detail,
                    );
                    return reply(&mut respond, refusal.status).map(|()| None);
                }
            };
        let Some(workload) = self.own_workload(target.ip()) else {
            self.refuse(
                RefusalReason::NotLocalPod,
                peer,
                Some(&source_identity),
                Some(target),
                &"CONNECT to an address this pod does not own",
            );
            return reply(&mut respond, StatusCode::BAD_REQUEST).map(|()| None);
        };
        // Agents dial from inside the source pod, so the TCP peer IP is the client's real,
        // routable address; `Forwarded` adds the client's port. A `Forwarded` IP that
        // disagrees with the network is not believed (policy on source IPs depends on it).
        let source_addr = forwarded.filter(|f| f.ip() == peer.ip()).unwrap_or(peer);
        // Shared with the live-connection set rather than copied into it.
        let conn = Arc::new(InboundConnection {
            source_identity: Some(source_identity),
            source_addr,
            destination: target,
            workload,
        });
        // Registered before the policy check: a policy change from here on (during the
        // upstream dial too) re-checks this stream, and one before it is what the check sees.
        let (live, revoked) = LiveGuard::register(&self, &conn);
        let (verdict, authz) = self.authorizer.authorize_explained(&conn);
        if let Verdict::Deny { .. } = verdict {
            self.log_denied(&conn, &authz);
            return reply(&mut respond, StatusCode::UNAUTHORIZED).map(|()| None);
        }
        // Port 0: the steered socket already holds the client's exact address toward the
        // original destination, so the upstream may reuse the client's IP but not its port.
        let source = self
            .preserve_source
            .then_some(SocketAddr::new(source_addr.ip(), 0));
        // Armed to reset, not FIN, unless the copy below finishes cleanly.
        let dial = dial_with_timeout(
            self.dialer.dial_app(target, source),
            target,
            self.config.connect_timeout,
        );
        let dialled = tokio::select! {
            biased;
            // `revoke_denied` logged the revocation.
            () = revoked.notified() => {
                return reply(&mut respond, StatusCode::UNAUTHORIZED).map(|()| None);
            }
            dialled = dial => dialled,
        };
        let upstream = match dialled {
            Ok(s) => s,
            Err(e) => {
                self.refuse(
                    RefusalReason::UpstreamFailed,
                    peer,
                    conn.source_identity.as_ref(),
                    Some(target),
                    &e,
                );
                return reply(&mut respond, StatusCode::SERVICE_UNAVAILABLE).map(|()| None);
            }
        };
        let send =
            respond.send_response(Response::builder().status(StatusCode::OK).body(())?, false)?;
        Ok(Some(AcceptedStream {
            upstream,
            send,
            recv: request.into_body(),
            conn,
            authz,
            live,
            revoked,
        }))
    }

    /// One CONNECT stream, from its request to its access-log line.
    ///
    /// Not an `async fn`: its arguments (the request's headers, the identity) would keep
    /// their space in the task for the whole connection. The setup runs in its own boxed
    /// future, freed before the copy starts; `then` replaces it with the copy phase rather
    /// than nesting the two, so an idle stream's task holds just the copy and what its
    /// access log needs. A policy change revokes it during the copy.
    fn stream_task(
        self: &Arc<Self>,
        request: Request<h2::RecvStream>,
        respond: SendResponse<Bytes>,
        source_identity: SpiffeId,
        peer: SocketAddr,
        active: StreamGuard,
        answered: Arc<AtomicBool>,
    ) -> impl Future<Output = ()> + Send + 'static {
        let setup = Box::pin(
            self.clone()
                .setup_stream(request, respond, source_identity, peer),
        );
        let this = self.clone();
        setup.then(move |setup| {
            // The stream is answered (200, a refusal, or a reset when its responder was
            // dropped): the connection's held first frames may leave with that answer.
            // Later streams set it again; nothing reads it once the frames are gone.
            answered.store(true, Ordering::Relaxed);
            match setup {
                Ok(Some(accepted)) => Either::Left(this.copy_stream(accepted, peer, active)),
                Ok(None) => {
                    drop(active);
                    Either::Right(std::future::ready(()))
                }
                Err(e) => {
                    debug!(%peer, error = %e, "HBONE stream ended with an error");
                    drop(active);
                    Either::Right(std::future::ready(()))
                }
            }
        })
    }

    /// The copy phase of a stream that got its 200, then its access-log line.
    ///
    /// Not an `async fn`, and the copy is built here and awaited by `&mut`: moving the
    /// stream's parts into a future the `async` block builds would store them twice.
    fn copy_stream(
        self: &Arc<Self>,
        accepted: AcceptedStream,
        peer: SocketAddr,
        active: StreamGuard,
    ) -> impl Future<Output = ()> + Send + use<> {
        let AcceptedStream {
            upstream,
            send,
            recv,
            conn,
            authz,
            live,
            revoked,
        } = accepted;
        // The TCP side of this copy is the workload, not the client.
        let (record, stats) = self.open_record(&conn, conn.source_addr, conn.destination, false);
        let started = std::time::Instant::now();
        let mut copy = copy_bidirectional(upstream, send, recv, stats.clone());
        async move {
            let result = tokio::select! {
                // A revocation that came after the 200 wins before any byte is copied.
                biased;
                () = revoked.notified() => {
                    // The workload side is reset here; dropping the copy below resets the
                    // stream (RST_STREAM), which the client's agent turns into a TCP reset.
                    super::reset_on_close(copy.tcp());
                    Err(TunnelError::Revoked)
                }
                copied = &mut copy => {
                    copied.map_err(|e| match e {
                        super::copy::CopyError::Tcp(io) => TunnelError::Io(io),
                        super::copy::CopyError::Tunnel(h2) => TunnelError::H2(h2),
                    })
                }
            };
            drop(copy);
            live.inbound.access_log(
                AccessKind::Inbound,
                &conn,
                &authz,
                &stats,
                started,
                &super::outcome(&result),
            );
            drop(record);
            drop(live);
            if let Err(e) = result {
                debug!(%peer, error = %e, "HBONE stream ended with an error");
            }
            drop(active);
        }
    }

    /// The access-log line of a finished inbound connection (the copy's TCP side is the
    /// workload: what it sent went to the client).
    fn access_log(
        &self,
        kind: AccessKind,
        conn: &InboundConnection,
        authz: &str,
        stats: &CopyStats,
        started: std::time::Instant,
        result: &str,
    ) {
        let source_meta = self.workloads.describe(conn.source_addr.ip());
        let (bytes_from_client, bytes_to_client) = match kind {
            AccessKind::InboundPlaintext => (stats.sent(), stats.received()),
            _ => (stats.received(), stats.sent()),
        };
        AccessLog {
            kind,
            source: conn.source_identity.as_ref(),
            source_workload: source_meta.as_ref().map(|m| WorkloadName {
                namespace: &m.namespace,
                name: &m.workload,
            }),
            source_addr: conn.source_addr,
            destination: Some(&conn.workload.identity),
            destination_workload: Some(WorkloadName {
                namespace: &conn.workload.namespace,
                name: &conn.workload.name,
            }),
            original_destination: conn.destination,
            target: conn.destination,
            security: if conn.source_identity.is_some() {
                "mutual_tls"
            } else {
                "none"
            },
            authz,
            bytes_from_client,
            bytes_to_client,
            duration: started.elapsed(),
            result,
        }
        .emit();
    }

    /// The one line a policy denial leaves on this side (401 on HBONE, a reset on 15006).
    fn log_denied(&self, conn: &InboundConnection, authz: &str) {
        info!(
            source = %conn.source_identity.as_ref().map_or_else(|| ABSENT.to_owned(), ToString::to_string),
            source_addr = %conn.source_addr,
            destination = %conn.workload.identity,
            destination_workload = %format_args!("{}/{}", conn.workload.namespace, conn.workload.name),
            target = %conn.destination,
            security = if conn.source_identity.is_some() { "mutual_tls" } else { "none" },
            %authz,
            "inbound connection denied"
        );
    }

    /// The plaintext path (:15006): no identity. `source_addr` is the client's address as
    /// accept returned it; `destination` the address the client dialled (under sk_lookup,
    /// the accepted socket's local address).
    pub async fn handle_plaintext(
        self: &Arc<Self>,
        mut client: TcpStream,
        source_addr: SocketAddr,
        destination: SocketAddr,
    ) -> Result<(), TunnelError> {
        let Some(workload) = self.own_workload(destination.ip()) else {
            super::reset_on_close(&client);
            self.refuse(
                RefusalReason::NotLocalPod,
                source_addr,
                None,
                Some(destination),
                &"plaintext connection to an address this pod does not own",
            );
            return Ok(());
        };
        let conn = Arc::new(InboundConnection {
            source_identity: None,
            source_addr,
            destination,
            workload,
        });
        // Registered before the policy check, as for HBONE streams.
        let (_live, revoked) = LiveGuard::register(self, &conn);
        let (verdict, authz) = self.authorizer.authorize_explained(&conn);
        if let Verdict::Deny { .. } = verdict {
            self.log_denied(&conn, &authz);
            // Reset rather than close: the client must not mistake a denial for an empty reply.
            super::reset_on_close(&client);
            return Ok(());
        }
        // Port 0: the steered socket already holds the client's exact address toward the
        // original destination, so the upstream may reuse the client's IP but not its port.
        let source = self
            .preserve_source
            .then_some(SocketAddr::new(source_addr.ip(), 0));
        // Armed to reset, not FIN, unless the copy finishes cleanly.
        let dial = dial_with_timeout(
            self.dialer.dial_app(destination, source),
            destination,
            self.config.connect_timeout,
        );
        let dialled = tokio::select! {
            biased;
            // `revoke_denied` logged the revocation.
            () = revoked.notified() => {
                super::reset_on_close(&client);
                return Ok(());
            }
            dialled = dial => dialled,
        };
        let mut upstream = match dialled {
            Ok(s) => s,
            Err(e) => {
                // The client's connect already succeeded against the agent: a reset is the
                // closest it can see to "refused".
                super::reset_on_close(&client);
                self.refuse(
                    RefusalReason::UpstreamFailed,
                    source_addr,
                    None,
                    Some(destination),
                    &e,
                );
                return Err(e);
            }
        };
        let (_record, stats) = self.open_record(&conn, source_addr, destination, true);
        let started = std::time::Instant::now();
        // The client is the TCP side here: what it sends is the request.
        let result = tokio::select! {
            biased;
            () = revoked.notified() => {
                super::reset_on_close(&client);
                super::reset_on_close(&upstream);
                info!(%source_addr, destination = %conn.workload.identity, "plaintext connection revoked");
                Err(std::io::Error::other("revoked: a policy change denies this connection"))
            }
            copied = super::copy::copy_tcp(&mut client, &mut upstream, &stats) => copied,
        };
        self.access_log(
            AccessKind::InboundPlaintext,
            &conn,
            &authz,
            &stats,
            started,
            &super::outcome(&result),
        );
        result?;
        Ok(())
    }

    /// Asks the authorizer again about every connection in flight and closes (resets) the
    /// ones it now denies. Returns how many were revoked.
    pub fn revoke_denied(&self) -> usize {
        // A snapshot, so the authorizer and the log run without the lock that every
        // connection takes to register and to leave: a policy change with many connections
        // in flight never holds up an accept or a close. A connection gone since the
        // snapshot gets a permit nobody waits for.
        let mut live: Vec<LiveEntry> =
            Vec::with_capacity(self.live.count.load(Ordering::Relaxed) + 64);
        match self.live.map.lock() {
            Ok(map) => live.extend(map.values().cloned()),
            Err(_) => return 0,
        }
        let mut revoked = 0;
        for (conn, revoke) in &live {
            if let Verdict::Deny { reason } = self.authorizer.authorize(conn) {
                info!(
                    source = %conn.source_identity.as_ref().map_or_else(|| "<plaintext>".into(), ToString::to_string),
                    destination = %conn.workload.identity, %reason,
                    "revoking a live connection the new policy denies"
                );
                // notify_one keeps a permit if the task is not waiting yet, so none is lost.
                revoke.notify_one();
                revoked += 1;
            }
        }
        revoked
    }

    /// Connections to local workloads past their request checks: authorizing, dialling
    /// or copying.
    pub fn live_connections(&self) -> usize {
        self.live.count.load(Ordering::Relaxed)
    }
}

/// What a well-formed HBONE CONNECT request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectRequest {
    /// The `:authority`: the workload address to connect to.
    pub target: SocketAddr,
    /// The client's address from a `Forwarded: for=` header, not yet checked against the
    /// network peer.
    pub forwarded: Option<SocketAddr>,
}

/// Why a CONNECT request is refused before any workload lookup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectRefusal {
    pub reason: RefusalReason,
    pub status: StatusCode,
    pub detail: String,
}

/// The checks an inbound HBONE stream's request head must pass, in order: header-list size
/// (431), method CONNECT (400), `:authority` an `ip:port` (400) on any port but 15008
/// (400). Pure, so it can be fuzzed without a connection.
pub fn check_connect_request<B>(
    request: &Request<B>,
    max_header_list_size: u32,
) -> Result<ConnectRequest, ConnectRefusal> {
    let size = header_list_size(request);
    if size > max_header_list_size as usize {
        return Err(ConnectRefusal {
            reason: RefusalReason::HeaderTooLarge,
            status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            detail: format!("request headers of {size} bytes, limit {max_header_list_size}"),
        });
    }
    if request.method() != Method::CONNECT {
        return Err(ConnectRefusal {
            reason: RefusalReason::BadMethod,
            status: StatusCode::BAD_REQUEST,
            detail: format!("method {}", request.method()),
        });
    }
    let Some(target) = request
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
    else {
        return Err(ConnectRefusal {
            reason: RefusalReason::BadAuthority,
            status: StatusCode::BAD_REQUEST,
            detail: format!("authority {:?} is not ip:port", request.uri().to_string()),
        });
    };
    // A pod's 15008 belongs to the mesh (sk_lookup hands connections to it to the agent):
    // a CONNECT there would loop back into the agent or reach an app on the mesh's port.
    // The pod-interface tc program relies on this: a packet from local port 15008 is the
    // agent's, never an app's reply, so it skips the socket lookup.
    if target.port() == super::HBONE_PORT {
        return Err(ConnectRefusal {
            reason: RefusalReason::BadAuthority,
            status: StatusCode::BAD_REQUEST,
            detail: format!(
                "authority {target} is the mesh's own port {}",
                super::HBONE_PORT
            ),
        });
    }
    Ok(ConnectRequest {
        target,
        forwarded: forwarded_source(request),
    })
}

/// The TLS stream an HBONE server connection runs on.
type HboneTls<'tcp> = tokio_rustls::server::TlsStream<HeldWrites<&'tcp mut TcpStream>>;

/// h2's hard header-list bound is this multiple of the configured limit: between the two,
/// the stream reaches us and its 431 is logged and counted.
const HEADER_HARD_LIMIT_FACTOR: u32 = 4;

/// Streams open on one HBONE connection; `idle` fires when the count drops to zero.
#[derive(Default)]
struct StreamCount {
    active: AtomicUsize,
    idle: Notify,
}

impl StreamCount {
    fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }
}

/// One open stream, counted until its task ends however it ends.
struct StreamGuard(Arc<StreamCount>);

impl StreamGuard {
    fn new(count: Arc<StreamCount>) -> Self {
        count.active.fetch_add(1, Ordering::AcqRel);
        Self(count)
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            // notify_one keeps a permit if the connection loop is busy, so none is lost.
            self.0.idle.notify_one();
        }
    }
}

/// RFC 7540 §6.5.2 size of a request's header list, pseudo-headers included: what
/// SETTINGS_MAX_HEADER_LIST_SIZE limits.
fn header_list_size<B>(request: &Request<B>) -> usize {
    const PER_FIELD: usize = 32;
    let pseudo = [
        (":method".len(), request.method().as_str().len()),
        (
            ":authority".len(),
            request.uri().authority().map_or(0, |a| a.as_str().len()),
        ),
        (
            ":path".len(),
            request
                .uri()
                .path_and_query()
                .map_or(0, |p| p.as_str().len()),
        ),
        (
            ":scheme".len(),
            request.uri().scheme_str().map_or(0, str::len),
        ),
    ];
    let pseudo: usize = pseudo
        .iter()
        .filter(|(_, v)| *v > 0)
        .map(|(n, v)| n + v + PER_FIELD)
        .sum();
    let fields: usize = request
        .headers()
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + PER_FIELD)
        .sum();
    pseudo + fields
}

/// Resolves when `drain` turns true; never when there is none or its sender is gone.
async fn drain_signal(drain: Option<watch::Receiver<bool>>) {
    if let Some(mut rx) = drain
        && rx.wait_for(|d| *d).await.is_ok()
    {
        return;
    }
    std::future::pending::<()>().await;
}

fn reply(respond: &mut SendResponse<Bytes>, status: StatusCode) -> Result<(), TunnelError> {
    respond.send_response(Response::builder().status(status).body(())?, true)?;
    Ok(())
}

/// `Forwarded: for="<ip>:<port>"` (or `for="[v6]:port"`), as HBONE peers send it.
fn forwarded_source<B>(request: &Request<B>) -> Option<SocketAddr> {
    let value = request.headers().get("forwarded")?.to_str().ok()?;
    value.split(';').find_map(|part| {
        let v = part.trim().strip_prefix("for=")?;
        v.trim_matches('"').parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::identity::LocalCa;

    /// Describes every IP with the current `app`; `epoch` is replaced when the test says
    /// the description changed.
    struct Described(Mutex<(Arc<dyn Any + Send + Sync>, &'static str)>);

    impl Described {
        fn set(&self, app: &'static str, new_epoch: bool) {
            let mut state = self.0.lock().expect("lock");
            if new_epoch {
                state.0 = Arc::new(());
            }
            state.1 = app;
        }
    }

    impl LocalWorkloads for Described {
        fn by_ip(&self, _ip: IpAddr) -> Option<LocalWorkload> {
            None
        }

        fn describe(&self, _ip: IpAddr) -> Option<WorkloadMeta> {
            let app = self.0.lock().expect("lock").1;
            Some(WorkloadMeta {
                workload: "w".into(),
                namespace: "ns".into(),
                principal: "p".into(),
                app: app.into(),
                version: "v".into(),
            })
        }

        fn describe_epoch(&self) -> Option<Arc<dyn Any + Send + Sync>> {
            Some(self.0.lock().expect("lock").0.clone())
        }
    }

    /// `istio_tcp_connections_opened_total` of the series whose source app is `app`.
    fn opened(registry: &prometheus_client::registry::Registry, app: &str) -> u64 {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).expect("encode");
        let label = format!("source_app=\"{app}\"");
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("istio_tcp_connections_opened_total{") && l.contains(&label))
            .collect();
        match lines.as_slice() {
            [] => 0,
            [line] => line
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse().ok())
                .expect("counter value"),
            more => panic!("{} series with {label}: {text}", more.len()),
        }
    }

    #[test]
    fn metric_series_are_kept_per_peer_until_the_workloads_epoch_changes() {
        let ca = Arc::new(LocalCa::generate().expect("CA"));
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Arc::new(Metrics::new(&mut registry));
        let workloads = Arc::new(Described(Mutex::new((Arc::new(()), "a"))));
        let inbound = Inbound::new(
            CertManager::new(ca, std::time::Duration::from_secs(3600)),
            workloads.clone(),
            Arc::new(AllowAll),
            Arc::new(super::super::DirectDialer),
            TunnelConfig::default(),
            false,
        )
        .with_metrics(metrics);
        let id = |sa: &str| SpiffeId::new("cluster.local", "ns", sa).expect("id");
        let conn = InboundConnection {
            source_identity: Some(id("client")),
            source_addr: "10.0.0.1:40000".parse().expect("addr"),
            destination: "10.0.0.2:8080".parse().expect("addr"),
            workload: LocalWorkload {
                name: "server".into(),
                namespace: "ns".into(),
                identity: id("server"),
            },
        };
        let open = |conn: &InboundConnection| {
            drop(inbound.open_record(conn, conn.source_addr, conn.destination, false));
        };
        open(&conn);
        open(&conn);
        assert_eq!(opened(&registry, "a"), 2);
        // Same epoch: the series resolved for this peer is reused, not described again.
        workloads.set("b", false);
        open(&conn);
        assert_eq!((opened(&registry, "a"), opened(&registry, "b")), (3, 0));
        // A new epoch: described anew.
        workloads.set("b", true);
        open(&conn);
        assert_eq!((opened(&registry, "a"), opened(&registry, "b")), (3, 1));
        // Another peer under the same epoch gets its own series.
        let plaintext = InboundConnection {
            source_identity: None,
            ..conn.clone()
        };
        open(&plaintext);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert!(
            text.lines()
                .any(|l| l.starts_with("istio_tcp_connections_opened_total{")
                    && l.contains("connection_security_policy=\"none\"")
                    && l.ends_with(" 1")),
            "{text}"
        );
    }
}
