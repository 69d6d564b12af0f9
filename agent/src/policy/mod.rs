//! Pure L4 policy engine: Istio `PeerAuthentication` and
//! `AuthorizationPolicy` documents in, allow/deny decisions out.
//!
//! No I/O and no async: callers parse configuration once into a [`PolicySet`]
//! and ask it about each inbound connection to a local (destination)
//! workload. Semantics follow Istio ambient mode (ztunnel) at L4. Where an
//! Istio field cannot be enforced at L4 we fail closed and say so through a
//! [`PolicyWarning`]; the differences from Istio are listed on [`PolicySet`]
//! and in docs/POLICY.md.

mod authorizer;
mod bench;
pub mod cli;
mod compile;
mod engine;
mod istio;
pub mod metrics;

#[cfg(test)]
mod fixtures_tests;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

pub use authorizer::{DecisionKey, LabelLookup, PolicyAuthorizer, PolicySource};
pub use bench::{measure_decision_time, synthetic_decision, synthetic_policy_set};

use engine::{Action, CompiledAuthz, CompiledPeerAuth, ConnFacts, Indexed};

/// Namespace and name of a policy; displays as `ns/name`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyName {
    pub namespace: String,
    pub name: String,
}

impl PolicyName {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        PolicyName {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for PolicyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Effective inbound mTLS mode for a workload port.
///
/// `Disable` behaves like `Permissive` for inbound traffic at L4: the agent
/// still accepts mTLS (HBONE) when the peer offers it and plaintext when it
/// does not. In Istio, DISABLE mostly changes what *clients* send; an inbound
/// listener cannot refuse mTLS without breaking mesh peers that always use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MtlsMode {
    Strict,
    Permissive,
    Disable,
}

impl fmt::Display for MtlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MtlsMode::Strict => "STRICT",
            MtlsMode::Permissive => "PERMISSIVE",
            MtlsMode::Disable => "DISABLE",
        })
    }
}

/// The destination workload of a connection.
#[derive(Debug, Clone, Copy)]
pub struct Workload<'a> {
    pub namespace: &'a str,
    pub labels: &'a BTreeMap<String, String>,
}

/// What the agent knows about an inbound connection at L4.
#[derive(Debug, Clone, Copy)]
pub struct Connection<'a> {
    /// e.g. `spiffe://cluster.local/ns/a/sa/b`; `None` = plaintext, no identity.
    pub source_principal: Option<&'a str>,
    pub source_ip: IpAddr,
    pub destination_ip: IpAddr,
    /// The workload's target port.
    pub destination_port: u16,
}

/// Why a connection was allowed or denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DecisionReason {
    /// Plaintext connection to a port whose effective mTLS mode is STRICT.
    MtlsRequired,
    /// A DENY policy matched.
    DeniedByPolicy,
    /// An ALLOW policy matched.
    AllowedByPolicy,
    /// ALLOW policies apply to the workload but none matched.
    NoAllowPolicyMatched,
    /// DENY or AUDIT policies apply to the workload, no DENY matched, and no
    /// ALLOW policy applies.
    NoAllowPolicies,
    /// No AuthorizationPolicy applies to the workload at all.
    NoPolicies,
}

impl DecisionReason {
    /// Short snake_case form, stable for use as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            DecisionReason::MtlsRequired => "mtls_required",
            DecisionReason::DeniedByPolicy => "denied_by_policy",
            DecisionReason::AllowedByPolicy => "allowed_by_policy",
            DecisionReason::NoAllowPolicyMatched => "no_allow_policy_matched",
            DecisionReason::NoAllowPolicies => "no_allow_policies",
            DecisionReason::NoPolicies => "no_policies",
        }
    }
}

impl fmt::Display for DecisionReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The verdict for one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub reason: DecisionReason,
    /// The policy that decided (the PeerAuthentication for `MtlsRequired`;
    /// for `NoAllowPolicyMatched`, the first of the ALLOW policies that
    /// applied and did not match, e.g. a `spec: {}` allow-nothing policy).
    pub policy: Option<PolicyName>,
    /// For `NoAllowPolicyMatched`: every ALLOW policy that applied (none
    /// matched). Empty otherwise.
    pub unmatched_allow: Vec<PolicyName>,
    /// Index of the matching rule in that policy's `spec.rules`.
    pub rule: Option<usize>,
    /// AUDIT policies that matched; they never change the verdict. Empty
    /// when the connection was refused for lacking mTLS (no authorization
    /// policy was evaluated).
    pub audited: Vec<PolicyName>,
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.allowed { "ALLOW" } else { "DENY" };
        write!(f, "{verdict} ({})", self.reason)?;
        if self.unmatched_allow.len() > 1 {
            let names: Vec<String> = self
                .unmatched_allow
                .iter()
                .map(ToString::to_string)
                .collect();
            write!(f, " policies=[{}]", names.join(", "))?;
        } else if let Some(p) = &self.policy {
            write!(f, " policy={p}")?;
        }
        if let Some(r) = self.rule {
            write!(f, " rule={r}")?;
        }
        if !self.audited.is_empty() {
            let names: Vec<String> = self.audited.iter().map(ToString::to_string).collect();
            write!(f, " audited=[{}]", names.join(", "))?;
        }
        Ok(())
    }
}

