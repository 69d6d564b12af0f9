//! What the admin server sees of the running agent ([`AgentView`]), and the metric labels of
//! mesh workloads.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use serde::Serialize;

use super::{AgentOptions, Shared, SourceInfo};
use crate::config::{MeshSettings, MeshState, ServiceEntry, WorkloadEntry};
use crate::identity::{CertSummary, SpiffeId};
use crate::observability::{AgentMetrics, AgentView, Readiness, pem_certificate};
use crate::policy::{PolicySummary, PolicyWarning};
use crate::tunnel::{UNKNOWN, WorkloadMeta};

/// Istio's metric labels for a workload: `app` and `version` from the usual pod labels.
pub(crate) fn meta_of(w: &WorkloadEntry) -> WorkloadMeta {
    let label = |keys: &[&str]| {
        keys.iter()
            .find_map(|k| w.labels.get(*k).cloned())
            .unwrap_or_else(|| UNKNOWN.to_owned())
    };
    WorkloadMeta {
        workload: w.name.clone(),
        namespace: w.namespace.clone(),
        principal: w.identity.to_string(),
        app: label(&["app", "app.kubernetes.io/name"]),
        version: label(&["version", "app.kubernetes.io/version"]),
    }
}

/// `/config_dump` and `ambit config-dump`: the state in force and the effective options,
/// serialized from the agent's own types so that nothing is left out by hand.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ConfigDump<'a> {
    node: &'a str,
    source: SourceInfo,
    trust_domain: &'a str,
    /// The mesh-wide settings of the state in force.
    mesh: MeshSettings,
    workloads: Vec<WorkloadDump<'a>>,
    services: Vec<ServiceDump<'a>>,
    policies: PoliciesDump<'a>,
    certificates: Vec<CertificateDump>,
    /// The effective options (`ambit run`'s flags).
    config: &'a AgentOptions,
}

#[derive(Serialize)]
struct WorkloadDump<'a> {
    #[serde(flatten)]
    workload: &'a WorkloadEntry,
    /// Scheduled on this node.
    local: bool,
}

#[derive(Serialize)]
struct ServiceDump<'a> {
    #[serde(flatten)]
    service: &'a ServiceEntry,
    ports: Vec<PortDump>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PortDump {
    port: u16,
    target_port: u16,
}

#[derive(Serialize)]
struct PoliciesDump<'a> {
    items: &'a [PolicySummary],
    /// The warnings of the policies in force, kept with them.
    warnings: &'a [PolicyWarning],
}

/// A certificate's summary; times in seconds since the Unix epoch.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CertificateDump {
    identity: SpiffeId,
    serial: String,
    not_after: u64,
}

/// The config dump of `state` and `options`.
pub(crate) fn config_dump(
    state: &MeshState,
    source: SourceInfo,
    policies: &[PolicySummary],
    certificates: &[CertSummary],
    options: &AgentOptions,
) -> Value {
    let services = state.services();
    let dump = ConfigDump {
        node: &state.node,
        source,
        trust_domain: &state.trust_domain,
        mesh: state.settings(),
        workloads: state
            .workloads()
            .iter()
            .map(|w| WorkloadDump {
                workload: w,
                local: w.node == state.node,
            })
            .collect(),
        services: services
            .iter()
            .map(|(service, ports)| ServiceDump {
                service,
                ports: ports
                    .iter()
                    .map(|&(port, target_port)| PortDump { port, target_port })
                    .collect(),
            })
            .collect(),
        policies: PoliciesDump {
            items: policies,
            warnings: state.warnings(),
        },
        certificates: certificates
            .iter()
            .map(|c| CertificateDump {
                identity: c.identity.clone(),
                serial: c.serial.clone(),
                not_after: unix(c.not_after),
            })
            .collect(),
        config: options,
    };
    serde_json::to_value(&dump).unwrap_or_else(|e| {
        // Only a custom serializer failing could get here; say so rather than panic.
        json!({"error": format!("cannot serialize the configuration: {e}")})
    })
}

