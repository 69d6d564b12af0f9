//! The validated, indexed picture of the mesh that the data plane reads. Built whole from a
//! config and swapped whole on reload: readers hold an `Arc` snapshot and never see a
//! half-applied change.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use super::{ConfigError, MESH_DISABLED, MESH_ENABLED, MESH_LABEL, UnknownDestination};
use crate::identity::SpiffeId;
use crate::policy::{PolicySet, PolicyWarning};

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadEntry {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub identity: SpiffeId,
    pub labels: BTreeMap<String, String>,
    pub ips: Vec<IpAddr>,
    pub node: String,
    /// Kubernetes pod UID; `None` in local mode.
    pub uid: Option<String>,
    #[serde(serialize_with = "crate::observability::readable::option_path")]
    pub netns: Option<PathBuf>,
    pub interface: String,
    /// Enrolled: its namespace opted in, the pod did not opt out, it has an IP and is
    /// not hostNetwork.
    pub in_mesh: bool,
}

impl WorkloadEntry {
    /// The address HBONE peers dial: the first IP, port 15008.
    pub fn hbone_addr(&self) -> Option<SocketAddr> {
        self.ips
            .first()
            .map(|ip| SocketAddr::new(*ip, ambit_common::HBONE_PORT))
    }
}

#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntry {
    pub name: String,
    pub namespace: String,
    pub vip: IpAddr,
    /// Workloads in the service's namespace matching its selector, by name.
    #[serde(serialize_with = "endpoint_names")]
    pub endpoints: Vec<Arc<WorkloadEntry>>,
}

/// Endpoints in the config dump: `namespace/name`, not the whole workload again.
fn endpoint_names<S: serde::Serializer>(
    endpoints: &[Arc<WorkloadEntry>],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(
        endpoints
            .iter()
            .map(|e| format!("{}/{}", e.namespace, e.name)),
    )
}

/// A service and its `(port, target port)` pairs.
pub type ServicePorts = (Arc<ServiceEntry>, Vec<(u16, u16)>);

/// Where a captured outbound connection goes, decided without I/O.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Through HBONE to the destination workload's agent.
    Hbone {
        workload: Arc<WorkloadEntry>,
        /// The CONNECT `:authority`: the workload's IP and (target) port.
        target: SocketAddr,
        hbone_addr: SocketAddr,
    },
    /// A plain TCP connection (destination outside the mesh).
    Direct { target: SocketAddr },
    /// Refused: unknown destination under `deny`, or a service with no endpoints.
    Deny { reason: &'static str },
}

#[derive(Debug)]
pub struct MeshState {
    pub trust_domain: String,
    pub root_namespace: String,
    pub node: String,
    pub unknown_destination: UnknownDestination,
    pub excluded_ports: Vec<u16>,
    pub revoke_on_policy_change: bool,
    workloads: Vec<Arc<WorkloadEntry>>,
    by_ip: HashMap<IpAddr, Arc<WorkloadEntry>>,
    by_name: HashMap<(String, String), Arc<WorkloadEntry>>,
    services: HashMap<(IpAddr, u16), (Arc<ServiceEntry>, u16)>,
    policies: Arc<PolicySet>,
    warnings: Vec<PolicyWarning>,
}

/// What a source of truth (the local-mode file, the Kubernetes API) says the mesh is.
/// [`MeshState::build`] validates and indexes it; both sources hand over the same shape.
#[derive(Debug, Clone)]
pub struct MeshSpec {
    pub settings: MeshSettings,
    /// Namespace name → its labels.
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    pub workloads: Vec<WorkloadSpec>,
    pub services: Vec<ServiceSpec>,
    pub policies: PolicySet,
    /// Warnings from loading the policies; kept with the state they describe.
    pub warnings: Vec<PolicyWarning>,
}

/// Mesh-wide settings (local mode: the `AmbitLocalConfig` document; Kubernetes: flags).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshSettings {
    pub trust_domain: String,
    pub root_namespace: String,
    pub unknown_destination: UnknownDestination,
    pub excluded_ports: Vec<u16>,
    pub revoke_on_policy_change: bool,
}

impl Default for MeshSettings {
    fn default() -> Self {
        Self {
            trust_domain: crate::identity::DEFAULT_TRUST_DOMAIN.to_owned(),
            root_namespace: "istio-system".to_owned(),
            unknown_destination: UnknownDestination::default(),
            excluded_ports: Vec::new(),
            revoke_on_policy_change: true,
        }
    }
}