/// Something the user should know about a policy that loaded: a field that
/// cannot be enforced at L4, an ignored policy, a conflict.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PolicyWarning {
    #[serde(serialize_with = "crate::observability::readable::display")]
    pub policy: PolicyName,
    /// `AuthorizationPolicy` or `PeerAuthentication`.
    pub kind: &'static str,
    pub message: String,
}

impl fmt::Display for PolicyWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.kind, self.policy, self.message)
    }
}

/// One enforced policy as the config dump shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PolicySummary {
    /// `AuthorizationPolicy` or `PeerAuthentication`.
    pub kind: &'static str,
    /// `namespace/name`.
    pub name: String,
    /// The AuthorizationPolicy's action, or the PeerAuthentication's mode.
    pub action: String,
}

/// Errors loading policies. Every variant names where the problem is.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("document {index}: invalid YAML: {source}")]
    Yaml {
        index: usize,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("document {index}: not a mapping")]
    NotAMapping { index: usize },
    #[error("document {index}: missing `kind`")]
    MissingKind { index: usize },
    #[error("document {index}: {kind} has malformed metadata: {source}")]
    BadMetadata {
        index: usize,
        kind: &'static str,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("document {index}: {kind} has no metadata.name")]
    MissingName { index: usize, kind: &'static str },
    #[error(
        "document {index}: {kind} with unsupported apiVersion {api_version:?} (expected security.istio.io/v1 or v1beta1)"
    )]
    UnsupportedApiVersion {
        index: usize,
        kind: &'static str,
        api_version: String,
    },
    #[error("document {index}: {kind} {policy}: {source}")]
    Malformed {
        index: usize,
        kind: &'static str,
        policy: PolicyName,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("{kind} {policy}: {field}: {message}")]
    Invalid {
        kind: &'static str,
        policy: PolicyName,
        field: String,
        message: String,
    },
}

pub(crate) const KIND_PA: &str = "PeerAuthentication";
pub(crate) const KIND_AP: &str = "AuthorizationPolicy";

/// Compiled, indexed policies. Cheap to clone (shared immutable data).
///
/// Semantics are Istio's as istiod translates them for ztunnel and ztunnel
/// matches them; docs/POLICY.md lists them field by field, and every place
/// where ambit differs and why. In short, the differences all fail closed:
/// - `targetRef`/`targetRefs` ALLOW policies (not sent to ztunnel by
///   istiod) are kept as ALLOW policies that match nothing in their scope;
///   DENY/AUDIT ones are ignored, as in Istio.
/// - A DENY rule whose source/operation holds only HTTP attributes matches
///   on what is left (Istio's ztunnel skips the empty match: no effect).
/// - Unknown rule fields are treated like HTTP attributes (ALLOW rule never
///   matches, DENY/AUDIT rule matches without them), and named in a warning.
/// - AUDIT policies are evaluated and reported, never changing the verdict.
/// - A DENY without rules loads (Istio's webhook refuses it) and denies
///   nothing, with a warning.
/// - PeerAuthentication ties at one level: the first by (namespace, name)
///   wins (Istio picks the oldest; files have no timestamps), warned when
///   visible at load.
/// - A later document with the same kind, namespace and name replaces the
///   earlier one (as `kubectl apply` would), with a warning.
#[derive(Debug, Clone)]
pub struct PolicySet {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    root_namespace: String,
    peer: Indexed<CompiledPeerAuth>,
    authz: Indexed<CompiledAuthz>,
    /// Documents of other kinds, by kind, skipped without error.
    skipped: BTreeMap<String, usize>,
}

impl PolicySet {
    /// Parse multi-document YAML; returns the set and warnings (never
    /// silently drops a policy). Empty documents (a bare `---`) are skipped,
    /// as kubectl does; documents of other kinds are skipped and counted.
    pub fn from_yaml(
        input: &str,
        default_namespace: &str,
        root_namespace: &str,
    ) -> Result<(PolicySet, Vec<PolicyWarning>), PolicyError> {
        use serde::Deserialize;
        let mut docs = Vec::new();
        for (index, de) in serde_yaml::Deserializer::from_str(input).enumerate() {
            let value = serde_yaml::Value::deserialize(de)
                .map_err(|source| PolicyError::Yaml { index, source })?;
            docs.push(value);
        }
        Self::from_documents(docs, default_namespace, root_namespace)
    }

    /// Same from already-parsed documents, for callers that read several
    /// files. Document indices in errors are positions in `docs`.
    pub fn from_documents(
        docs: Vec<serde_yaml::Value>,
        default_namespace: &str,
        root_namespace: &str,
    ) -> Result<(PolicySet, Vec<PolicyWarning>), PolicyError> {
        let built = compile::build(docs, default_namespace, root_namespace)?;
        let inner = Inner {
            root_namespace: root_namespace.to_owned(),
            peer: built.peer,
            authz: built.authz,
            skipped: built.skipped,
        };
        Ok((
            PolicySet {
                inner: Arc::new(inner),
            },
            built.warnings,
        ))
    }

