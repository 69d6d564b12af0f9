//! What the admin server sees of the running agent ([`AgentView`]), and the metric labels of
//! mesh workloads.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use super::{AgentOptions, Shared};
use crate::config::WorkloadEntry;
use crate::observability::{AgentMetrics, AgentView, Readiness, pem_certificate};
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
        let state = self.shared.state();
        let workloads: Vec<Value> = state
            .workloads()
            .iter()
            .map(|w| {
                json!({
                    "name": w.name, "namespace": w.namespace, "identity": w.identity.to_string(),
                    "serviceAccount": w.service_account, "labels": w.labels, "ips": w.ips,
                    "node": w.node, "inMesh": w.in_mesh, "local": w.node == state.node,
                })
            })
            .collect();
        let services: Vec<Value> = state
            .services()
            .iter()
            .map(|(s, ports)| {
                json!({
                    "name": s.name, "namespace": s.namespace, "vip": s.vip,
                    "ports": ports.iter().map(|(p, t)| json!({"port": p, "targetPort": t})).collect::<Vec<_>>(),
                    "endpoints": s.endpoints.iter().map(|e| format!("{}/{}", e.namespace, e.name)).collect::<Vec<_>>(),
                })
            })
            .collect();
        let policies: Vec<Value> = self
            .shared
            .authorizer
            .snapshot()
            .summary()
            .into_iter()
            .map(|(kind, name, action)| json!({"kind": kind, "name": name, "action": action}))
            .collect();
        // The warnings of the policies in force, kept with them.
        let warnings: Vec<String> = state.warnings().iter().map(ToString::to_string).collect();
        let certificates: Vec<Value> = self
            .shared
            .certs
            .snapshot()
            .iter()
            .map(|c| {
                json!({"identity": c.identity.to_string(), "serial": c.serial,
                       "notAfter": unix(c.not_after)})
            })
            .collect();
        let o = &self.options;
        let source = match &o.source {
            super::SourceOptions::File {
                path,
                reload_interval,
            } => json!({"config": path, "reloadIntervalMs": reload_interval.as_millis() as u64}),
            super::SourceOptions::Kubernetes(k) => json!({
                "kubeconfig": k.kubeconfig, "procRoot": k.proc_root, "cniSocket": k.cni_socket,
                "namespacesFile": k.namespaces_file, "trustDomain": k.settings.trust_domain,
                "rootNamespace": k.settings.root_namespace,
            }),
        };
        json!({
            "node": state.node,
            "source": self.shared.source(),
            "trustDomain": state.trust_domain,
            "workloads": workloads,
            "services": services,
            "policies": {"items": policies, "warnings": warnings},
            "certificates": certificates,
            "config": {
                "source": source, "pinDir": o.pin_dir, "stateDir": o.state_dir,
                "caCert": o.ca_cert, "certTtlSecs": o.cert_ttl.as_secs(),
                "adminAddr": o.admin_addr, "metricsAddr": o.metrics_addr,
                "readinessAddr": o.readiness_addr,
                "drainDeadlineSecs": o.drain_deadline.as_secs_f64(),
                "poolIdleSecs": o.tunnel.pool_idle_timeout.as_secs(),
                "pooling": o.tunnel.pooling,
                "tlsHandshakeTimeoutMs": o.tunnel.tls_handshake_timeout.as_millis() as u64,
                "hboneIdleTimeoutSecs": o.tunnel.hbone_idle_timeout.as_secs(),
                "maxHeaderListSize": o.tunnel.max_header_list_size,
                "remoteCa": o.remote_ca.as_ref().map(|c| c.address.clone()),
                "excludedPorts": state.excluded_ports,
            },
        })
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

    fn refresh_metrics(&self) {
        self.agent_metrics.set_ready(self.readiness().ready);
        if let Ok(c) = self.shared.capture.lock() {
            self.agent_metrics.set_programs(c.programs());
            self.agent_metrics.set_enrolled_pods(c.enrolled().len());
            for (map, n) in c.map_entries() {
                self.agent_metrics.set_map_entries(map, n);
            }
        }
        self.policy_metrics
            .sync(&self.shared.authorizer.decision_counts());
        self.cert_metrics.sync(&self.shared.certs);
    }
}
