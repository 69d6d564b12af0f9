//! One enrolled pod: its in-pod listeners (outbound capture 127.0.0.1:15001, plaintext
//! inbound :15006, HBONE :15008), its enrollment in the capture maps, and the tasks that
//! serve them.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ambit_common::{HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_CAPTURE_PORT};
use anyhow::Context as _;
use futures::FutureExt as _;
use tokio::net::TcpStream;
use tokio::task::AbortHandle;
use tracing::{debug, info, warn};

use super::sockets::PodSockets;
use super::view::meta_of;
use super::{Shared, StateWorkloads};
use crate::capture::{Capture, OrigDstTable};
use crate::config::{MeshState, Route, ServiceEntry, WorkloadEntry};
use crate::identity::SpiffeId;
use crate::netns::NetNs;
use crate::tunnel::{
    AcceptBackoff, ConnectionLabels, ConnectionSeries, CopyStats, Dialer as _, Inbound, Listener,
    Outbound, OutboundRequest, Reporter, SeriesCache, TunnelError, accept_loop, outcome,
};

/// What identifies a running pod; a change to any part restarts it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PodKey {
    namespace: String,
    name: String,
    uid: Option<String>,
    identity: String,
    ips: Vec<IpAddr>,
    /// The netns path when a source names it (local mode, the CNI plugin); a pod found
    /// by scanning /proc keeps the one found while it runs.
    netns: Option<PathBuf>,
}

impl PodKey {
    pub fn of(w: &WorkloadEntry, cni_netns: Option<&PathBuf>) -> Self {
        Self {
            namespace: w.namespace.clone(),
            name: w.name.clone(),
            uid: w.uid.clone(),
            identity: w.identity.to_string(),
            ips: w.ips.clone(),
            netns: w.netns.clone().or_else(|| cni_netns.cloned()),
        }
    }
}

/// A pod whose enrollment failed part-way; the agent keeps it closed under this cookie.
#[derive(Debug, thiserror::Error)]
#[error("{error:#}")]
pub(crate) struct StartError {
    pub netns_cookie: u64,
    /// Where the pod's netns is, to hold its inbound side closed.
    pub netns_path: PathBuf,
    pub error: anyhow::Error,
}

struct Listeners {
    /// How long the capture steps took (under the capture lock), for the enrollment log.
    capture_time: std::time::Duration,
    /// How long the pod waited for the capture lock (other pods' enrollments).
    capture_wait: std::time::Duration,
    orig_dst: OrigDstTable,
    outbound: std::net::TcpListener,
    plaintext: std::net::TcpListener,
    hbone: std::net::TcpListener,
}

pub(crate) struct PodRuntime {
    workload: Arc<WorkloadEntry>,
    netns_path: PathBuf,
    netns_cookie: u64,
    inbound: Arc<Inbound>,
    tasks: Vec<AbortHandle>,
}

impl PodRuntime {
    pub async fn start(
        shared: Arc<Shared>,
        workload: Arc<WorkloadEntry>,
        netns_path: PathBuf,
    ) -> anyhow::Result<Self> {
        let started = Instant::now();
        // Entering the netns and the capture maps' updates block: off the runtime's thread.
        let path = netns_path.clone();
        let (netns, netns_cookie, sockets) = tokio::task::spawn_blocking(move || {
            let netns = NetNs::open(&path)?;
            let cookie = netns.cookie().context("reading the pod's netns cookie")?;
            let sockets = PodSockets::spawn(&netns)?;
            anyhow::Ok((netns, cookie, Arc::new(sockets)))
        })
        .await??;
        // Failing once capture may have started, the pod is held closed (`StartError`).
        let steered = Self::listen_and_steer(&shared, &workload, netns, netns_cookie, &sockets)
            .await
            .and_then(|runtime_parts| {
                let (capture_time, capture_wait) =
                    (runtime_parts.capture_time, runtime_parts.capture_wait);
                let runtime = Self::serve(
                    shared,
                    workload,
                    netns_path.clone(),
                    netns_cookie,
                    sockets,
                    runtime_parts,
                )?;
                Ok((runtime, capture_time, capture_wait))
            });
        match steered {
            Ok((runtime, capture_time, capture_wait)) => {
                let w = &runtime.workload;
                info!(pod = %format!("{}/{}", w.namespace, w.name), identity = %w.identity,
                    netns_cookie, setup_ms = started.elapsed().as_millis() as u64,
                    capture_ms = capture_time.as_millis() as u64,
                    capture_wait_ms = capture_wait.as_millis() as u64, "pod enrolled");
                Ok(runtime)
            }
            Err(e) => Err(StartError {
                netns_cookie,
                netns_path,
                error: e,
            }
            .into()),
        }
    }

