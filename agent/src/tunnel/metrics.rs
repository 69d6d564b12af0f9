//! The tunnel's metrics: Istio's standard TCP metrics (so existing Istio dashboards work)
//! and ambit's handshake failures by reason.
//!
//! A connection is recorded through a [`ConnectionRecord`]: `opened` when it is created,
//! bytes as the copy loop moves them (the counters share the copy loop's atomics, so a
//! scrape sees long-lived connections grow), `closed` when it is dropped — exactly once
//! however the connection ends.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::copy::CopyStats;
use super::tls::{ChainCacheCounters, HandshakeFailure};

/// Istio's value for a label the reporter cannot know.
pub const UNKNOWN: &str = "unknown";

/// Which end reports: the client's agent (`source`) or the server's (`destination`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reporter {
    Source,
    Destination,
}

impl Reporter {
    fn as_str(self) -> &'static str {
        match self {
            Self::Source => "source",
            Self::Destination => "destination",
        }
    }
}

/// What the metrics say about one end of a connection. Every field is bounded by the
/// number of workloads: no ports or IPs here.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkloadMeta {
    pub workload: String,
    pub namespace: String,
    pub principal: String,
    pub app: String,
    pub version: String,
}

impl WorkloadMeta {
    /// Everything unknown: a peer we have no description of.
    pub fn unknown() -> Self {
        Self {
            workload: UNKNOWN.into(),
            namespace: UNKNOWN.into(),
            principal: UNKNOWN.into(),
            app: UNKNOWN.into(),
            version: UNKNOWN.into(),
        }
    }
}

/// The labels of Istio's `istio_tcp_*` metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_service: String,
    pub request_protocol: &'static str,
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
}

impl ConnectionLabels {
    pub fn new(
        reporter: Reporter,
        source: WorkloadMeta,
        destination: WorkloadMeta,
        destination_service: Option<String>,
        mutual_tls: bool,
    ) -> Self {
        Self {
            reporter: reporter.as_str(),
            source_workload: source.workload,
            source_workload_namespace: source.namespace,
            source_principal: source.principal,
            source_app: source.app,
            source_version: source.version,
            destination_workload: destination.workload,
            destination_workload_namespace: destination.namespace,
            destination_principal: destination.principal,
            destination_app: destination.app,
            destination_version: destination.version,
            destination_service: destination_service.unwrap_or_else(|| UNKNOWN.into()),
            request_protocol: "tcp",
            // Envoy's "no flags" value; failures set theirs on close.
            response_flags: "-",
            connection_security_policy: if mutual_tls { "mutual_tls" } else { "none" },
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    pub reason: &'static str,
}

/// Why the inbound side refused an HBONE connection or stream (or a plaintext connection)
/// before or instead of carrying it. Closed set: each name is a stable metric label and
/// the `reason` of the refusal's log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RefusalReason {
    /// A stream that is not CONNECT (400).
    BadMethod,
    /// A CONNECT whose `:authority` is not an `ip:port` (400).
    BadAuthority,
    /// A connection or CONNECT for an address that is not this listener's pod (400, or a
    /// reset before TLS).
    NotLocalPod,
    /// The workload did not accept the upstream connection (503, or a reset on 15006).
    UpstreamFailed,
    /// Request headers over `TunnelConfig::max_header_list_size` (431).
    HeaderTooLarge,
    /// No finished TLS + HTTP/2 handshake within `TunnelConfig::tls_handshake_timeout`.
    HandshakeTimeout,
    /// An HBONE connection carried no stream for `TunnelConfig::hbone_idle_timeout`.
    IdleTimeout,
    /// The peer broke the HTTP/2 protocol and the connection was torn down (GOAWAY).
    ProtocolError,
    /// The workload's certificate could not be issued (the CA answered with an error) or
    /// its TLS configuration not built: a TCP reset before TLS.
    NoCertificate,
}

impl RefusalReason {
    pub const ALL: [Self; 9] = [
        Self::BadMethod,
        Self::BadAuthority,
        Self::NotLocalPod,
        Self::UpstreamFailed,
        Self::HeaderTooLarge,
        Self::HandshakeTimeout,
        Self::IdleTimeout,
        Self::ProtocolError,
        Self::NoCertificate,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadMethod => "bad_method",
            Self::BadAuthority => "bad_authority",
            Self::NotLocalPod => "not_local_pod",
            Self::UpstreamFailed => "upstream_failed",
            Self::HeaderTooLarge => "header_too_large",
            Self::HandshakeTimeout => "handshake_timeout",
            Self::IdleTimeout => "idle_timeout",
            Self::ProtocolError => "protocol_error",
            Self::NoCertificate => "no_certificate",
        }
    }
}