/// One pod as a source describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadSpec {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub ips: Vec<IpAddr>,
    pub node: String,
    /// Kubernetes pod UID (none in local mode).
    pub uid: Option<String>,
    /// Known network-namespace path (local mode); Kubernetes pods are found by the agent.
    pub netns: Option<PathBuf>,
    pub interface: Option<String>,
    /// A hostNetwork pod shares the node's network: never enrolled.
    pub host_network: bool,
}

/// One service as a source describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    pub name: String,
    pub namespace: String,
    pub vips: Vec<IpAddr>,
    /// `(port, target port)` pairs.
    pub ports: Vec<(u16, u16)>,
    pub selector: BTreeMap<String, String>,
    /// Endpoint addresses when the source knows them (EndpointSlices); otherwise the
    /// workloads of the service's namespace matching `selector`.
    pub endpoints: Option<Vec<IpAddr>>,
}

impl MeshState {
    /// Validates and indexes what a source described, as seen from `node`.
    pub fn build(spec: MeshSpec, node: &str) -> Result<Self, ConfigError> {
        let MeshSpec {
            settings,
            namespaces,
            workloads: workload_specs,
            services: service_specs,
            policies,
            warnings,
        } = spec;
        let mut workloads = Vec::new();
        let mut by_ip: HashMap<IpAddr, Arc<WorkloadEntry>> = HashMap::new();
        let mut names = HashSet::new();
        for (i, w) in workload_specs.into_iter().enumerate() {
            let place = format!("workloads[{i}] ({}/{})", w.namespace, w.name);
            if w.name.is_empty() || w.namespace.is_empty() || w.node.is_empty() {
                return Err(invalid(
                    place,
                    "name, namespace and node must not be empty".into(),
                ));
            }
            if !names.insert((w.namespace.clone(), w.name.clone())) {
                return Err(invalid(place, "workload listed twice".into()));
            }
            let namespace_enabled = namespaces
                .get(&w.namespace)
                .and_then(|labels| labels.get(MESH_LABEL))
                .is_some_and(|v| v == MESH_ENABLED);
            let pod_opted_out = w.labels.get(MESH_LABEL).is_some_and(|v| v == MESH_DISABLED);
            let identity = SpiffeId::new(&settings.trust_domain, &w.namespace, &w.service_account)
                .map_err(|e| invalid(place.clone(), e.to_string()))?;
            let entry = Arc::new(WorkloadEntry {
                in_mesh: namespace_enabled
                    && !pod_opted_out
                    && !w.host_network
                    && !w.ips.is_empty(),
                name: w.name,
                namespace: w.namespace,
                service_account: w.service_account,
                identity,
                labels: w.labels,
                ips: w.ips,
                node: w.node,
                uid: w.uid,
                netns: w.netns,
                interface: w.interface.unwrap_or_else(|| "eth0".into()),
            });
            for ip in &entry.ips {
                if let Some(other) = by_ip.insert(*ip, entry.clone()) {
                    return Err(invalid(
                        place,
                        format!(
                            "IP {ip} is already used by {}/{}",
                            other.namespace, other.name
                        ),
                    ));
                }
            }
            workloads.push(entry);
        }
        let mut services = HashMap::new();
        for (i, s) in service_specs.into_iter().enumerate() {
            let place = format!("services[{i}] ({}/{})", s.namespace, s.name);
            if s.ports.is_empty() {
                return Err(invalid(place, "needs at least one port".into()));
            }
            let mut endpoints: Vec<Arc<WorkloadEntry>> = match &s.endpoints {
                Some(ips) => {
                    let mut found: Vec<Arc<WorkloadEntry>> =
                        ips.iter().filter_map(|ip| by_ip.get(ip).cloned()).collect();
                    found.dedup_by(|a, b| Arc::ptr_eq(a, b));
                    found
                }
                None => workloads
                    .iter()
                    .filter(|w| {
                        w.namespace == s.namespace
                            && !s.selector.is_empty()
                            && s.selector.iter().all(|(k, v)| w.labels.get(k) == Some(v))
                    })
                    .cloned()
                    .collect(),
            };
            endpoints.sort_by(|a, b| a.name.cmp(&b.name));
            endpoints.dedup_by(|a, b| Arc::ptr_eq(a, b));
            for vip in &s.vips {
                let entry = Arc::new(ServiceEntry {
                    name: s.name.clone(),
                    namespace: s.namespace.clone(),
                    vip: *vip,
                    endpoints: endpoints.clone(),
                });
                for (port, target_port) in &s.ports {
                    if services
                        .insert((*vip, *port), (entry.clone(), *target_port))
                        .is_some()
                    {
                        return Err(invalid(
                            place.clone(),
                            format!("{vip}:{port} is declared twice"),
                        ));
                    }
                }
            }
        }
        let by_name = workloads
            .iter()
            .map(|w| ((w.namespace.clone(), w.name.clone()), w.clone()))
            .collect();
        Ok(Self {
            trust_domain: settings.trust_domain,
            root_namespace: settings.root_namespace,
            node: node.to_string(),
            unknown_destination: settings.unknown_destination,
            excluded_ports: settings.excluded_ports,
            revoke_on_policy_change: settings.revoke_on_policy_change,
            workloads,
            by_ip,
            by_name,
            services,
            policies: Arc::new(policies),
            warnings,
        })
    }

