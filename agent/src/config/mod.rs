//! Local mode: the whole mesh described in one YAML file, no Kubernetes needed.
//! docs/LOCAL-MODE.md documents the schema; `examples/local.yaml` is an example.
//!
//! The file is multi-document YAML: exactly one document of kind `AmbitLocalConfig`
//! (namespaces, workloads, services, settings) and any number of Istio
//! `PeerAuthentication` / `AuthorizationPolicy` documents, read unchanged. Parsing either
//! yields a complete [`MeshState`] or an error naming the document and place; nothing is
//! applied half-way.

mod state;
mod watch;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use serde::Deserialize;

pub use state::{
    MeshSettings, MeshSpec, MeshState, Route, ServiceEntry, ServiceSpec, WorkloadEntry,
    WorkloadSpec,
};
pub use watch::ConfigWatcher;

use crate::identity::{DEFAULT_TRUST_DOMAIN, SpiffeId};
use crate::policy::{PolicySet, PolicyWarning};

/// Namespace label that opts a namespace's pods into the mesh, and the pod label value
/// that opts one pod out again.
pub const MESH_LABEL: &str = "ambit.dev/mesh";
pub const MESH_ENABLED: &str = "enabled";
pub const MESH_DISABLED: &str = "disabled";
/// `kind` of the document that holds ambit's own settings.
pub const LOCAL_CONFIG_KIND: &str = "AmbitLocalConfig";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("YAML document {document}: {source}")]
    Yaml {
        document: usize,
        source: serde_yaml::Error,
    },
    #[error("no document of kind {LOCAL_CONFIG_KIND} in the file")]
    MissingLocalConfig,
    #[error("documents {first} and {second} are both of kind {LOCAL_CONFIG_KIND}; keep one")]
    DuplicateLocalConfig { first: usize, second: usize },
    #[error("{place}: {problem}")]
    Invalid { place: String, problem: String },
    #[error("policies: {0}")]
    Policy(#[from] crate::policy::PolicyError),
}

/// What to do with a captured connection to an address that is neither a mesh workload nor
/// a service.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownDestination {
    /// Connect directly, without HBONE (like Istio's passthrough).
    #[default]
    Passthrough,
    /// Refuse the connection.
    Deny,
}

/// The `AmbitLocalConfig` document.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalConfig {
    #[serde(default)]
    pub api_version: Option<String>,
    pub kind: String,
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// Where mesh-wide Istio policies live.
    #[serde(default = "default_root_namespace")]
    pub root_namespace: String,
    /// Namespace for Istio documents that name none.
    #[serde(default = "default_namespace")]
    pub default_namespace: String,
    #[serde(default)]
    pub namespaces: Vec<NamespaceConfig>,
    #[serde(default)]
    pub workloads: Vec<WorkloadConfig>,
    #[serde(default)]
    pub services: Vec<ServiceConfig>,
    #[serde(default)]
    pub outbound: OutboundConfig,
    #[serde(default)]
    pub authorization: AuthorizationConfig,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationConfig {
    /// Close live connections that a policy change no longer allows (as ztunnel does; on
    /// by default).
    #[serde(default = "yes")]
    pub revoke_on_policy_change: bool,
}