impl std::fmt::Display for RefusalReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    pub reason: &'static str,
}

/// Which end of an HBONE connection: "client" (outbound) or "server" (inbound).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SideLabels {
    pub side: &'static str,
}

/// Shared by every pod of the agent.
#[derive(Debug, Default)]
pub struct Metrics {
    opened: Family<ConnectionLabels, Counter>,
    closed: Family<ConnectionLabels, Counter>,
    sent: Family<ConnectionLabels, Counter>,
    received: Family<ConnectionLabels, Counter>,
    handshake_failures: Family<HandshakeLabels, Counter>,
    refusals: Family<RefusalLabels, Counter>,
    /// HBONE connections dropped because the peer left a keepalive PING unanswered.
    keepalive_timeouts: Family<SideLabels, Counter>,
    /// Failed accepts on the agent's listeners (EMFILE and the like); accepting goes on.
    accept_errors: Counter,
    /// Peer chains verified from the verified-chain cache, and those verified in full.
    verified_chains: ChainCacheCounters,
    /// Connections recorded and not yet dropped; the drain waits for this to reach zero.
    active: Arc<AtomicUsize>,
    /// The counters of each label set, resolved once: a connection then costs one lookup
    /// here instead of hashing its dozen labels into every family (open, bytes both ways,
    /// close), and an idle connection holds a pointer rather than its own strings. Bounded
    /// like the metric families themselves (no ports or IPs in labels).
    series: RwLock<HashMap<Arc<ConnectionLabels>, Arc<Series>>>,
}

/// The counters of one label set, resolved ([`Metrics::series_of`]).
#[derive(Clone, Debug)]
pub struct ConnectionSeries(Arc<Series>);

/// Metric counters a pod's connections resolved, by what their labels are made from, while
/// one state (`E`, the workloads in force) lasts: a connection then neither builds a dozen
/// label strings nor hashes them again. Emptied when another state comes; the weak reference
/// keeps the old state's allocation from being reused, so its address identifies it.
///
/// The lock is the pod's own: only that pod's connections take it, each for one map get or
/// insert (never while building a series, which may read the workloads' state), and no
/// control-plane or scrape code touches it.
pub struct SeriesCache<E: ?Sized, K> {
    cached: Mutex<Cached<E, K>>,
}

struct Cached<E: ?Sized, K> {
    state: Option<Weak<E>>,
    by_key: HashMap<K, ConnectionSeries>,
}

/// Keys kept per state at most: a client reaching a pod from ever new addresses empties the
/// cache rather than growing it.
const SERIES_CACHE_MAX: usize = 4096;

impl<E: ?Sized, K> Default for SeriesCache<E, K> {
    fn default() -> Self {
        Self {
            cached: Mutex::new(Cached {
                state: None,
                by_key: HashMap::new(),
            }),
        }
    }
}

impl<E: ?Sized, K: Eq + std::hash::Hash> Cached<E, K> {
    fn holds(&self, state: &Arc<E>) -> bool {
        self.state
            .as_ref()
            .is_some_and(|known| std::ptr::addr_eq(known.as_ptr(), Arc::as_ptr(state)))
    }
}