    /// The mesh-wide settings this state was built with.
    pub fn settings(&self) -> MeshSettings {
        MeshSettings {
            trust_domain: self.trust_domain.clone(),
            root_namespace: self.root_namespace.clone(),
            unknown_destination: self.unknown_destination,
            excluded_ports: self.excluded_ports.clone(),
            revoke_on_policy_change: self.revoke_on_policy_change,
        }
    }

    /// Warnings of the policies in force (kept with the state, so the config dump shows
    /// what was loaded, not what a file says now).
    pub fn warnings(&self) -> &[PolicyWarning] {
        &self.warnings
    }

    /// Whether any workload in the configuration (enrolled or not) is on this node; false
    /// usually means `--node` does not match the file.
    pub fn node_known(&self) -> bool {
        self.workloads.iter().any(|w| w.node == self.node)
    }

    /// Enrolled workloads this node's agent serves.
    pub fn local_pods(&self) -> impl Iterator<Item = &Arc<WorkloadEntry>> {
        self.workloads
            .iter()
            .filter(|w| w.node == self.node && w.in_mesh)
    }

    pub fn workloads(&self) -> &[Arc<WorkloadEntry>] {
        &self.workloads
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<WorkloadEntry>> {
        self.by_ip.get(&ip)
    }

    /// A workload by namespace and name (what the policy authorizer needs for labels, on
    /// every connection: an index, not a scan).
    pub fn workload_by_name(&self, namespace: &str, name: &str) -> Option<&Arc<WorkloadEntry>> {
        self.by_name.get(&(namespace.to_owned(), name.to_owned()))
    }

    pub fn policies(&self) -> &Arc<PolicySet> {
        &self.policies
    }

    /// The service whose VIP and port are `addr`, if any.
    pub fn service_at(&self, addr: SocketAddr) -> Option<&Arc<ServiceEntry>> {
        self.services.get(&(addr.ip(), addr.port())).map(|(s, _)| s)
    }

    /// Every service with its ports as `(port, target port)`, sorted by namespace and name.
    pub fn services(&self) -> Vec<ServicePorts> {
        let mut by_name: BTreeMap<(String, String), ServicePorts> = BTreeMap::new();
        for ((_, port), (service, target)) in &self.services {
            by_name
                .entry((service.namespace.clone(), service.name.clone()))
                .or_insert_with(|| (service.clone(), Vec::new()))
                .1
                .push((*port, *target));
        }
        by_name
            .into_values()
            .map(|(s, mut ports)| {
                ports.sort_unstable();
                (s, ports)
            })
            .collect()
    }

    /// Routes a connection to `destination`; `pick` spreads load over a service's endpoints
    /// (the caller passes a counter or a random number).
    pub fn route(&self, destination: SocketAddr, pick: usize) -> Route {
        if let Some(workload) = self.by_ip.get(&destination.ip()) {
            return to_workload(workload, destination);
        }
        if let Some((service, target_port)) =
            self.services.get(&(destination.ip(), destination.port()))
        {
            if service.endpoints.is_empty() {
                return Route::Deny {
                    reason: "service has no endpoints",
                };
            }
            let endpoint = &service.endpoints[pick % service.endpoints.len()];
            return match endpoint.ips.first() {
                Some(ip) => to_workload(endpoint, SocketAddr::new(*ip, *target_port)),
                None => Route::Deny {
                    reason: "endpoint has no address",
                },
            };
        }
        match self.unknown_destination {
            UnknownDestination::Passthrough => Route::Direct {
                target: destination,
            },
            UnknownDestination::Deny => Route::Deny {
                reason: "destination outside the mesh",
            },
        }
    }
}

fn to_workload(workload: &Arc<WorkloadEntry>, target: SocketAddr) -> Route {
    match (workload.in_mesh, workload.hbone_addr()) {
        (true, Some(hbone_addr)) => Route::Hbone {
            workload: workload.clone(),
            target,
            hbone_addr: SocketAddr::new(target.ip(), hbone_addr.port()),
        },
        _ => Route::Direct { target },
    }
}

fn invalid(place: String, problem: String) -> ConfigError {
    ConfigError::Invalid { place, problem }
}

#[cfg(test)]
mod membership_tests {
    use super::*;

