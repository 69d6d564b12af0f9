//! From Kubernetes objects to the compact records the source caches, and from those records
//! to a [`MeshSpec`]. Pure functions: no client, no I/O, tested on their own.
//!
//! Only what routing, enrollment and policy need is kept (a cached Pod is a few hundred
//! bytes, not the several KiB of a full object with managed fields), so 10,000 pods fit
//! in a node agent's budget.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::DynamicObject;

use crate::config::{MeshSettings, MeshSpec, ServiceSpec, WorkloadSpec};
use crate::policy::{PolicyError, PolicySet};

/// Label EndpointSlices carry to name their Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceRecord {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRecord {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub node: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub ips: Vec<IpAddr>,
    pub host_network: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePortRecord {
    pub name: String,
    pub port: u16,
    pub target: IntOrString,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRecord {
    pub name: String,
    pub namespace: String,
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePortRecord>,
    pub selector: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceRecord {
    pub namespace: String,
    pub service: String,
    /// Port name → port number on the endpoints.
    pub ports: Vec<(String, u16)>,
    /// Addresses of the endpoints that are ready (or not known to be unready).
    pub addresses: Vec<IpAddr>,
}

/// An Istio policy document, kept as the policy module reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyRecord {
    pub namespace: String,
    pub name: String,
    pub document: serde_yaml::Value,
}

/// `namespace/name`, or `name` for cluster-scoped objects: the key of every cache.
pub fn key(namespace: Option<&str>, name: &str) -> String {
    match namespace {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_owned(),
    }
}

pub fn namespace(ns: &Namespace) -> Option<(String, NamespaceRecord)> {
    let name = ns.metadata.name.clone()?;
    Some((
        name.clone(),
        NamespaceRecord {
            name,
            labels: ns.metadata.labels.clone().unwrap_or_default(),
        },
    ))
}

/// A pod that holds (or will hold) an IP; finished pods are left out, since their IPs
/// may already belong to a new pod.
pub fn pod(pod: &Pod) -> Option<(String, PodRecord)> {
    let meta = &pod.metadata;
    let name = meta.name.clone()?;
    let namespace = meta.namespace.clone()?;
    let uid = meta.uid.clone()?;
    let spec = pod.spec.as_ref()?;
    let status = pod.status.as_ref();
    if status
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|phase| phase == "Succeeded" || phase == "Failed")
    {
        return None;
    }
    let mut ips: Vec<IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|ips| ips.iter().filter_map(|ip| ip.ip.parse().ok()).collect())
        .unwrap_or_default();
    if ips.is_empty()
        && let Some(ip) = status
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse().ok())
    {
        ips.push(ip);
    }
    Some((
        key(Some(&namespace), &name),
        PodRecord {
            uid,
            name,
            namespace,
            node: spec.node_name.clone().unwrap_or_default(),
            service_account: spec
                .service_account_name
                .clone()
                .filter(|sa| !sa.is_empty())
                .unwrap_or_else(|| "default".to_owned()),
            labels: meta.labels.clone().unwrap_or_default(),
            ips,
            host_network: spec.host_network.unwrap_or(false),
        },
    ))
}

pub fn service(service: &Service) -> Option<(String, ServiceRecord)> {
    let name = service.metadata.name.clone()?;
    let namespace = service.metadata.namespace.clone()?;
    let spec = service.spec.as_ref()?;
    let mut vips: Vec<IpAddr> = spec
        .cluster_ips
        .as_ref()
        .map(|ips| ips.iter().filter_map(|ip| ip.parse().ok()).collect())
        .unwrap_or_default();
    if vips.is_empty()
        && let Some(ip) = spec.cluster_ip.as_deref().and_then(|ip| ip.parse().ok())
    {
        vips.push(ip);
    }
    let ports = spec
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().is_none_or(|proto| proto == "TCP"))
        .filter_map(|p| {
            Some(ServicePortRecord {
                name: p.name.clone().unwrap_or_default(),
                port: u16::try_from(p.port).ok()?,
                target: p.target_port.clone().unwrap_or(IntOrString::Int(p.port)),
            })
        })
        .collect();
    Some((
        key(Some(&namespace), &name),
        ServiceRecord {
            name,
            namespace,
            vips,
            ports,
            selector: spec.selector.clone().unwrap_or_default(),
        },
    ))
}