impl<E: ?Sized, K: Eq + std::hash::Hash> SeriesCache<E, K> {
    /// The counters for `key` under `state`: cached, or made by `build` (outside the lock)
    /// and kept unless the cache moved on to another state meanwhile.
    pub fn get_or_build(
        &self,
        state: &Arc<E>,
        key: K,
        build: impl FnOnce() -> ConnectionSeries,
    ) -> ConnectionSeries {
        if let Ok(mut cached) = self.cached.lock() {
            if !cached.holds(state) {
                cached.state = Some(Arc::downgrade(state));
                cached.by_key.clear();
            }
            if let Some(series) = cached.by_key.get(&key) {
                return series.clone();
            }
        }
        let series = build();
        if let Ok(mut cached) = self.cached.lock()
            && cached.holds(state)
        {
            if cached.by_key.len() >= SERIES_CACHE_MAX {
                cached.by_key.clear();
            }
            cached.by_key.insert(key, series.clone());
        }
        series
    }
}

/// One label set's counters, shared by every connection that carries it.
#[derive(Debug)]
struct Series {
    labels: Arc<ConnectionLabels>,
    opened: Counter,
    sent: Counter,
    received: Counter,
    /// Resolved at the first close: until a connection with these labels closed, the
    /// closed family shows no such series (as before this cache existed).
    closed: OnceLock<Counter>,
    /// The same labels with `response_flags="UF"`, resolved at the first upstream failure:
    /// a destination that refuses every connection must not cost each one a label copy and
    /// the family's lock, which a scrape holds while it encodes.
    closed_upstream_failure: OnceLock<Counter>,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        // prometheus-client appends `_total` to counters.
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            m.opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            m.closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent in the response direction (destination to source)",
            m.sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received in the request direction (source to destination)",
            m.received.clone(),
        );
        // Every reason starts at 0, so rate() has a baseline and alerts see the series
        // before the first failure.
        for reason in [
            HandshakeFailure::UnknownCa,
            HandshakeFailure::NoClientCertificate,
            HandshakeFailure::Expired,
            HandshakeFailure::NotYetValid,
            HandshakeFailure::SanMismatch {
                expected: String::new(),
                got: String::new(),
            },
            HandshakeFailure::WrongTrustDomain { got: String::new() },
            HandshakeFailure::NoSpiffeId,
            HandshakeFailure::Protocol(String::new()),
        ] {
            drop(m.handshake_failures.get_or_create(&HandshakeLabels {
                reason: reason.label(),
            }));
        }
        registry.register(
            "ambit_tls_handshake_failures",
            "Failed mTLS handshakes on HBONE connections, by reason",
            m.handshake_failures.clone(),
        );
        for reason in RefusalReason::ALL {
            drop(m.refusals.get_or_create(&RefusalLabels {
                reason: reason.as_str(),
            }));
        }
        registry.register(
            "ambit_hbone_refusals",
            "Inbound connections and streams refused before or instead of being carried, by reason",
            m.refusals.clone(),
        );
        for side in ["client", "server"] {
            drop(m.keepalive_timeouts.get_or_create(&SideLabels { side }));
        }
        registry.register(
            "ambit_hbone_keepalive_timeouts",
            "HBONE connections dropped (their streams reset) because the peer left a keepalive PING unanswered, by side",
            m.keepalive_timeouts.clone(),
        );
        registry.register(
            "ambit_accept_errors",
            "Failed accepts on the agent's listeners (accepting continues after a back-off)",
            m.accept_errors.clone(),
        );
        registry.register(
            "ambit_tls_verified_chain_cache_hits",
            "Peer certificate chains accepted from the cache of chains already verified against the same trust bundle",
            m.verified_chains.hits.clone(),
        );
        registry.register(
            "ambit_tls_verified_chain_cache_misses",
            "Peer certificate chains verified in full (not in the verified-chain cache), accepted or not",
            m.verified_chains.misses.clone(),
        );
        m
    }

    /// The counters every TLS configuration cache's verified-chain cache adds to.
    pub fn verified_chains(&self) -> ChainCacheCounters {
        self.verified_chains.clone()
    }

    /// The keepalive-timeout counter of one side ("client" or "server"), resolved once.
    pub fn keepalive_timeouts(&self, side: &'static str) -> Counter {
        self.keepalive_timeouts
            .get_or_create(&SideLabels { side })
            .clone()
    }

    /// The counter every accept loop adds its errors to.
    pub fn accept_errors(&self) -> Counter {
        self.accept_errors.clone()
    }

    pub fn refusal(&self, reason: RefusalReason) {
        self.refusals
            .get_or_create(&RefusalLabels {
                reason: reason.as_str(),
            })
            .inc();
    }

    /// Refusals counted so far for `reason`.
    pub fn refusals(&self, reason: RefusalReason) -> u64 {
        self.refusals
            .get_or_create(&RefusalLabels {
                reason: reason.as_str(),
            })
            .get()
    }

    /// Handshake failures counted so far under the reason label `reason`.
    pub fn handshake_failures(&self, reason: &'static str) -> u64 {
        self.handshake_failures
            .get_or_create(&HandshakeLabels { reason })
            .get()
    }

    pub fn handshake_failure(&self, reason: &HandshakeFailure) {
        self.handshake_failures
            .get_or_create(&HandshakeLabels {
                reason: reason.label(),
            })
            .inc();
    }

    /// Counts a connection as opened; `tcp_is_source` says which side of the copy loop's TCP
    /// socket is the client (outbound: yes; inbound: the TCP side is the workload).
    pub fn open(&self, labels: ConnectionLabels, tcp_is_source: bool) -> ConnectionRecord {
        self.open_series(&self.series_of(labels), tcp_is_source)
    }

    /// The counters of `labels`, for a caller that opens many connections with the same
    /// labels to keep and pass to [`Self::open_series`].
    pub fn series_of(&self, labels: ConnectionLabels) -> ConnectionSeries {
        ConnectionSeries(self.series(labels))
    }

    /// [`Self::open`] with counters resolved before.
    pub fn open_series(&self, series: &ConnectionSeries, tcp_is_source: bool) -> ConnectionRecord {
        let series = series.0.clone();
        series.opened.inc();
        let request = series.received.clone();
        let response = series.sent.clone();
        let stats = if tcp_is_source {
            CopyStats::with_counters(request, response)
        } else {
            CopyStats::with_counters(response, request)
        };
        self.active.fetch_add(1, Ordering::AcqRel);
        ConnectionRecord {
            closed: self.closed.clone(),
            series,
            response_flags: None,
            stats,
            active: self.active.clone(),
        }
    }

    /// The shared counters of `labels`, created in the families on first use.
    fn series(&self, labels: ConnectionLabels) -> Arc<Series> {
        if let Ok(known) = self.series.read()
            && let Some(series) = known.get(&labels)
        {
            return series.clone();
        }
        let labels = Arc::new(labels);
        let series = Arc::new(Series {
            opened: self.opened.get_or_create_owned(&labels),
            sent: self.sent.get_or_create_owned(&labels),
            received: self.received.get_or_create_owned(&labels),
            closed: OnceLock::new(),
            closed_upstream_failure: OnceLock::new(),
            labels: labels.clone(),
        });
        let Ok(mut known) = self.series.write() else {
            // Poisoned: the counters still count, only unshared.
            return series;
        };
        // A racing open may have inserted it first; both resolved the same counters.
        known.entry(labels).or_insert(series).clone()
    }

    /// Connections opened and not yet closed.
    pub fn active_connections(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }
}