    fn pod(name: &str, namespace: &str, node: &str) -> WorkloadSpec {
        WorkloadSpec {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            service_account: "default".to_owned(),
            labels: BTreeMap::new(),
            ips: vec![IpAddr::from([
                10,
                1,
                name.len() as u8,
                name.bytes().last().unwrap_or(0),
            ])],
            node: node.to_owned(),
            uid: Some(format!("uid-{name}")),
            netns: None,
            interface: None,
            host_network: false,
        }
    }

    fn state(workloads: Vec<WorkloadSpec>) -> MeshState {
        let namespaces = BTreeMap::from([
            (
                "mesh".to_owned(),
                BTreeMap::from([(MESH_LABEL.to_owned(), MESH_ENABLED.to_owned())]),
            ),
            (
                "off".to_owned(),
                BTreeMap::from([(MESH_LABEL.to_owned(), "no".to_owned())]),
            ),
            ("plain".to_owned(), BTreeMap::new()),
        ]);
        let spec = MeshSpec {
            settings: MeshSettings::default(),
            namespaces,
            workloads,
            services: Vec::new(),
            policies: PolicySet::from_documents(Vec::new(), "default", "istio-system")
                .expect("empty set")
                .0,
            warnings: Vec::new(),
        };
        MeshState::build(spec, "node-1").expect("state")
    }

    fn local(state: &MeshState) -> Vec<&str> {
        state.local_pods().map(|w| w.name.as_str()).collect()
    }

    #[test]
    fn enrolled_needs_label_node_ip_no_host_network_and_no_opt_out() {
        let mut opted_out = pod("optout", "mesh", "node-1");
        opted_out
            .labels
            .insert(MESH_LABEL.to_owned(), MESH_DISABLED.to_owned());
        let mut host = pod("hostnet", "mesh", "node-1");
        host.host_network = true;
        let mut no_ip = pod("noip", "mesh", "node-1");
        no_ip.ips.clear();
        let s = state(vec![
            pod("in", "mesh", "node-1"),
            pod("elsewhere", "mesh", "node-2"),
            pod("plainpod", "plain", "node-1"),
            pod("offpod", "off", "node-1"),
            pod("nons", "missing", "node-1"),
            opted_out,
            host,
            no_ip,
        ]);
        assert_eq!(local(&s), ["in"]);
        let elsewhere = s
            .workload_by_name("mesh", "elsewhere")
            .expect("peer on another node");
        assert!(
            elsewhere.in_mesh,
            "a peer pod on another node is still in the mesh"
        );
    }

    #[test]
    fn a_pod_label_other_than_disabled_does_not_opt_out() {
        let mut p = pod("in", "mesh", "node-1");
        p.labels.insert(MESH_LABEL.to_owned(), "enabled".to_owned());
        assert_eq!(local(&state(vec![p])), ["in"]);
    }

    #[test]
    fn explicit_endpoints_route_to_known_pods_only() {
        let mut spec_pods = vec![pod("a", "mesh", "node-1"), pod("bb", "mesh", "node-2")];
        spec_pods[1].labels.insert("app".into(), "x".into());
        let mut s = state(spec_pods);
        let vip = IpAddr::from([10, 96, 0, 1]);
        let services = vec![ServiceSpec {
            name: "svc".into(),
            namespace: "mesh".into(),
            vips: vec![vip],
            ports: vec![(80, 8080)],
            selector: BTreeMap::from([("app".to_owned(), "x".to_owned())]),
            endpoints: Some(vec![
                IpAddr::from([10, 1, 1, b'a']),
                IpAddr::from([10, 9, 9, 9]),
            ]),
        }];
        let spec = MeshSpec {
            settings: MeshSettings::default(),
            namespaces: BTreeMap::new(),
            workloads: s
                .workloads
                .iter()
                .map(|w| WorkloadSpec {
                    name: w.name.clone(),
                    namespace: w.namespace.clone(),
                    service_account: w.service_account.clone(),
                    labels: w.labels.clone(),
                    ips: w.ips.clone(),
                    node: w.node.clone(),
                    uid: w.uid.clone(),
                    netns: None,
                    interface: None,
                    host_network: false,
                })
                .collect(),
            services,
            policies: (*s.policies).clone(),
            warnings: Vec::new(),
        };
        s = MeshState::build(spec, "node-1").expect("state");
        let service = s.service_at(SocketAddr::new(vip, 80)).expect("service");
        let names: Vec<&str> = service.endpoints.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            ["a"],
            "EndpointSlice addresses win over the selector; unknown IPs are skipped"
        );
    }
}
