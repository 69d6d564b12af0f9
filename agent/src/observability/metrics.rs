//! Metrics of the agent as a whole: enrolled pods, attached programs, map sizes, build.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Raises a counter that mirrors a total kept elsewhere (kernel map, capture layer, log
/// writer, cert manager, authorizer) to that total. One atomic max, so two scrapes syncing
/// at once cannot both add the same difference (a read, then an add, could); a smaller
/// total (a restarted source) leaves the counter where it is, as counters never go down.
pub fn raise_counter_to(counter: &Counter, total: u64) {
    counter
        .inner()
        .fetch_max(total, std::sync::atomic::Ordering::Relaxed);
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProgramLabels {
    pub program: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabels {
    pub map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: &'static str,
}

#[derive(Debug, Default)]
pub struct AgentMetrics {
    ready: Gauge,
    enrolled_pods: Gauge,
    programs: Family<ProgramLabels, Gauge>,
    map_entries: Family<MapLabels, Gauge>,
    sockmap_attached: Gauge,
    sockmap_attach_failures: Counter,
    sockmap_redirected_bytes: Counter,
    sockmap_tcp_fallbacks: Counter,
    links_replaced: Counter,
    link_replace_failures: Counter,
    maps_recreated: Counter,
    log_lines_dropped: Counter,
}

/// The sockmap shortcut's figures as read from the kernel at a scrape.
#[derive(Clone, Copy, Debug, Default)]
pub struct SockmapFigures {
    pub attached: bool,
    pub attach_failures: u64,
    pub redirected_bytes: u64,
    pub tcp_fallbacks: u64,
}

impl AgentMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "ambit_agent_ready",
            "1 when /healthz/ready answers 200 (programs attached, local certificates present)",
            m.ready.clone(),
        );
        registry.register(
            "ambit_enrolled_pods",
            "Pods whose traffic the agent captures",
            m.enrolled_pods.clone(),
        );
        registry.register(
            "ambit_ebpf_programs_attached",
            "1 per capture program attached and held by the agent",
            m.programs.clone(),
        );
        registry.register(
            "ambit_redirect_map_entries",
            "Entries in the eBPF maps that steer traffic",
            m.map_entries.clone(),
        );
        registry.register(
            "ambit_sockmap_attached",
            "1 when the local legs (app <-> agent in a pod) move bytes through the sockmap",
            m.sockmap_attached.clone(),
        );
        registry.register(
            "ambit_sockmap_attach_failures",
            "Starts at which the sockmap could not be attached (local legs stayed on TCP)",
            m.sockmap_attach_failures.clone(),
        );
        registry.register(
            "ambit_sockmap_redirected_bytes",
            "Bytes of local legs handed straight to the peer socket instead of loopback TCP",
            m.sockmap_redirected_bytes.clone(),
        );
        registry.register(
            "ambit_sockmap_tcp_fallbacks",
            "Local-leg sockets that sent before their peer was filed and so stayed on TCP",
            m.sockmap_tcp_fallbacks.clone(),
        );
        registry.register(
            "ambit_ebpf_links_replaced",
            "Pinned links switched in place from an earlier agent's program to this agent's",
            m.links_replaced.clone(),
        );
        registry.register(
            "ambit_ebpf_link_replace_failures",
            "Pinned links that could not be switched and still run an earlier agent's program",
            m.link_replace_failures.clone(),
        );
        registry.register(
            "ambit_ebpf_maps_recreated",
            "Pinned maps whose definition changed and that were recreated empty at start",
            m.maps_recreated.clone(),
        );
        registry.register(
            "ambit_log_lines_dropped",
            "Log lines dropped because stdout was not read fast enough (the log never blocks)",
            m.log_lines_dropped.clone(),
        );
        let build: Family<BuildLabels, Gauge> = Family::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("ambit_build_info", "The agent's build", build);
        m
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    pub fn set_enrolled_pods(&self, n: usize) {
        self.enrolled_pods.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub fn set_programs(&self, names: &[&str]) {
        self.programs.clear();
        for name in names {
            self.programs
                .get_or_create(&ProgramLabels {
                    program: (*name).to_owned(),
                })
                .set(1);
        }
    }

    pub fn set_map_entries(&self, map: &str, n: usize) {
        self.map_entries
            .get_or_create(&MapLabels {
                map: map.to_owned(),
            })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}

impl AgentMetrics {
    /// Brings the sockmap metrics up to the kernel's counters (which only grow while the
    /// pinned map lives; a smaller reading after `ambit uninstall` adds nothing).
    pub fn set_sockmap(&self, figures: SockmapFigures) {
        self.sockmap_attached.set(i64::from(figures.attached));
        for (counter, value) in [
            (&self.sockmap_attach_failures, figures.attach_failures),
            (&self.sockmap_redirected_bytes, figures.redirected_bytes),
            (&self.sockmap_tcp_fallbacks, figures.tcp_fallbacks),
        ] {
            raise_counter_to(counter, value);
        }
    }
}

impl AgentMetrics {
    /// Brings the counter up to the log writer's total (which only grows).
    pub fn set_log_lines_dropped(&self, total: u64) {
        raise_counter_to(&self.log_lines_dropped, total);
    }
}

/// What the start (and each pod's inbound attach) did with links and maps pinned by an
/// earlier agent.
#[derive(Clone, Copy, Debug, Default)]
pub struct UpgradeFigures {
    pub links_replaced: u64,
    pub link_replace_failures: u64,
    pub maps_recreated: u64,
}

impl AgentMetrics {
    /// Brings the upgrade counters up to the capture layer's totals (which only grow).
    pub fn set_upgrade(&self, figures: UpgradeFigures) {
        for (counter, value) in [
            (&self.links_replaced, figures.links_replaced),
            (&self.link_replace_failures, figures.link_replace_failures),
            (&self.maps_recreated, figures.maps_recreated),
        ] {
            raise_counter_to(counter, value);
        }
    }
}

/// The registry in the text format Prometheus scrapes (OpenMetrics).
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail; an encoder error would only truncate the scrape.
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        tracing::warn!(error = %e, "encoding metrics failed");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raising_to_a_total_never_overcounts_under_concurrent_syncs() {
        let counter = Counter::default();
        // Four "scrapes" bring the counter up to the same growing totals at once; with a
        // read then an add, two of them can add the same difference (seen here about one
        // run in three).
        let start = std::sync::Barrier::new(4);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    start.wait();
                    for total in 1..=200_000 {
                        raise_counter_to(&counter, total);
                    }
                });
            }
        });
        assert_eq!(counter.get(), 200_000);
        raise_counter_to(&counter, 7);
        assert_eq!(counter.get(), 200_000, "a smaller total must not lower it");
    }

    #[test]
    fn agent_gauges_encode_with_their_labels() {
        let mut registry = Registry::default();
        let m = AgentMetrics::new(&mut registry);
        m.set_enrolled_pods(3);
        m.set_programs(&["ambit_connect4", "ambit_sock_ops"]);
        m.set_map_entries("ENROLLED", 3);
        m.set_sockmap(SockmapFigures {
            attached: true,
            attach_failures: 0,
            redirected_bytes: 4096,
            tcp_fallbacks: 2,
        });
        m.set_sockmap(SockmapFigures {
            attached: true,
            attach_failures: 0,
            redirected_bytes: 10_000,
            tcp_fallbacks: 2,
        });
        m.set_upgrade(UpgradeFigures {
            links_replaced: 5,
            link_replace_failures: 1,
            maps_recreated: 2,
        });
        m.set_upgrade(UpgradeFigures {
            links_replaced: 7,
            link_replace_failures: 1,
            maps_recreated: 2,
        });
        m.set_log_lines_dropped(3);
        m.set_log_lines_dropped(9);
        let text = encode(&registry);
        for line in [
            "ambit_enrolled_pods 3",
            "ambit_ebpf_programs_attached{program=\"ambit_connect4\"} 1",
            "ambit_ebpf_programs_attached{program=\"ambit_sock_ops\"} 1",
            "ambit_redirect_map_entries{map=\"ENROLLED\"} 3",
            "ambit_sockmap_attached 1",
            "ambit_sockmap_attach_failures_total 0",
            "ambit_sockmap_redirected_bytes_total 10000",
            "ambit_sockmap_tcp_fallbacks_total 2",
            "ambit_ebpf_links_replaced_total 7",
            "ambit_ebpf_link_replace_failures_total 1",
            "ambit_ebpf_maps_recreated_total 2",
            "ambit_log_lines_dropped_total 9",
            &format!(
                "ambit_build_info{{version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            ),
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in:\n{text}");
        }
    }
}