pub fn slice(slice: &EndpointSlice) -> Option<(String, SliceRecord)> {
    let name = slice.metadata.name.clone()?;
    let namespace = slice.metadata.namespace.clone()?;
    let service = slice
        .metadata
        .labels
        .as_ref()?
        .get(SERVICE_NAME_LABEL)?
        .clone();
    let ports = slice
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().is_none_or(|proto| proto == "TCP"))
        .filter_map(|p| {
            Some((
                p.name.clone().unwrap_or_default(),
                u16::try_from(p.port?).ok()?,
            ))
        })
        .collect();
    let addresses = slice
        .endpoints
        .iter()
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
        .flat_map(|e| e.addresses.iter().filter_map(|a| a.parse().ok()))
        .collect();
    Some((
        key(Some(&namespace), &name),
        SliceRecord {
            namespace,
            service,
            ports,
            addresses,
        },
    ))
}

/// An Istio policy object as the YAML document the policy module compiles.
pub fn policy(object: &DynamicObject, kind: &str) -> Option<(String, PolicyRecord)> {
    let name = object.metadata.name.clone()?;
    let namespace = object.metadata.namespace.clone()?;
    let api_version = object
        .types
        .as_ref()
        .map(|t| t.api_version.clone())
        .unwrap_or_else(|| "security.istio.io/v1".to_owned());
    let spec = object
        .data
        .get("spec")
        .cloned()
        .unwrap_or_else(|| serde_json::json!({}));
    let document = serde_json::json!({
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    });
    let document = serde_yaml::to_value(document).ok()?;
    Some((
        key(Some(&namespace), &name),
        PolicyRecord {
            namespace,
            name,
            document,
        },
    ))
}

/// Everything the source has cached, by kind.
#[derive(Debug, Default)]
pub struct Records<'a> {
    pub namespaces: Vec<&'a NamespaceRecord>,
    pub pods: Vec<&'a PodRecord>,
    pub services: Vec<&'a ServiceRecord>,
    pub slices: Vec<&'a SliceRecord>,
    pub policies: Vec<&'a PolicyRecord>,
}

/// What the CNI plugin told the agent about a pod whose IP the API server may not show
/// yet (the pod's status is written after its sandbox is up).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniHint {
    pub ips: Vec<IpAddr>,
}

/// Builds the source-neutral description of the mesh. Pods and services are sorted so
/// that the same cluster always gives the same spec.
pub fn mesh_spec(
    records: &Records<'_>,
    hints: &HashMap<String, CniHint>,
    settings: &MeshSettings,
) -> Result<MeshSpec, PolicyError> {
    let namespaces = records
        .namespaces
        .iter()
        .map(|ns| (ns.name.clone(), ns.labels.clone()))
        .collect();
    let mut workloads: Vec<WorkloadSpec> = Vec::with_capacity(records.pods.len());
    let mut claimed: HashMap<IpAddr, usize> = HashMap::new();
    let mut pods = records.pods.clone();
    pods.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    for pod in pods {
        let mut ips = pod.ips.clone();
        if ips.is_empty()
            && let Some(hint) = hints.get(&key(Some(&pod.namespace), &pod.name))
        {
            ips = hint.ips.clone();
        }
        // hostNetwork pods share the node's IP: routing by IP would be ambiguous, so they
        // take part only as named workloads without addresses.
        if pod.host_network {
            ips.clear();
        }
        // Two pods can show one IP for a moment (a pod being replaced); the first by
        // name keeps it rather than the whole snapshot being refused.
        ips.retain(|ip| !claimed.contains_key(ip));
        for ip in &ips {
            claimed.insert(*ip, workloads.len());
        }
        workloads.push(WorkloadSpec {
            name: pod.name.clone(),
            namespace: pod.namespace.clone(),
            service_account: pod.service_account.clone(),
            labels: pod.labels.clone(),
            ips,
            node: if pod.node.is_empty() {
                "<unscheduled>".to_owned()
            } else {
                pod.node.clone()
            },
            uid: Some(pod.uid.clone()),
            netns: None,
            interface: None,
            host_network: pod.host_network,
        });
    }
    let mut slices_by_service: HashMap<(&str, &str), Vec<&SliceRecord>> = HashMap::new();
    for slice in &records.slices {
        slices_by_service
            .entry((slice.namespace.as_str(), slice.service.as_str()))
            .or_default()
            .push(slice);
    }
    let mut services: Vec<ServiceSpec> = Vec::new();
    let mut sorted = records.services.clone();
    sorted.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    for svc in sorted {
        if svc.vips.is_empty() {
            continue; // headless: clients dial pod IPs, which route as workloads
        }
        let slices = slices_by_service.get(&(svc.namespace.as_str(), svc.name.as_str()));
        let ports: Vec<(u16, u16)> = svc
            .ports
            .iter()
            .filter_map(|p| Some((p.port, target_port(p, slices.map(Vec::as_slice))?)))
            .collect();
        if ports.is_empty() {
            continue;
        }
        let endpoints = slices.map(|slices| {
            let mut ips: Vec<IpAddr> = slices
                .iter()
                .flat_map(|s| s.addresses.iter().copied())
                .collect();
            ips.sort_unstable();
            ips.dedup();
            ips
        });
        services.push(ServiceSpec {
            name: svc.name.clone(),
            namespace: svc.namespace.clone(),
            vips: svc.vips.clone(),
            ports,
            selector: svc.selector.clone(),
            endpoints,
        });
    }
    let mut policies = records.policies.clone();
    policies.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let documents = policies.iter().map(|p| p.document.clone()).collect();
    let (policies, warnings) =
        PolicySet::from_documents(documents, "default", &settings.root_namespace)?;
    Ok(MeshSpec {
        settings: settings.clone(),
        namespaces,
        workloads,
        services,
        policies,
        warnings,
    })
}

