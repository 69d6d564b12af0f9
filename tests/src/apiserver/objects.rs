//! Builders for the objects tests put into the fake API server: k8s-openapi types for the
//! built-in kinds, JSON for the Istio CRDs (no typed crate for them is kept).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Namespace, Node, Pod, PodIP, PodSpec, PodStatus, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{Value, json};

fn labels(pairs: &[(&str, &str)]) -> Option<BTreeMap<String, String>> {
    (!pairs.is_empty()).then(|| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    })
}

fn meta(namespace: Option<&str>, name: &str, label_pairs: &[(&str, &str)]) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: namespace.map(str::to_string),
        labels: labels(label_pairs),
        ..Default::default()
    }
}

/// A Namespace with labels.
pub fn namespace(name: &str, label_pairs: &[(&str, &str)]) -> Namespace {
    Namespace {
        metadata: meta(None, name, label_pairs),
        ..Default::default()
    }
}

/// A Node with labels.
pub fn node(name: &str, label_pairs: &[(&str, &str)]) -> Node {
    Node {
        metadata: meta(None, name, label_pairs),
        ..Default::default()
    }
}

/// A Pod, built field by field: `pod("ns", "name").node("n1").ip("10.0.0.5").build()`.
#[derive(Clone, Debug)]
pub struct PodBuilder {
    namespace: String,
    name: String,
    uid: Option<String>,
    node: Option<String>,
    ips: Vec<String>,
    service_account: String,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
    host_network: bool,
    phase: String,
}

/// Starts a Running pod with service account "default".
pub fn pod(namespace: &str, name: &str) -> PodBuilder {
    PodBuilder {
        namespace: namespace.to_string(),
        name: name.to_string(),
        uid: None,
        node: None,
        ips: Vec::new(),
        service_account: "default".into(),
        labels: BTreeMap::new(),
        annotations: BTreeMap::new(),
        host_network: false,
        phase: "Running".into(),
    }
}

impl PodBuilder {
    /// A fixed uid (otherwise the server assigns one).
    pub fn uid(mut self, uid: &str) -> Self {
        self.uid = Some(uid.to_string());
        self
    }
    pub fn node(mut self, node: &str) -> Self {
        self.node = Some(node.to_string());
        self
    }
    /// Adds a pod IP; the first is status.podIP.
    pub fn ip(mut self, ip: &str) -> Self {
        self.ips.push(ip.to_string());
        self
    }
    pub fn service_account(mut self, sa: &str) -> Self {
        self.service_account = sa.to_string();
        self
    }
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.to_string(), value.to_string());
        self
    }
    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.annotations.insert(key.to_string(), value.to_string());
        self
    }
    pub fn host_network(mut self, host_network: bool) -> Self {
        self.host_network = host_network;
        self
    }
    /// Pending, Running, Succeeded, Failed.
    pub fn phase(mut self, phase: &str) -> Self {
        self.phase = phase.to_string();
        self
    }

    pub fn build(self) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(self.name),
                namespace: Some(self.namespace),
                uid: self.uid,
                labels: (!self.labels.is_empty()).then_some(self.labels),
                annotations: (!self.annotations.is_empty()).then_some(self.annotations),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: self.node,
                service_account_name: Some(self.service_account),
                host_network: self.host_network.then_some(true),
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some(self.phase),
                pod_ip: self.ips.first().cloned(),
                pod_ips: (!self.ips.is_empty())
                    .then(|| self.ips.into_iter().map(|ip| PodIP { ip }).collect()),
                ..Default::default()
            }),
        }
    }
}

/// A ClusterIP Service selecting pods by labels; ports are (name, port, targetPort), TCP.
pub fn service(
    namespace: &str,
    name: &str,
    selector: &[(&str, &str)],
    cluster_ip: &str,
    ports: &[(&str, i32, i32)],
) -> Service {
    Service {
        metadata: meta(Some(namespace), name, &[]),
        spec: Some(ServiceSpec {
            selector: labels(selector),
            cluster_ip: Some(cluster_ip.to_string()),
            cluster_ips: Some(vec![cluster_ip.to_string()]),
            type_: Some("ClusterIP".into()),
            ports: Some(
                ports
                    .iter()
                    .map(|(port_name, port, target)| ServicePort {
                        name: Some(port_name.to_string()),
                        port: *port,
                        target_port: Some(IntOrString::Int(*target)),
                        protocol: Some("TCP".into()),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// An IPv4 EndpointSlice of `service` (label kubernetes.io/service-name); endpoints are
/// (address, ready, target pod name), ports are (name, port), TCP.
pub fn endpoint_slice(
    namespace: &str,
    name: &str,
    service: &str,
    endpoints: &[(&str, bool, Option<&str>)],
    ports: &[(&str, i32)],
) -> EndpointSlice {
    EndpointSlice {
        metadata: meta(
            Some(namespace),
            name,
            &[("kubernetes.io/service-name", service)],
        ),
        address_type: "IPv4".into(),
        endpoints: endpoints
            .iter()
            .map(|(address, ready, target_pod)| Endpoint {
                addresses: vec![address.to_string()],
                conditions: Some(EndpointConditions {
                    ready: Some(*ready),
                    serving: Some(*ready),
                    terminating: Some(false),
                }),
                target_ref: target_pod.map(|pod| k8s_openapi::api::core::v1::ObjectReference {
                    kind: Some("Pod".into()),
                    name: Some(pod.to_string()),
                    namespace: Some(namespace.to_string()),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .collect(),
        ports: Some(
            ports
                .iter()
                .map(|(port_name, port)| EndpointPort {
                    name: Some(port_name.to_string()),
                    port: Some(*port),
                    protocol: Some("TCP".into()),
                    ..Default::default()
                })
                .collect(),
        ),
    }
}

/// A security.istio.io PeerAuthentication with `spec.mtls.mode` (STRICT, PERMISSIVE,
/// DISABLE) in `version` (v1 or v1beta1).
pub fn peer_authentication(namespace: &str, name: &str, version: &str, mode: &str) -> Value {
    json!({
        "apiVersion": format!("security.istio.io/{version}"),
        "kind": "PeerAuthentication",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"mtls": {"mode": mode}},
    })
}

/// A security.istio.io AuthorizationPolicy with the given spec in `version`.
pub fn authorization_policy(namespace: &str, name: &str, version: &str, spec: Value) -> Value {
    json!({
        "apiVersion": format!("security.istio.io/{version}"),
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    })
}