    /// The pod's listeners, its certificate, then source preservation, inbound steering and
    /// outbound capture, in that order.
    async fn listen_and_steer(
        shared: &Arc<Shared>,
        workload: &WorkloadEntry,
        netns: NetNs,
        netns_cookie: u64,
        sockets: &PodSockets,
    ) -> anyhow::Result<Listeners> {
        let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        let outbound_listener = sockets
            .listen_std(
                SocketAddr::new(Ipv4Addr::LOCALHOST.into(), OUTBOUND_CAPTURE_PORT),
                set_accepted_socket_options,
            )
            .await
            .context("outbound listener 127.0.0.1:15001")?;
        let plaintext_listener = sockets
            .listen_std(
                SocketAddr::new(any, INBOUND_PLAINTEXT_PORT),
                set_accepted_socket_options,
            )
            .await
            .context("plaintext listener :15006")?;
        let hbone_listener = sockets
            .listen_std(SocketAddr::new(any, HBONE_PORT), set_hbone_socket_options)
            .await
            .context("HBONE listener :15008")?;
        // Have the certificate before traffic arrives.
        shared.certs.get(&workload.identity).await?;
        let shared = shared.clone();
        let interface = workload.interface.clone();
        // The mesh carries IPv4 only (sk_lookup refuses the rest), so only those are keys.
        let addrs: Vec<Ipv4Addr> = workload
            .ips
            .iter()
            .filter_map(|ip| match ip {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            })
            .collect();
        tokio::task::spawn_blocking(move || {
            let waited_from = Instant::now();
            let mut capture = shared
                .capture
                .lock()
                .map_err(|_| anyhow::anyhow!("capture lock poisoned"))?;
            let capture_started = Instant::now();
            // Replies to the preserved client addresses must find their way back first, then
            // inbound steering, then outbound capture: each step only works once the one
            // before it is in place.
            capture
                .preserve_source(&netns, &interface)
                .context("source-address preservation")?;
            capture
                .attach_inbound(
                    &netns,
                    netns_cookie,
                    &addrs,
                    &hbone_listener,
                    &plaintext_listener,
                )
                .context("inbound steering")?;
            capture.enroll(netns_cookie)?;
            let orig_dst = capture.orig_dst_table()?;
            drop(capture);
            anyhow::Ok(Listeners {
                capture_time: capture_started.elapsed(),
                capture_wait: capture_started - waited_from,
                orig_dst,
                outbound: outbound_listener,
                plaintext: plaintext_listener,
                hbone: hbone_listener,
            })
        })
        .await?
    }

    fn serve(
        shared: Arc<Shared>,
        workload: Arc<WorkloadEntry>,
        netns_path: PathBuf,
        netns_cookie: u64,
        sockets: Arc<PodSockets>,
        listeners: Listeners,
    ) -> anyhow::Result<Self> {
        let Listeners {
            capture_time: _,
            capture_wait: _,
            orig_dst: listeners_orig_dst,
            outbound: outbound_listener,
            plaintext: plaintext_listener,
            hbone: hbone_listener,
        } = listeners;
        let inbound = Arc::new(
            Inbound::new(
                shared.certs.clone(),
                Arc::new(StateWorkloads(shared.clone())),
                shared.authorizer.clone(),
                sockets.clone(),
                shared.tunnel.clone(),
                true,
            )
            .with_metrics(shared.metrics.clone())
            .with_drain(shared.drain.clone())
            .with_shards(shared.shards.clone())
            .for_pod(workload.ips.clone()),
        );
        let outbound = Arc::new(
            Outbound::new(shared.certs.clone(), sockets.clone(), shared.tunnel.clone())
                .with_metrics(shared.metrics.clone()),
        );
        let ctx = Arc::new(OutboundCtx {
            shared: shared.clone(),
            workload: workload.clone(),
            netns_cookie,
            outbound,
            sockets,
            orig_dst: listeners_orig_dst,
            picks: AtomicUsize::new(0),
            series: SeriesCache::default(),
        });
        let shards = &shared.shards;
        let mut tasks = Vec::with_capacity(3);
        // A listener that fails to register stops those already running: nothing keeps a
        // port of a pod that did not start.
        let mut started = |task: std::io::Result<AbortHandle>| match task {
            Ok(task) => {
                tasks.push(task);
                Ok(())
            }
            Err(e) => {
                tasks.iter().for_each(AbortHandle::abort);
                Err(e)
            }
        };
        started(shards.spawn_listener(outbound_listener, |l| serve_outbound(ctx, l)))?;
        started(shards.spawn_listener(hbone_listener, |l| serve_hbone(inbound.clone(), l)))?;
        started(
            shards.spawn_listener(plaintext_listener, |l| serve_plaintext(inbound.clone(), l)),
        )?;
        Ok(Self {
            workload,
            netns_path,
            netns_cookie,
            inbound,
            tasks,
        })
    }