/// A service port's target on the endpoints: a number as given, or a named port looked
/// up in the EndpointSlices (which carry the resolved number). `None` when a named target
/// cannot be resolved yet.
fn target_port(port: &ServicePortRecord, slices: Option<&[&SliceRecord]>) -> Option<u16> {
    match &port.target {
        IntOrString::Int(n) => u16::try_from(*n).ok().filter(|n| *n != 0),
        IntOrString::String(name) => {
            let by_slice = slices?
                .iter()
                .flat_map(|s| s.ports.iter())
                .find(|(slice_port, _)| slice_port == &port.name)
                .map(|(_, number)| *number);
            by_slice.or_else(|| name.parse().ok())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodIP, PodSpec, PodStatus, ServicePort, ServiceSpec};
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn meta(ns: Option<&str>, name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.to_owned()),
            namespace: ns.map(str::to_owned),
            uid: Some(format!("uid-{name}")),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    fn k8s_pod(name: &str, ip: Option<&str>, phase: &str, host_network: bool) -> Pod {
        Pod {
            metadata: meta(Some("shop"), name, &[("app", name)]),
            spec: Some(PodSpec {
                node_name: Some("node-1".to_owned()),
                service_account_name: Some(name.to_owned()),
                host_network: Some(host_network),
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some(phase.to_owned()),
                pod_ips: ip.map(|ip| vec![PodIP { ip: ip.to_owned() }]),
                ..Default::default()
            }),
        }
    }

    fn settings() -> MeshSettings {
        MeshSettings::default()
    }

    #[test]
    fn pods_keep_what_routing_and_policy_need_and_finished_pods_are_dropped() {
        let (k, record) = pod(&k8s_pod("cart", Some("10.1.0.5"), "Running", false)).expect("pod");
        assert_eq!(k, "shop/cart");
        assert_eq!(record.ips, vec!["10.1.0.5".parse::<IpAddr>().expect("ip")]);
        assert_eq!(record.service_account, "cart");
        assert_eq!(record.node, "node-1");
        assert!(pod(&k8s_pod("done", Some("10.1.0.6"), "Succeeded", false)).is_none());
        assert!(pod(&k8s_pod("gone", Some("10.1.0.7"), "Failed", false)).is_none());
        let (_, pending) = pod(&k8s_pod("new", None, "Pending", false)).expect("pod");
        assert!(pending.ips.is_empty());
    }

    #[test]
    fn services_resolve_named_target_ports_through_endpoint_slices() {
        let svc = Service {
            metadata: meta(Some("shop"), "cart", &[]),
            spec: Some(ServiceSpec {
                cluster_ip: Some("10.96.0.10".to_owned()),
                selector: Some(BTreeMap::from([("app".to_owned(), "cart".to_owned())])),
                ports: Some(vec![
                    ServicePort {
                        name: Some("http".to_owned()),
                        port: 80,
                        target_port: Some(IntOrString::String("web".to_owned())),
                        ..Default::default()
                    },
                    ServicePort {
                        name: Some("admin".to_owned()),
                        port: 9000,
                        target_port: Some(IntOrString::Int(9090)),
                        ..Default::default()
                    },
                ]),
                ..Default::default()
            }),
            status: None,
        };
        let slice_obj = EndpointSlice {
            address_type: "IPv4".to_owned(),
            metadata: meta(Some("shop"), "cart-abc", &[(SERVICE_NAME_LABEL, "cart")]),
            endpoints: vec![
                Endpoint {
                    addresses: vec!["10.1.0.5".to_owned()],
                    ..Default::default()
                },
                Endpoint {
                    addresses: vec!["10.1.0.9".to_owned()],
                    conditions: Some(EndpointConditions {
                        ready: Some(false),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ],
            ports: Some(vec![EndpointPort {
                name: Some("http".to_owned()),
                port: Some(8080),
                ..Default::default()
            }]),
        };
        let (_, svc) = service(&svc).expect("service");
        let (_, slc) = slice(&slice_obj).expect("slice");
        let (_, cart) = pod(&k8s_pod("cart", Some("10.1.0.5"), "Running", false)).expect("pod");
        let records = Records {
            pods: vec![&cart],
            services: vec![&svc],
            slices: vec![&slc],
            ..Default::default()
        };
        let spec = mesh_spec(&records, &HashMap::new(), &settings()).expect("spec");
        let s = &spec.services[0];
        assert_eq!(s.ports, vec![(80, 8080), (9000, 9090)]);
        assert_eq!(
            s.endpoints,
            Some(vec!["10.1.0.5".parse::<IpAddr>().expect("ip")]),
            "unready endpoints are not routed to"
        );
    }

    #[test]
    fn cni_hint_gives_a_new_pod_its_ip_and_host_network_pods_have_none() {
        let (_, fresh) = pod(&k8s_pod("fresh", None, "Pending", false)).expect("pod");
        let (_, host) = pod(&k8s_pod("host", Some("192.168.0.2"), "Running", true)).expect("pod");
        let hints = HashMap::from([(
            "shop/fresh".to_owned(),
            CniHint {
                ips: vec!["10.1.0.8".parse().expect("ip")],
            },
        )]);
        let records = Records {
            pods: vec![&fresh, &host],
            ..Default::default()
        };
        let spec = mesh_spec(&records, &hints, &settings()).expect("spec");
        let by_name = |n: &str| {
            spec.workloads
                .iter()
                .find(|w| w.name == n)
                .expect("workload")
        };
        assert_eq!(by_name("fresh").ips, hints["shop/fresh"].ips);
        assert!(by_name("host").ips.is_empty());
        assert!(by_name("host").host_network);
    }

    #[test]
    fn a_duplicate_ip_is_kept_by_one_pod_instead_of_refusing_the_snapshot() {
        let (_, a) = pod(&k8s_pod("a", Some("10.1.0.5"), "Running", false)).expect("pod");
        let (_, b) = pod(&k8s_pod("b", Some("10.1.0.5"), "Running", false)).expect("pod");
        let records = Records {
            pods: vec![&b, &a],
            ..Default::default()
        };
        let spec = mesh_spec(&records, &HashMap::new(), &settings()).expect("spec");
        assert_eq!(spec.workloads[0].name, "a");
        assert_eq!(spec.workloads[0].ips.len(), 1);
        assert!(spec.workloads[1].ips.is_empty());
        crate::config::MeshState::build(spec, "node-1").expect("state builds");
    }

    #[test]
    fn istio_policies_go_through_the_policy_module() {
        let object: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "security.istio.io/v1",
            "kind": "PeerAuthentication",
            "metadata": {"name": "strict", "namespace": "shop"},
            "spec": {"mtls": {"mode": "STRICT"}},
        }))
        .expect("object");
        let (k, record) = policy(&object, "PeerAuthentication").expect("policy");
        assert_eq!(k, "shop/strict");
        let records = Records {
            policies: vec![&record],
            ..Default::default()
        };
        let spec = mesh_spec(&records, &HashMap::new(), &settings()).expect("spec");
        assert_eq!(spec.policies.len(), 1);
    }
}