    /// Effective inbound mTLS mode of a workload port (never UNSET; PERMISSIVE
    /// when no PeerAuthentication applies).
    pub fn mtls_mode(&self, workload: &Workload<'_>, port: u16) -> MtlsMode {
        engine::resolve_mtls(&self.inner.peer, &self.inner.root_namespace, workload, port).0
    }

    /// Decide on an inbound connection to `workload`.
    pub fn evaluate(&self, workload: &Workload<'_>, conn: &Connection<'_>) -> Decision {
        if conn.source_principal.is_none() {
            let (mode, pa) = engine::resolve_mtls(
                &self.inner.peer,
                &self.inner.root_namespace,
                workload,
                conn.destination_port,
            );
            if mode == MtlsMode::Strict {
                return Decision {
                    allowed: false,
                    reason: DecisionReason::MtlsRequired,
                    policy: pa,
                    unmatched_allow: Vec::new(),
                    rule: None,
                    audited: Vec::new(),
                };
            }
        }

        let facts = ConnFacts::new(conn);
        // Root-namespace policies are mesh-wide; for a workload in the root
        // namespace they are already in the mesh scope.
        let mut audited = Vec::new();
        let mut denied: Option<(&CompiledAuthz, usize)> = None;
        let mut allowed: Option<(&CompiledAuthz, usize)> = None;
        let mut any_applies = false;
        let mut unmatched_allow = Vec::new();
        let candidates = self
            .inner
            .authz
            .candidates(workload.namespace, workload.labels, true);
        for p in candidates {
            if !engine::selector_matches(p.selector.as_ref(), workload.labels) {
                continue;
            }
            any_applies = true;
            match p.action {
                Action::Audit => {
                    if p.matching_rule(&facts).is_some() {
                        audited.push(p.name.clone());
                    }
                }
                Action::Deny => {
                    if denied.is_none() {
                        denied = p.matching_rule(&facts).map(|r| (p, r));
                    }
                }
                Action::Allow => {
                    if allowed.is_none() {
                        allowed = p.matching_rule(&facts).map(|r| (p, r));
                        if allowed.is_none() {
                            unmatched_allow.push(p.name.clone());
                        }
                    }
                }
            }
        }

        let hit = |(p, r): (&CompiledAuthz, usize)| (Some(p.name.clone()), Some(r));
        let (allowed, reason, (policy, rule)) = if let Some(d) = denied {
            (false, DecisionReason::DeniedByPolicy, hit(d))
        } else if let Some(a) = allowed {
            (true, DecisionReason::AllowedByPolicy, hit(a))
        } else if !unmatched_allow.is_empty() {
            let first = unmatched_allow.first().cloned();
            (false, DecisionReason::NoAllowPolicyMatched, (first, None))
        } else if any_applies {
            (true, DecisionReason::NoAllowPolicies, (None, None))
        } else {
            (true, DecisionReason::NoPolicies, (None, None))
        };
        if allowed || reason != DecisionReason::NoAllowPolicyMatched {
            unmatched_allow.clear();
        }
        Decision {
            allowed,
            reason,
            policy,
            unmatched_allow,
            rule,
            audited,
        }
    }

    /// Human-readable account of a decision for `ambit policy check`.
    pub fn explain(&self, workload: &Workload<'_>, conn: &Connection<'_>) -> String {
        let decision = self.evaluate(workload, conn);
        let (mode, pa) = engine::resolve_mtls(
            &self.inner.peer,
            &self.inner.root_namespace,
            workload,
            conn.destination_port,
        );
        let pa = pa.map_or_else(|| "default".to_owned(), |p| p.to_string());
        let source = conn.source_principal.unwrap_or("<plaintext>");
        format!(
            "{source} ({}) -> {}:{} in {}: mtls={mode} (from {pa}); {decision}",
            conn.source_ip, conn.destination_ip, conn.destination_port, workload.namespace
        )
    }

    /// Number of enforced policies (PeerAuthentication + AuthorizationPolicy).
    pub fn len(&self) -> usize {
        self.inner.peer.items.len() + self.inner.authz.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Enforced policies, for diagnostics (the config dump).
    pub fn summary(&self) -> Vec<PolicySummary> {
        let peer = self.inner.peer.items.iter().map(|p| PolicySummary {
            kind: "PeerAuthentication",
            name: p.name.to_string(),
            action: format!("{:?}", p.mode),
        });
        let authz = self.inner.authz.items.iter().map(|a| PolicySummary {
            kind: "AuthorizationPolicy",
            name: a.name.to_string(),
            action: format!("{:?}", a.action),
        });
        peer.chain(authz).collect()
    }

    /// Documents of other kinds that were skipped, by kind.
    pub fn skipped_kinds(&self) -> &BTreeMap<String, usize> {
        &self.inner.skipped
    }

    /// Total number of skipped documents.
    pub fn skipped_documents(&self) -> usize {
        self.inner.skipped.values().sum()
    }
}