    pub fn identity(&self) -> &SpiffeId {
        &self.workload.identity
    }

    pub fn netns_cookie(&self) -> u64 {
        self.netns_cookie
    }

    pub fn netns_path(&self) -> &Path {
        &self.netns_path
    }

    /// `namespace/name`.
    pub fn name(&self) -> String {
        super::enroll::pod_name(&self.workload)
    }

    /// Closes this pod's inbound connections that the current policies deny.
    pub fn revoke_denied(&self) -> usize {
        self.inbound.revoke_denied()
    }

    /// Stops accepting new connections (drain); the pod stays enrolled and its
    /// connections in flight go on.
    pub fn close_listeners(&self) {
        for task in &self.tasks {
            task.abort();
        }
    }

    /// Unenrolls the pod and closes its listeners; connections in flight finish on their own.
    pub fn stop(self, shared: &Shared) {
        if let Ok(mut capture) = shared.capture.lock() {
            release_capture(&mut capture, self.netns_cookie);
        }
        for task in &self.tasks {
            task.abort();
        }
        info!(pod = %format!("{}/{}", self.workload.namespace, self.workload.name), "pod unenrolled");
    }
}

struct OutboundCtx {
    shared: Arc<Shared>,
    workload: Arc<WorkloadEntry>,
    netns_cookie: u64,
    outbound: Arc<Outbound>,
    sockets: Arc<PodSockets>,
    orig_dst: OrigDstTable,
    /// Spreads service connections over endpoints.
    picks: AtomicUsize,
    /// Metric counters by destination: the addresses of the destination workload's and
    /// service's entries in the state in force.
    series: SeriesCache<MeshState, (usize, usize)>,
}

impl OutboundCtx {
    /// The metric counters of a connection from this pod to `destination` (through
    /// `service`, if it went through one) under `state`.
    fn series(
        &self,
        state: &Arc<MeshState>,
        destination: &Arc<WorkloadEntry>,
        service: Option<&Arc<ServiceEntry>>,
    ) -> ConnectionSeries {
        let key = (
            Arc::as_ptr(destination) as usize,
            service.map_or(0, |s| Arc::as_ptr(s) as usize),
        );
        let build = || {
            let service = service.map(|s| format!("{}.{}.svc.cluster.local", s.name, s.namespace));
            self.shared.metrics.series_of(ConnectionLabels::new(
                Reporter::Source,
                meta_of(&self.workload),
                meta_of(destination),
                service,
                true,
            ))
        };
        self.series.get_or_build(state, key, build)
    }
}

async fn serve_outbound(ctx: Arc<OutboundCtx>, listener: Listener) {
    // Ends only when the pod's tasks are aborted.
    accept_loop(
        &listener,
        "outbound :15001",
        AcceptBackoff::default(),
        ctx.shared.metrics.accept_errors(),
        std::future::pending(),
        // The client comes with TCP_NODELAY and armed to reset (the listener's options).
        |client, peer| {
            let this = ctx.clone();
            ctx.shared
                .shards
                .spawn_connection(client, move |client| handle_outbound(this, client, peer));
        },
    )
    .await;
}

/// One captured connection: routing and setup are synchronous here; the returned future
/// holds only what the connection needs while it is open and for its access-log line.
///
/// Not an `async fn`: its arguments and the routing's temporaries (the route, the request)
/// would keep their space in every connection's task for the connection's whole life.
/// Takes the pod's netns out of capture, outbound and inbound; a failure is logged and the
/// rest still done.
pub(super) fn release_capture(capture: &mut Capture, netns_cookie: u64) {
    if let Err(e) = capture.unenroll(netns_cookie) {
        warn!(netns_cookie, error = %e, "unenroll failed");
    }
    if let Err(e) = capture.detach_inbound(netns_cookie) {
        warn!(netns_cookie, error = %e, "detaching inbound steering failed");
    }
}

