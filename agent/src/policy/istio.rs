//! Serde mirror of the `security.istio.io` documents we read.
//!
//! Only the fields the engine looks at (or must recognise to refuse) are
//! declared. Fields of an AuthorizationPolicy that are not declared are not
//! an error (Istio keeps adding fields, and an agent that rejected them would
//! break on every upgrade) but are collected in `unknown`, so that the
//! compiler can fail closed on them and name them: a dropped field must never
//! widen a rule silently (a typo such as `principles` would otherwise turn
//! `from: [{source: {principles: [...]}}]` into "from anyone"). Enum-like
//! fields (`mode`, `action`) stay plain strings here so that the compiler can
//! reject unknown values with an error naming the policy and the field.

use std::collections::BTreeMap;

use serde::Deserialize;

/// A YAML scalar read as text. Kubernetes users write `8080` and `"8080"`
/// interchangeably for ports and label values; both must load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Scalar(pub(crate) String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            S(String),
            I(i64),
            U(u64),
            F(f64),
            B(bool),
        }
        Ok(Scalar(match Raw::deserialize(d)? {
            Raw::S(s) => s,
            Raw::I(i) => i.to_string(),
            Raw::U(u) => u.to_string(),
            Raw::F(f) => f.to_string(),
            Raw::B(b) => b.to_string(),
        }))
    }
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct Metadata {
    pub(crate) name: Option<String>,
    pub(crate) namespace: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Selector {
    pub(crate) match_labels: Option<BTreeMap<String, Scalar>>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct MtlsSpec {
    pub(crate) mode: Option<String>,
    /// Fields this agent does not know, by name (see the module comment).
    #[serde(flatten)]
    pub(crate) unknown: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct PeerAuthenticationSpec {
    pub(crate) selector: Option<Selector>,
    pub(crate) mtls: Option<MtlsSpec>,
    /// Keys are ports; YAML gives them as integers or strings, so they are
    /// parsed by the compiler where a bad key can be reported precisely.
    pub(crate) port_level_mtls: Option<serde_yaml::Mapping>,
    /// Fields this agent does not know, by name (see the module comment).
    #[serde(flatten)]
    pub(crate) unknown: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct AuthorizationPolicySpec {
    pub(crate) selector: Option<Selector>,
    /// Only presence matters: we cannot resolve Gateways/Services at L4.
    pub(crate) target_ref: Option<serde_yaml::Value>,
    pub(crate) target_refs: Option<Vec<serde_yaml::Value>>,
    pub(crate) action: Option<String>,
    pub(crate) rules: Option<Vec<Rule>>,
    /// Fields this agent does not know, by name (see the module comment).
    #[serde(flatten)]
    pub(crate) unknown: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct Rule {
    pub(crate) from: Option<Vec<From>>,
    pub(crate) to: Option<Vec<To>>,
    pub(crate) when: Option<Vec<Condition>>,
    /// Fields this agent does not know, by name (see the module comment).
    #[serde(flatten)]
    pub(crate) unknown: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct From {
    pub(crate) source: Option<Source>,
    /// Fields this agent does not know, by name (see the module comment).
    #[serde(flatten)]
    pub(crate) unknown: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Source {
    pub(crate) principals: Option<Vec<String>>,
    pub(crate) not_principals: Option<Vec<String>>,
    pub(crate) request_principals: Option<Vec<String>>,
    pub(crate) not_request_principals: Option<Vec<String>>,
    pub(crate) namespaces: Option<Vec<String>>,
    pub(crate) not_namespaces: Option<Vec<String>>,
    pub(crate) ip_blocks: Option<Vec<String>>,
    pub(crate) not_ip_blocks: Option<Vec<String>>,
    pub(crate) remote_ip_blocks: Option<Vec<String>>,
    pub(crate) not_remote_ip_blocks: Option<Vec<String>>,
    /// `ns/sa` or `sa` (the policy's namespace).
    pub(crate) service_accounts: Option<Vec<String>>,
    pub(crate) not_service_accounts: Option<Vec<String>>,
    /// Fields this agent does not know, by name (see the module comment).
    #[serde(flatten)]
    pub(crate) unknown: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct To {
    pub(crate) operation: Option<Operation>,
    /// Fields this agent does not know, by name (see the module comment).
    #[serde(flatten)]
    pub(crate) unknown: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Operation {
    pub(crate) hosts: Option<Vec<String>>,
    pub(crate) not_hosts: Option<Vec<String>>,
    pub(crate) ports: Option<Vec<Scalar>>,
    pub(crate) not_ports: Option<Vec<Scalar>>,
    pub(crate) methods: Option<Vec<String>>,
    pub(crate) not_methods: Option<Vec<String>>,
    pub(crate) paths: Option<Vec<String>>,
    pub(crate) not_paths: Option<Vec<String>>,
    /// Fields this agent does not know, by name (see the module comment).
    #[serde(flatten)]
    pub(crate) unknown: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Condition {
    pub(crate) key: String,
    pub(crate) values: Option<Vec<Scalar>>,
    pub(crate) not_values: Option<Vec<Scalar>>,
    /// Fields this agent does not know, by name (see the module comment).
    #[serde(flatten)]
    pub(crate) unknown: BTreeMap<String, serde_yaml::Value>,
}