pub(crate) struct View {
    pub shared: Arc<Shared>,
    pub options: AgentOptions,
    pub agent_metrics: AgentMetrics,
    pub policy_metrics: crate::policy::metrics::Metrics,
    pub cert_metrics: crate::identity::metrics::Metrics,
    /// Set once the first state from the source has been applied.
    pub started: AtomicBool,
    /// Pods that should be enrolled and are not, with why.
    pub enrollment: super::enroll::Problems,
    /// The Kubernetes source, in Kubernetes mode.
    pub kube: Option<Arc<crate::k8s::KubeSource>>,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl AgentView for View {
    fn readiness(&self) -> Readiness {
        let mut problems = Vec::new();
        let (programs, enrolled) = match self.shared.capture.lock() {
            Ok(c) => (
                c.programs().iter().map(|p| (*p).to_owned()).collect(),
                c.enrolled().len(),
            ),
            Err(_) => {
                problems.push("capture state unavailable".to_owned());
                (Vec::new(), 0)
            }
        };
        if programs.is_empty() {
            problems.push("eBPF programs not attached".to_owned());
        }
        if let Some(kube) = &self.kube {
            let (pending, error) = kube.health();
            if !pending.is_empty() {
                problems.push(format!(
                    "waiting for the first list of {} from the API server",
                    pending.join(", ")
                ));
            }
            if let Some(error) = error {
                problems.push(error);
            }
        }
        if !self.started.load(Ordering::Acquire) {
            problems.push("still enrolling pods".to_owned());
        }
        for (pod, reason) in self
            .enrollment
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
        {
            problems.push(format!("pod {pod} not enrolled: {reason}"));
        }
        let certs = self.shared.certs.snapshot();
        let now = SystemTime::now();
        for pod in self.shared.state().local_pods() {
            let has_cert = certs
                .iter()
                .any(|c| c.identity == pod.identity && now < c.not_after);
            if !has_cert {
                problems.push(format!("no valid certificate for {}", pod.identity));
            }
        }
        Readiness {
            ready: problems.is_empty(),
            enrolled_pods: enrolled,
            programs_attached: programs,
            problems,
        }
    }

    fn config_dump(&self) -> Value {
        config_dump(
            &self.shared.state(),
            self.shared.source(),
            &self.shared.authorizer.snapshot().summary(),
            &self.shared.certs.snapshot(),
            &self.options,
        )
    }

    fn certs(&self) -> Value {
        let certs: Vec<Value> = self
            .shared
            .certs
            .certificates()
            .iter()
            .map(|c| {
                let chain: String = c.chain.iter().map(|d| pem_certificate(d)).collect();
                json!({
                    "identity": c.identity.to_string(),
                    "serial": c.serial,
                    "notBefore": unix(c.not_before),
                    "notAfter": unix(c.not_after),
                    "chainPem": chain,
                })
            })
            .collect();
        json!({ "certificates": certs })
    }

    fn worker_threads(&self) -> Option<usize> {
        Some(self.shared.shards.count())
    }

    fn refresh_metrics(&self) {
        self.agent_metrics.set_ready(self.readiness().ready);
        if let Ok(c) = self.shared.capture.lock() {
            self.agent_metrics.set_programs(c.programs());
            self.agent_metrics.set_enrolled_pods(c.enrolled().len());
            for (map, n) in c.map_entries() {
                self.agent_metrics.set_map_entries(map, n);
            }
            let s = c.sockmap_stats();
            self.agent_metrics
                .set_sockmap(crate::observability::metrics::SockmapFigures {
                    attached: s.attached,
                    attach_failures: s.attach_failures,
                    redirected_bytes: s.redirected_bytes,
                    tcp_fallbacks: s.tcp_fallbacks,
                });
            let links = c.link_stats();
            self.agent_metrics
                .set_upgrade(crate::observability::metrics::UpgradeFigures {
                    links_replaced: links.replaced,
                    link_replace_failures: links.failed,
                    maps_recreated: c.maps_recreated().len() as u64,
                });
        }
        if let Some(log) = &self.options.log {
            self.agent_metrics
                .set_log_lines_dropped(log.lines_dropped());
        }
        self.policy_metrics
            .sync(&self.shared.authorizer.decision_counts());
        self.cert_metrics.sync(&self.shared.certs);
    }
}