fn handle_outbound(
    ctx: Arc<OutboundCtx>,
    client: TcpStream,
    peer: SocketAddr,
) -> futures::future::BoxFuture<'static, ()> {
    // The pod's own handle on the map: no lock shared with the control plane.
    let orig = match ctx.orig_dst.take(ctx.netns_cookie, peer.port()) {
        Ok(Some(orig)) => orig,
        Ok(None) => {
            warn!(%peer, "captured connection without an original destination; closing");
            return Box::pin(std::future::ready(()));
        }
        Err(e) => {
            warn!(%peer, error = %e, "reading a captured connection's original destination failed; closing");
            return Box::pin(std::future::ready(()));
        }
    };
    let state = ctx.shared.state();
    let started = Instant::now();
    let me = &ctx.workload;
    match state.route(orig, ctx.picks.fetch_add(1, Ordering::Relaxed)) {
        Route::Hbone {
            workload,
            target,
            hbone_addr,
        } => {
            let source_ip = me.ips.first().copied().unwrap_or(peer.ip());
            let source_addr = SocketAddr::new(source_ip, peer.port());
            let request = OutboundRequest {
                source: me.identity.clone(),
                source_addr,
                source_workload: me.name.clone(),
                destination: workload.identity.clone(),
                hbone_addr,
                original_destination: target,
            };
            let mut record = ctx
                .shared
                .metrics
                .open_series(&ctx.series(&state, &workload, state.service_at(orig)), true);
            // An idle connection must not pin a mesh state that has since been replaced.
            drop(state);
            // `map`, not an `async` block awaiting the proxy: a block would store the proxy
            // future twice (as what it captured and as what it awaits).
            let proxy = ctx.outbound.proxy(request, client, record.stats().clone());
            Box::pin(proxy.map(move |result| {
                if let Err(TunnelError::NotCarried(_)) = &result {
                    // Upstream failure: the tunnel never carried this connection.
                    record.set_response_flags(crate::tunnel::UPSTREAM_FAILURE);
                }
                let me = &ctx.workload;
                let stats = record.stats();
                crate::tunnel::AccessLog {
                    kind: crate::tunnel::AccessKind::Outbound,
                    source: Some(&me.identity),
                    source_workload: Some(crate::tunnel::WorkloadName {
                        namespace: &me.namespace,
                        name: &me.name,
                    }),
                    source_addr,
                    destination: Some(&workload.identity),
                    destination_workload: Some(crate::tunnel::WorkloadName {
                        namespace: &workload.namespace,
                        name: &workload.name,
                    }),
                    original_destination: orig,
                    target,
                    security: "mutual_tls",
                    // Enforced by the destination's agent; its access log has the decision.
                    authz: "remote",
                    // The copy's TCP side is the client: what it sent is the request.
                    bytes_from_client: stats.sent(),
                    bytes_to_client: stats.received(),
                    duration: started.elapsed(),
                    result: &outcome(&result),
                }
                .emit();
            }))
        }
        Route::Direct { target } => {
            drop(state);
            Box::pin(async move {
                let connect_timeout = ctx.outbound.connect_timeout();
                let result = passthrough(&ctx.sockets, client, target, connect_timeout).await;
                info!(source = %ctx.workload.identity, %target, security = "none",
                    result = %outcome(&result),
                    "outbound passthrough closed");
            })
        }
        Route::Deny { reason } => {
            info!(source = %me.identity, original_destination = %orig, reason, "outbound connection refused");
            crate::tunnel::reset_on_close(&client);
            Box::pin(std::future::ready(()))
        }
    }
}

async fn passthrough(
    sockets: &PodSockets,
    mut client: TcpStream,
    target: SocketAddr,
    connect_timeout: Duration,
) -> std::io::Result<()> {
    // Armed to reset, like the client (from its listener): lifted only if both directions
    // end cleanly. Bounded like every other dial, not by the kernel's SYN retries (~2 min);
    // the client, dropped on the error, is reset.
    let Ok(dialled) = tokio::time::timeout(connect_timeout, sockets.dial_app(target, None)).await
    else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("connect to {target}: timed out after {connect_timeout:?}"),
        ));
    };
    let mut upstream = dialled?;
    crate::tunnel::copy_tcp(&mut client, &mut upstream, &CopyStats::default()).await
}

