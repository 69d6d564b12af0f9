//! Metrics of the agent as a whole: enrolled pods, attached programs, map sizes, build.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

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
    fn agent_gauges_encode_with_their_labels() {
        let mut registry = Registry::default();
        let m = AgentMetrics::new(&mut registry);
        m.set_enrolled_pods(3);
        m.set_programs(&["ambit_connect4", "ambit_sock_ops"]);
        m.set_map_entries("ENROLLED", 3);
        let text = encode(&registry);
        for line in [
            "ambit_enrolled_pods 3",
            "ambit_ebpf_programs_attached{program=\"ambit_connect4\"} 1",
            "ambit_ebpf_programs_attached{program=\"ambit_sock_ops\"} 1",
            "ambit_redirect_map_entries{map=\"ENROLLED\"} 3",
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