/// Envoy's response flag for a connection the upstream never carried.
pub const UPSTREAM_FAILURE: &str = "UF";

/// One open connection; counted as closed when dropped.
#[derive(Debug)]
pub struct ConnectionRecord {
    closed: Family<ConnectionLabels, Counter>,
    series: Arc<Series>,
    /// Set when the connection failed; then the close goes to its own series.
    response_flags: Option<&'static str>,
    stats: CopyStats,
    active: Arc<AtomicUsize>,
}

impl ConnectionRecord {
    /// The byte counters to hand to the copy loop.
    pub fn stats(&self) -> &CopyStats {
        &self.stats
    }

    /// Marks how the connection failed (Envoy's flags, e.g. `UF` upstream failure); shows
    /// on the closed counter only, since opened and bytes were counted before it was known.
    pub fn set_response_flags(&mut self, flags: &'static str) {
        self.response_flags = Some(flags);
    }
}

impl Drop for ConnectionRecord {
    fn drop(&mut self) {
        let series = &self.series;
        match self.response_flags {
            Some(UPSTREAM_FAILURE) => {
                series
                    .closed_upstream_failure
                    .get_or_init(|| {
                        let mut labels = ConnectionLabels::clone(&series.labels);
                        labels.response_flags = UPSTREAM_FAILURE;
                        self.closed.get_or_create_owned(&labels)
                    })
                    .inc();
            }
            // Copies the label set only for the (rare) connection that fails otherwise.
            Some(flags) => {
                let mut labels = ConnectionLabels::clone(&self.series.labels);
                labels.response_flags = flags;
                self.closed.get_or_create(&labels).inc();
            }
            None => {
                series
                    .closed
                    .get_or_init(|| self.closed.get_or_create_owned(&series.labels))
                    .inc();
            }
        }
        self.active.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod metrics_tests {
    use super::*;

    fn meta(name: &str) -> WorkloadMeta {
        WorkloadMeta {
            workload: name.into(),
            namespace: "mesh".into(),
            principal: format!("spiffe://cluster.local/ns/mesh/sa/{name}"),
            app: name.into(),
            version: UNKNOWN.into(),
        }
    }

    fn encode(registry: &Registry) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, registry).expect("encodes");
        out
    }