impl Default for AuthorizationConfig {
    fn default() -> Self {
        Self {
            revoke_on_policy_change: true,
        }
    }
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NamespaceConfig {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadConfig {
    pub name: String,
    pub namespace: String,
    #[serde(default = "default_service_account")]
    pub service_account: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub ips: Vec<IpAddr>,
    pub node: String,
    /// Path of the pod's network namespace (e.g. /run/netns/x or /proc/<pid>/ns/net).
    #[serde(default)]
    pub netns: Option<PathBuf>,
    /// The pod's interface toward its node (for reply routing); default `eth0`.
    #[serde(default)]
    pub interface: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceConfig {
    pub name: String,
    pub namespace: String,
    pub vip: IpAddr,
    pub ports: Vec<ServicePortConfig>,
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePortConfig {
    pub port: u16,
    pub target_port: u16,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutboundConfig {
    #[serde(default)]
    pub unknown_destination: UnknownDestination,
    /// Destination ports never captured.
    #[serde(default)]
    pub excluded_ports: Vec<u16>,
}

fn default_trust_domain() -> String {
    DEFAULT_TRUST_DOMAIN.to_string()
}
fn default_root_namespace() -> String {
    "istio-system".to_string()
}
fn default_namespace() -> String {
    "default".to_string()
}
fn default_service_account() -> String {
    "default".to_string()
}

/// Parses a local-mode file into a validated state for `node`, plus policy warnings.
pub fn parse(input: &str, node: &str) -> Result<(MeshState, Vec<PolicyWarning>), ConfigError> {
    // First pass: every document as a plain value (syntax errors carry line and column) and
    // find the one holding ambit's settings.
    let mut values = Vec::new();
    let mut config_doc = None;
    for (index, document) in serde_yaml::Deserializer::from_str(input).enumerate() {
        let value =
            serde_yaml::Value::deserialize(document).map_err(|source| ConfigError::Yaml {
                document: index,
                source,
            })?;
        let kind = value.get("kind").and_then(|k| k.as_str());
        if kind == Some(LOCAL_CONFIG_KIND) {
            if let Some(first) = config_doc {
                return Err(ConfigError::DuplicateLocalConfig {
                    first,
                    second: index,
                });
            }
            config_doc = Some(index);
        } else {
            values.push(value);
        }
    }
    let config_index = config_doc.ok_or(ConfigError::MissingLocalConfig)?;
    // Second pass over that document alone, typed, so field errors keep their location.
    let config: LocalConfig = serde_yaml::Deserializer::from_str(input)
        .nth(config_index)
        .ok_or(ConfigError::MissingLocalConfig)
        .and_then(|doc| {
            LocalConfig::deserialize(doc).map_err(|source| ConfigError::Yaml {
                document: config_index,
                source,
            })
        })?;
    let (policies, warnings) =
        PolicySet::from_documents(values, &config.default_namespace, &config.root_namespace)?;
    let spec = local_spec(config, policies, warnings, node)?;
    let warnings = spec.warnings.clone();
    let state = MeshState::build(spec, node)?;
    Ok((state, warnings))
}

/// The local-mode file as a source-neutral [`MeshSpec`], with the checks only a
/// hand-written file needs (IPs present, netns of this node's pods given, no namespace
/// listed twice).
fn local_spec(
    config: LocalConfig,
    policies: PolicySet,
    warnings: Vec<PolicyWarning>,
    node: &str,
) -> Result<MeshSpec, ConfigError> {
    let mut namespaces = BTreeMap::new();
    for (i, ns) in config.namespaces.into_iter().enumerate() {
        if namespaces.contains_key(&ns.name) {
            return Err(ConfigError::Invalid {
                place: format!("namespaces[{i}]"),
                problem: format!("namespace {} listed twice", ns.name),
            });
        }
        namespaces.insert(ns.name, ns.labels);
    }
    let mut workloads = Vec::with_capacity(config.workloads.len());
    for (i, w) in config.workloads.into_iter().enumerate() {
        let place = format!("workloads[{i}] ({}/{})", w.namespace, w.name);
        if w.ips.is_empty() {
            return Err(ConfigError::Invalid {
                place,
                problem: "needs at least one IP in `ips`".into(),
            });
        }
        // Validated here too so the error names the file's place.
        workload_identity(&config.trust_domain, &w, i)?;
        let enrolled_here = w.node == node
            && namespaces
                .get(&w.namespace)
                .and_then(|labels| labels.get(MESH_LABEL))
                .is_some_and(|v| v == MESH_ENABLED)
            && w.labels.get(MESH_LABEL).is_none_or(|v| v != MESH_DISABLED);
        if enrolled_here && w.netns.is_none() {
            return Err(ConfigError::Invalid {
                place,
                problem: "an enrolled workload on this node needs `netns`".into(),
            });
        }
        workloads.push(WorkloadSpec {
            name: w.name,
            namespace: w.namespace,
            service_account: w.service_account,
            labels: w.labels,
            ips: w.ips,
            node: w.node,
            uid: None,
            netns: w.netns,
            interface: w.interface,
            host_network: false,
        });
    }
    let services = config
        .services
        .into_iter()
        .map(|s| ServiceSpec {
            name: s.name,
            namespace: s.namespace,
            vips: vec![s.vip],
            ports: s.ports.iter().map(|p| (p.port, p.target_port)).collect(),
            selector: s.selector,
            endpoints: None,
        })
        .collect();
    Ok(MeshSpec {
        settings: MeshSettings {
            trust_domain: config.trust_domain,
            root_namespace: config.root_namespace,
            unknown_destination: config.outbound.unknown_destination,
            excluded_ports: config.outbound.excluded_ports,
            revoke_on_policy_change: config.authorization.revoke_on_policy_change,
        },
        namespaces,
        workloads,
        services,
        policies,
        warnings,
    })
}

/// Builds the SPIFFE ID of a workload, naming the workload when a part is invalid.
fn workload_identity(
    trust_domain: &str,
    w: &WorkloadConfig,
    index: usize,
) -> Result<SpiffeId, ConfigError> {
    SpiffeId::new(trust_domain, &w.namespace, &w.service_account).map_err(|e| {
        ConfigError::Invalid {
            place: format!("workloads[{index}] ({}/{})", w.namespace, w.name),
            problem: e.to_string(),
        }
    })
}

#[cfg(test)]
mod tests;
