//! The validated, indexed picture of the mesh that the data plane reads. Built whole from a
//! config and swapped whole on reload: readers hold an `Arc` snapshot and never see a
//! half-applied change.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use super::{
    ConfigError, LocalConfig, MESH_DISABLED, MESH_ENABLED, MESH_LABEL, UnknownDestination,
    workload_identity,
};
use crate::identity::SpiffeId;
use crate::policy::PolicySet;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadEntry {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub identity: SpiffeId,
    pub labels: BTreeMap<String, String>,
    pub ips: Vec<IpAddr>,
    pub node: String,
    pub netns: Option<PathBuf>,
    pub interface: String,
    /// Enrolled: its namespace opted in and the pod did not opt out.
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

#[derive(Debug, Clone)]
pub struct ServiceEntry {
    pub name: String,
    pub namespace: String,
    pub vip: IpAddr,
    /// Workloads in the service's namespace matching its selector, by name.
    pub endpoints: Vec<Arc<WorkloadEntry>>,
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
}

impl MeshState {
    pub(super) fn build(
        config: LocalConfig,
        policies: PolicySet,
        node: &str,
    ) -> Result<Self, ConfigError> {
        let mut namespace_labels = HashMap::new();
        for (i, ns) in config.namespaces.iter().enumerate() {
            if namespace_labels
                .insert(ns.name.clone(), ns.labels.clone())
                .is_some()
            {
                return Err(invalid(
                    format!("namespaces[{i}]"),
                    format!("namespace {} listed twice", ns.name),
                ));
            }
        }
        let mut workloads = Vec::new();
        let mut by_ip: HashMap<IpAddr, Arc<WorkloadEntry>> = HashMap::new();
        let mut names = HashSet::new();
        for (i, w) in config.workloads.iter().enumerate() {
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
            if w.ips.is_empty() {
                return Err(invalid(place, "needs at least one IP in `ips`".into()));
            }
            let namespace_enabled = namespace_labels
                .get(&w.namespace)
                .and_then(|labels| labels.get(MESH_LABEL))
                .is_some_and(|v| v == MESH_ENABLED);
            let pod_opted_out = w.labels.get(MESH_LABEL).is_some_and(|v| v == MESH_DISABLED);
            let entry = Arc::new(WorkloadEntry {
                name: w.name.clone(),
                namespace: w.namespace.clone(),
                service_account: w.service_account.clone(),
                identity: workload_identity(&config.trust_domain, w, i)?,
                labels: w.labels.clone(),
                ips: w.ips.clone(),
                node: w.node.clone(),
                netns: w.netns.clone(),
                interface: w.interface.clone().unwrap_or_else(|| "eth0".into()),
                in_mesh: namespace_enabled && !pod_opted_out,
            });
            for ip in &w.ips {
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
            if entry.node == node && entry.in_mesh && entry.netns.is_none() {
                return Err(invalid(
                    place,
                    "an enrolled workload on this node needs `netns`".into(),
                ));
            }
            workloads.push(entry);
        }
        let mut services = HashMap::new();
        for (i, s) in config.services.iter().enumerate() {
            let place = format!("services[{i}] ({}/{})", s.namespace, s.name);
            if s.ports.is_empty() {
                return Err(invalid(place, "needs at least one port".into()));
            }
            let mut endpoints: Vec<Arc<WorkloadEntry>> = workloads
                .iter()
                .filter(|w| {
                    w.namespace == s.namespace
                        && !s.selector.is_empty()
                        && s.selector.iter().all(|(k, v)| w.labels.get(k) == Some(v))
                })
                .cloned()
                .collect();
            endpoints.sort_by(|a, b| a.name.cmp(&b.name));
            let entry = Arc::new(ServiceEntry {
                name: s.name.clone(),
                namespace: s.namespace.clone(),
                vip: s.vip,
                endpoints,
            });
            for port in &s.ports {
                if services
                    .insert((s.vip, port.port), (entry.clone(), port.target_port))
                    .is_some()
                {
                    return Err(invalid(
                        place,
                        format!("{}:{} is declared twice", s.vip, port.port),
                    ));
                }
            }
        }
        let by_name = workloads
            .iter()
            .map(|w| ((w.namespace.clone(), w.name.clone()), w.clone()))
            .collect();
        Ok(Self {
            trust_domain: config.trust_domain,
            root_namespace: config.root_namespace,
            node: node.to_string(),
            unknown_destination: config.outbound.unknown_destination,
            excluded_ports: config.outbound.excluded_ports,
            revoke_on_policy_change: config.authorization.revoke_on_policy_change,
            workloads,
            by_ip,
            by_name,
            services,
            policies: Arc::new(policies),
        })
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