    #[test]
    fn a_connection_is_counted_once_with_live_bytes_and_istio_labels() {
        let mut registry = Registry::default();
        let m = Metrics::new(&mut registry);
        let labels = ConnectionLabels::new(
            Reporter::Source,
            meta("client"),
            meta("server"),
            Some("echo.mesh.svc.cluster.local".into()),
            true,
        );
        let record = m.open(labels, true);
        // Outbound: the TCP side is the client, so what it sends is the request.
        record.stats().add_sent(100);
        record.stats().add_received(7);
        assert_eq!(m.active_connections(), 1);
        let live = encode(&registry);
        assert!(
            live.contains("istio_tcp_received_bytes_total{reporter=\"source\""),
            "{live}"
        );
        let line = |name: &str, text: &str| {
            text.lines()
                .find(|l| l.starts_with(name))
                .map(str::to_owned)
                .unwrap_or_default()
        };
        assert!(
            line("istio_tcp_received_bytes_total", &live).ends_with(" 100"),
            "{live}"
        );
        assert!(
            line("istio_tcp_sent_bytes_total", &live).ends_with(" 7"),
            "{live}"
        );
        assert!(
            !live.contains("istio_tcp_connections_closed_total{"),
            "{live}"
        );
        drop(record);
        let closed = encode(&registry);
        let c = line("istio_tcp_connections_closed_total", &closed);
        assert!(c.ends_with(" 1"), "{closed}");
        for label in [
            "source_workload=\"client\"",
            "source_principal=\"spiffe://cluster.local/ns/mesh/sa/client\"",
            "destination_workload=\"server\"",
            "destination_service=\"echo.mesh.svc.cluster.local\"",
            "request_protocol=\"tcp\"",
            "response_flags=\"-\"",
            "connection_security_policy=\"mutual_tls\"",
        ] {
            assert!(c.contains(label), "{label} in {c}");
        }
        assert_eq!(m.active_connections(), 0);
    }

