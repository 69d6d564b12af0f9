//! Compiled policies, the per-namespace index, and connection matching.
//!
//! Everything here is already validated: matching never fails and never
//! allocates beyond a small candidate list, so evaluation stays cheap on the
//! connection path.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;

use super::{Connection, MtlsMode, PolicyName, Workload};

/// A PeerAuthentication mode as written, before inheritance resolves UNSET.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ModeSetting {
    Unset,
    Strict,
    Permissive,
    Disable,
}

impl ModeSetting {
    pub(crate) fn effective(self) -> Option<MtlsMode> {
        match self {
            ModeSetting::Unset => None,
            ModeSetting::Strict => Some(MtlsMode::Strict),
            ModeSetting::Permissive => Some(MtlsMode::Permissive),
            ModeSetting::Disable => Some(MtlsMode::Disable),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct CompiledPeerAuth {
    pub(crate) name: PolicyName,
    /// `None` = namespace-wide (or mesh-wide in the root namespace).
    pub(crate) selector: Option<BTreeMap<String, String>>,
    pub(crate) mode: ModeSetting,
    pub(crate) port_modes: BTreeMap<u16, ModeSetting>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    Allow,
    Deny,
    Audit,
}

#[derive(Debug, Clone)]
pub(crate) struct CompiledAuthz {
    pub(crate) name: PolicyName,
    pub(crate) action: Action,
    pub(crate) selector: Option<BTreeMap<String, String>>,
    /// Index in this vector is the rule index in `spec.rules`.
    pub(crate) rules: Vec<CompiledRule>,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct CompiledRule {
    /// Set for ALLOW rules that use L7 fields: they can never be proven to
    /// match at L4, so failing closed means never matching.
    pub(crate) never: bool,
    /// Empty = any source (ORed when non-empty).
    pub(crate) from: Vec<SourceMatch>,
    /// Empty = any operation (ORed when non-empty).
    pub(crate) to: Vec<OperationMatch>,
    /// All must hold.
    pub(crate) when: Vec<ConditionMatch>,
}

/// Wildcard string pattern as Istio defines it for principals and namespaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StrMatch {
    Any,
    Exact(String),
    Prefix(String),
    Suffix(String),
}

impl StrMatch {
    pub(crate) fn parse(pattern: &str) -> StrMatch {
        if pattern == "*" {
            StrMatch::Any
        } else if let Some(suffix) = pattern.strip_prefix('*') {
            StrMatch::Suffix(suffix.to_owned())
        } else if let Some(prefix) = pattern.strip_suffix('*') {
            StrMatch::Prefix(prefix.to_owned())
        } else {
            StrMatch::Exact(pattern.to_owned())
        }
    }

    /// Principal patterns are compared without `spiffe://` so that both the
    /// Istio short form and full SPIFFE IDs work on either side.
    pub(crate) fn parse_principal(pattern: &str) -> StrMatch {
        StrMatch::parse(strip_spiffe(pattern))
    }

    fn matches(&self, value: &str) -> bool {
        match self {
            StrMatch::Any => true,
            StrMatch::Exact(s) => value == s,
            StrMatch::Prefix(p) => value.starts_with(p.as_str()),
            StrMatch::Suffix(s) => value.ends_with(s.as_str()),
        }
    }
}

pub(crate) fn strip_spiffe(s: &str) -> &str {
    s.strip_prefix("spiffe://").unwrap_or(s)
}

/// The namespace encoded in an Istio SPIFFE identity (`<td>/ns/<ns>/sa/<sa>`).
pub(crate) fn principal_namespace(principal: &str) -> Option<&str> {
    let rest = strip_spiffe(principal);
    let start = rest.find("/ns/")? + "/ns/".len();
    let tail = &rest[start..];
    let ns = tail.split('/').next()?;
    (!ns.is_empty()).then_some(ns)
}

/// A field that matches on the connection's identity, which a plaintext
/// connection does not have.
#[derive(Debug, Clone, Default)]
pub(crate) struct IdentityMatch {
    pub(crate) values: Vec<StrMatch>,
    pub(crate) negated: Vec<StrMatch>,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct IpMatch {
    pub(crate) values: Vec<IpNet>,
    pub(crate) negated: Vec<IpNet>,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct PortMatch {
    pub(crate) values: Vec<u16>,
    pub(crate) negated: Vec<u16>,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct SourceMatch {
    pub(crate) principals: IdentityMatch,
    pub(crate) namespaces: IdentityMatch,
    /// `ipBlocks` and `remoteIpBlocks` both land here: without a proxy in
    /// front there is no X-Forwarded-For, so the remote IP is the peer IP.
    pub(crate) ips: Vec<IpMatch>,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct OperationMatch {
    pub(crate) ports: PortMatch,
}

#[derive(Debug, Clone)]
pub(crate) enum ConditionMatch {
    SourceIp(IpMatch),
    DestinationIp(IpMatch),
    DestinationPort(PortMatch),
    SourcePrincipal(IdentityMatch),
    SourceNamespace(IdentityMatch),
}

/// What a connection offers to the matchers, computed once per evaluation.
pub(crate) struct ConnFacts<'a> {
    pub(crate) principal: Option<&'a str>,
    pub(crate) namespace: Option<&'a str>,
    pub(crate) source_ip: IpAddr,
    pub(crate) destination_ip: IpAddr,
    pub(crate) destination_port: u16,
}

impl<'a> ConnFacts<'a> {
    pub(crate) fn new(conn: &Connection<'a>) -> Self {
        let principal = conn.source_principal.map(strip_spiffe);
        ConnFacts {
            principal,
            namespace: principal.and_then(principal_namespace),
            // Dual-stack sockets report IPv4 peers as ::ffff:a.b.c.d; policies
            // are written with plain IPv4 CIDRs.
            source_ip: conn.source_ip.to_canonical(),
            destination_ip: conn.destination_ip.to_canonical(),
            destination_port: conn.destination_port,
        }
    }
}

impl IdentityMatch {
    /// `absent_matches_negated` decides what a negated list does with a missing
    /// identity: an absent identity is "not in the list" (Istio's reading,
    /// used for DENY/AUDIT, where matching more denies more), but for ALLOW we
    /// refuse to grant access on the strength of an identity we never saw.
    fn matches(&self, value: Option<&str>, absent_matches_negated: bool) -> bool {
        if !self.values.is_empty() {
            match value {
                Some(v) if self.values.iter().any(|m| m.matches(v)) => {}
                _ => return false,
            }
        }
        if !self.negated.is_empty() {
            match value {
                Some(v) => {
                    if self.negated.iter().any(|m| m.matches(v)) {
                        return false;
                    }
                }
                None => return absent_matches_negated,
            }
        }
        true
    }
}

impl IpMatch {
    fn matches(&self, ip: IpAddr) -> bool {
        (self.values.is_empty() || self.values.iter().any(|n| n.contains(&ip)))
            && !self.negated.iter().any(|n| n.contains(&ip))
    }
}

impl PortMatch {
    fn matches(&self, port: u16) -> bool {
        (self.values.is_empty() || self.values.contains(&port)) && !self.negated.contains(&port)
    }
}

impl SourceMatch {
    fn matches(&self, c: &ConnFacts<'_>, absent_matches_negated: bool) -> bool {
        self.principals.matches(c.principal, absent_matches_negated)
            && self.namespaces.matches(c.namespace, absent_matches_negated)
            && self.ips.iter().all(|m| m.matches(c.source_ip))
    }
}

impl ConditionMatch {
    fn matches(&self, c: &ConnFacts<'_>, absent_matches_negated: bool) -> bool {
        match self {
            ConditionMatch::SourceIp(m) => m.matches(c.source_ip),
            ConditionMatch::DestinationIp(m) => m.matches(c.destination_ip),
            ConditionMatch::DestinationPort(m) => m.matches(c.destination_port),
            ConditionMatch::SourcePrincipal(m) => m.matches(c.principal, absent_matches_negated),
            ConditionMatch::SourceNamespace(m) => m.matches(c.namespace, absent_matches_negated),
        }
    }
}

impl CompiledRule {
    fn matches(&self, c: &ConnFacts<'_>, absent_matches_negated: bool) -> bool {
        !self.never
            && (self.from.is_empty()
                || self
                    .from
                    .iter()
                    .any(|s| s.matches(c, absent_matches_negated)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.ports.matches(c.destination_port)))
            && self
                .when
                .iter()
                .all(|w| w.matches(c, absent_matches_negated))
    }
}

impl CompiledAuthz {
    /// Index of the first matching rule.
    pub(crate) fn matching_rule(&self, c: &ConnFacts<'_>) -> Option<usize> {
        let absent_matches_negated = self.action != Action::Allow;
        self.rules
            .iter()
            .position(|r| r.matches(c, absent_matches_negated))
    }
}

pub(crate) fn selector_matches(
    selector: Option<&BTreeMap<String, String>>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.is_none_or(|sel| sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

/// Indices of policies in one scope, bucketed so that a lookup only touches
/// policies whose selector could match the workload.
#[derive(Debug, Clone, Default)]
pub(crate) struct ScopeIndex {
    unselected: Vec<usize>,
    /// Keyed by one (the smallest) label of each policy's selector: a policy
    /// can only match a workload that carries that exact label.
    by_label: HashMap<String, HashMap<String, Vec<usize>>>,
}

impl ScopeIndex {
    pub(crate) fn insert(&mut self, idx: usize, selector: Option<&BTreeMap<String, String>>) {
        match selector.and_then(|s| s.iter().next()) {
            None => self.unselected.push(idx),
            Some((k, v)) => self
                .by_label
                .entry(k.clone())
                .or_default()
                .entry(v.clone())
                .or_default()
                .push(idx),
        }
    }

    /// Appends candidate indices (selector still to be checked by the caller).
    pub(crate) fn candidates(&self, labels: &BTreeMap<String, String>, out: &mut Vec<usize>) {
        out.extend_from_slice(&self.unselected);
        if self.by_label.is_empty() {
            return;
        }
        for (k, v) in labels {
            if let Some(bucket) = self.by_label.get(k).and_then(|m| m.get(v)) {
                out.extend_from_slice(bucket);
            }
        }
    }
}

/// Policies of one kind, stored once and indexed by the scope they apply to.
#[derive(Debug, Clone)]
pub(crate) struct Indexed<T> {
    pub(crate) items: Vec<T>,
    /// Applies to every namespace (root-namespace AuthorizationPolicies).
    pub(crate) mesh: ScopeIndex,
    pub(crate) by_namespace: HashMap<String, ScopeIndex>,
}

impl<T> Default for Indexed<T> {
    fn default() -> Self {
        Indexed {
            items: Vec::new(),
            mesh: ScopeIndex::default(),
            by_namespace: HashMap::new(),
        }
    }
}

impl<T> Indexed<T> {
    /// Candidate items for a workload, in insertion order (which the builder
    /// makes the (namespace, name) order), without duplicates.
    pub(crate) fn candidates<'s>(
        &'s self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
        include_mesh: bool,
    ) -> impl Iterator<Item = &'s T> + use<'s, T> {
        let mut idx = Vec::new();
        if include_mesh {
            self.mesh.candidates(labels, &mut idx);
        }
        if let Some(scope) = self.by_namespace.get(namespace) {
            scope.candidates(labels, &mut idx);
        }
        idx.sort_unstable();
        idx.dedup();
        idx.into_iter().filter_map(|i| self.items.get(i))
    }
}

/// Effective mode of a workload port and the PeerAuthentication that set it.
/// Precedence: workload port-level > workload > namespace > mesh; UNSET at a
/// level defers to the next one; nothing at all means PERMISSIVE.
pub(crate) fn resolve_mtls(
    peer: &Indexed<CompiledPeerAuth>,
    root_namespace: &str,
    workload: &Workload<'_>,
    port: u16,
) -> (MtlsMode, Option<PolicyName>) {
    let mut workload_level: Option<&CompiledPeerAuth> = None;
    let mut namespace_level: Option<&CompiledPeerAuth> = None;
    for pa in peer.candidates(workload.namespace, workload.labels, false) {
        // Candidates come in name order, so the first one found at a level is
        // the tie-break winner (the builder warns about such conflicts).
        match &pa.selector {
            Some(sel) if selector_matches(Some(sel), workload.labels) => {
                workload_level.get_or_insert(pa);
            }
            Some(_) => {}
            None => {
                namespace_level.get_or_insert(pa);
            }
        }
    }
    let mesh_level = peer
        .by_namespace
        .get(root_namespace)
        .and_then(|scope| scope.unselected.first())
        .and_then(|&i| peer.items.get(i));

    let mut chain: Vec<(ModeSetting, &PolicyName)> = Vec::with_capacity(4);
    if let Some(pa) = workload_level {
        if let Some(m) = pa.port_modes.get(&port) {
            chain.push((*m, &pa.name));
        }
        chain.push((pa.mode, &pa.name));
    }
    if let Some(pa) = namespace_level {
        chain.push((pa.mode, &pa.name));
    }
    if let Some(pa) = mesh_level {
        chain.push((pa.mode, &pa.name));
    }
    chain
        .into_iter()
        .find_map(|(m, name)| m.effective().map(|e| (e, Some(name.clone()))))
        .unwrap_or((MtlsMode::Permissive, None))
}