/// Sets on a listener what every connection it accepts needs from its first moment: Linux
/// copies a listener's socket options into each accepted socket, so this costs two syscalls
/// per listener instead of two per connection. TCP_NODELAY: a proxy forwards whatever it has
/// at once, Nagle would only add latency. SO_LINGER 0 ([`crate::tunnel::reset_on_close`]):
/// until a connection finishes cleanly its close is a reset, even if the agent dies before
/// it is handled (the proxy lifts it after a clean end). A listener's own close is not
/// affected (its unaccepted connections are reset either way).
fn set_accepted_socket_options(listener: &impl std::os::fd::AsFd) -> std::io::Result<()> {
    let socket = socket2::SockRef::from(listener);
    socket.set_tcp_nodelay(true)?;
    socket.set_linger(Some(std::time::Duration::ZERO))
}

/// The HBONE listener's counterpart of [`set_accepted_socket_options`]: TCP_NODELAY only
/// (HTTP/2 writes small frames, WINDOW_UPDATE and headers, that must not wait; a clean HBONE
/// end is a FIN, so no reset on close). Set before `listen()`: peers dial the pod's :15008
/// directly, and a connection completed before the option would keep Nagle's algorithm for
/// its whole pooled life.
fn set_hbone_socket_options(listener: &impl std::os::fd::AsFd) -> std::io::Result<()> {
    socket2::SockRef::from(listener).set_tcp_nodelay(true)
}

async fn serve_hbone(inbound: Arc<Inbound>, listener: Listener) {
    if let Err(e) = inbound.serve(listener).await {
        warn!(error = %e, "HBONE listener failed");
    }
}

async fn serve_plaintext(inbound: Arc<Inbound>, listener: Listener) {
    // Ends only when the pod's tasks are aborted.
    accept_loop(
        &listener,
        "plaintext :15006",
        AcceptBackoff::default(),
        inbound.accept_errors(),
        std::future::pending(),
        // The client comes with TCP_NODELAY and armed to reset (the listener's options).
        |client, peer| {
            let this = inbound.clone();
            inbound
                .shards()
                .spawn_connection(client, move |client| async move {
                    // Under sk_lookup the accepted socket's local address is what the
                    // client dialled.
                    let Ok(destination) = client.local_addr() else {
                        return;
                    };
                    if let Err(e) = this.handle_plaintext(client, peer, destination).await {
                        debug!(%peer, error = %e, "plaintext connection ended with an error");
                    }
                });
        },
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No accepted socket gets its options one by one (`Outbound::proxy` arms nothing, the
    /// HBONE accept sets nothing): Linux copies the listener's into every accepted socket.
    #[test]
    fn accepted_sockets_come_with_their_listeners_options() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        set_accepted_socket_options(&listener).expect("listener options");
        let _client =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (accepted, _) = listener.accept().expect("accept");
        let accepted = socket2::SockRef::from(&accepted);
        assert_eq!(
            accepted.linger().expect("SO_LINGER"),
            Some(std::time::Duration::ZERO)
        );
        assert!(accepted.tcp_nodelay().expect("TCP_NODELAY"));
        // HBONE sockets: TCP_NODELAY, and a plain close.
        let hbone = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        set_hbone_socket_options(&hbone).expect("HBONE listener options");
        let _client =
            std::net::TcpStream::connect(hbone.local_addr().expect("addr")).expect("connect");
        let (accepted, _) = hbone.accept().expect("accept");
        let accepted = socket2::SockRef::from(&accepted);
        assert!(accepted.tcp_nodelay().expect("TCP_NODELAY"));
        assert_eq!(accepted.linger().expect("SO_LINGER"), None);
        // A socket accepted from a listener without the options has neither.
        let plain = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let _client =
            std::net::TcpStream::connect(plain.local_addr().expect("addr")).expect("connect");
        let (accepted, _) = plain.accept().expect("accept");
        let accepted = socket2::SockRef::from(&accepted);
        assert_eq!(accepted.linger().expect("SO_LINGER"), None);
        assert!(!accepted.tcp_nodelay().expect("TCP_NODELAY"));
    }
}