    #[test]
    fn connections_with_one_label_set_share_its_counters_and_close_lazily() {
        let mut registry = Registry::default();
        let m = Metrics::new(&mut registry);
        let labels =
            || ConnectionLabels::new(Reporter::Source, meta("client"), meta("server"), None, true);
        let series = m.series_of(labels());
        let first = m.open_series(&series, true);
        let second = m.open(labels(), true);
        first.stats().add_sent(3);
        second.stats().add_sent(4);
        let live = encode(&registry);
        assert!(
            live.contains("istio_tcp_connections_opened_total{") && live.contains("} 2\n"),
            "{live}"
        );
        // No closed series until a connection with these labels closed.
        assert!(
            !live.contains("istio_tcp_connections_closed_total{"),
            "{live}"
        );
        // Two upstream failures on one series: the second reuses the first's counter.
        for _ in 0..2 {
            let mut failed = m.open_series(&series, true);
            failed.set_response_flags(UPSTREAM_FAILURE);
            drop(failed);
        }
        drop(first);
        drop(second);
        let text = encode(&registry);
        let closed: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("istio_tcp_connections_closed_total{"))
            .collect();
        assert_eq!(closed.len(), 2, "{text}");
        assert!(
            closed
                .iter()
                .any(|l| l.contains("response_flags=\"-\"") && l.ends_with(" 2")),
            "{text}"
        );
        assert!(
            closed
                .iter()
                .any(|l| l.contains("response_flags=\"UF\"") && l.ends_with(" 2")),
            "{text}"
        );
        let received = text
            .lines()
            .find(|l| l.starts_with("istio_tcp_received_bytes_total{"))
            .unwrap_or_default();
        assert!(received.ends_with(" 7"), "{text}");
        assert_eq!(m.active_connections(), 0);
    }

    #[test]
    fn inbound_maps_directions_and_failures_get_flags() {
        let mut registry = Registry::default();
        let m = Metrics::new(&mut registry);
        let labels = ConnectionLabels::new(
            Reporter::Destination,
            WorkloadMeta::unknown(),
            meta("server"),
            None,
            false,
        );
        let mut record = m.open(labels, false);
        // Inbound: the TCP side is the workload, so what it sends is the response.
        record.stats().add_sent(5);
        record.set_response_flags("UF");
        drop(record);
        m.handshake_failure(&HandshakeFailure::NoClientCertificate);
        m.refusal(RefusalReason::NotLocalPod);
        let text = encode(&registry);
        assert!(
            text.contains("ambit_hbone_refusals_total{reason=\"not_local_pod\"} 1"),
            "{text}"
        );
        // Every reason is exported from the start, so alerts see a baseline.
        assert!(
            text.contains("ambit_hbone_refusals_total{reason=\"idle_timeout\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("connection_security_policy=\"none\""),
            "{text}"
        );
        assert!(text.contains("response_flags=\"UF\""), "{text}");
        assert!(
            text.contains("ambit_tls_handshake_failures_total{reason=\"no_client_cert\"} 1"),
            "{text}"
        );
        let sent = text
            .lines()
            .find(|l| l.starts_with("istio_tcp_sent_bytes_total{"))
            .unwrap_or_default();
        assert!(
            sent.contains("reporter=\"destination\"") && sent.ends_with(" 5"),
            "{text}"
        );
    }

    #[test]
    fn series_cache_serves_one_state_and_starts_over_with_the_next() {
        let mut registry = Registry::default();
        let m = Metrics::new(&mut registry);
        let series = |name: &str| {
            m.series_of(ConnectionLabels::new(
                Reporter::Source,
                meta("client"),
                meta(name),
                None,
                true,
            ))
        };
        let cache = SeriesCache::<u32, &str>::default();
        let (one, two) = (Arc::new(1), Arc::new(2));
        let builds = std::cell::Cell::new(0);
        let get = |state: &Arc<u32>, key| {
            cache.get_or_build(state, key, || {
                builds.set(builds.get() + 1);
                series(key)
            })
        };
        let first = get(&one, "server");
        let again = get(&one, "server");
        assert_eq!(builds.get(), 1, "a second connection finds the counters");
        assert!(Arc::ptr_eq(&first.0, &again.0));
        get(&one, "other");
        assert_eq!(builds.get(), 2, "another key builds its own");
        get(&two, "server");
        assert_eq!(builds.get(), 3, "a new state empties the cache");
        get(&one, "server");
        assert_eq!(builds.get(), 4, "and the old state's entries are gone");
    }
}
