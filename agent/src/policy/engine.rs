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

    fn matches(&self, value: &str) -> bool {
        match self {
            StrMatch::Any => true,
            StrMatch::Exact(s) => value == s,
            StrMatch::Prefix(p) => value.starts_with(p.as_str()),
            StrMatch::Suffix(s) => value.ends_with(s.as_str()),
        }
    }
}

pub(crate) const SPIFFE_SCHEME: &str = "spiffe://";

/// Namespace and service account of an identity of exactly the Istio form
/// `<td>/ns/<ns>/sa/<sa>` (ztunnel parses its peer identities that way).
pub(crate) fn principal_service_account(principal: &str) -> Option<(&str, &str)> {
    let mut parts = principal.split('/');
    let (_td, ns_key, ns, sa_key, sa) = (
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
    );
    (parts.next().is_none() && ns_key == "ns" && sa_key == "sa" && !ns.is_empty() && !sa.is_empty())
        .then_some((ns, sa))
}

/// A field that matches on the connection's identity, which a plaintext
/// connection does not have.
#[derive(Debug, Clone, Default)]
pub(crate) struct IdentityMatch {
    pub(crate) values: Vec<StrMatch>,
    pub(crate) negated: Vec<StrMatch>,
}

/// `serviceAccounts` entries: namespace and service account, both exact
/// (istiod sends them as such; there are no wildcards and the trust domain
/// is not compared).
#[derive(Debug, Clone, Default)]
pub(crate) struct ServiceAccountMatch {
    pub(crate) values: Vec<(String, String)>,
    pub(crate) negated: Vec<(String, String)>,
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
    pub(crate) service_accounts: ServiceAccountMatch,
    /// `ipBlocks` / `notIpBlocks` (`remoteIpBlocks` is an HTTP attribute in
    /// Istio's ambient translation and is handled like the other L7 fields).
    pub(crate) ips: IpMatch,
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
    /// (namespace, service account) of an Istio identity `<td>/ns/<ns>/sa/<sa>`.
    pub(crate) service_account: Option<(&'a str, &'a str)>,
    pub(crate) source_ip: IpAddr,
    pub(crate) destination_ip: IpAddr,
    pub(crate) destination_port: u16,
}

impl<'a> ConnFacts<'a> {
    pub(crate) fn new(conn: &Connection<'a>) -> Self {
        // As ztunnel does: policy principals are written without the scheme,
        // so it is stripped from the peer's identity, and a peer identity
        // without it matches no principal at all.
        let principal = conn
            .source_principal
            .and_then(|p| p.strip_prefix(SPIFFE_SCHEME));
        let service_account = principal.and_then(principal_service_account);
        ConnFacts {
            principal,
            namespace: service_account.map(|(ns, _)| ns),
            service_account,
            // Dual-stack sockets report IPv4 peers as ::ffff:a.b.c.d; policies
            // are written with plain IPv4 CIDRs.
            source_ip: conn.source_ip.to_canonical(),
            destination_ip: conn.destination_ip.to_canonical(),
            destination_port: conn.destination_port,
        }
    }
}

impl IdentityMatch {
    /// Istio's reading (ztunnel `rbac.rs`): a missing identity matches no
    /// value, so it fails a positive list and passes a negated one, in ALLOW
    /// rules as in DENY rules.
    fn matches(&self, value: Option<&str>) -> bool {
        let listed = |list: &[StrMatch]| value.is_some_and(|v| list.iter().any(|m| m.matches(v)));
        (self.values.is_empty() || listed(&self.values))
            && (self.negated.is_empty() || !listed(&self.negated))
    }
}

impl ServiceAccountMatch {
    /// Same reading as [`IdentityMatch::matches`].
    fn matches(&self, value: Option<(&str, &str)>) -> bool {
        let listed = |list: &[(String, String)]| {
            value.is_some_and(|(ns, sa)| list.iter().any(|(n, s)| n == ns && s == sa))
        };
        (self.values.is_empty() || listed(&self.values))
            && (self.negated.is_empty() || !listed(&self.negated))
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
    fn matches(&self, c: &ConnFacts<'_>) -> bool {
        self.principals.matches(c.principal)
            && self.namespaces.matches(c.namespace)
            && self.service_accounts.matches(c.service_account)
            && self.ips.matches(c.source_ip)
    }
}

impl ConditionMatch {
    fn matches(&self, c: &ConnFacts<'_>) -> bool {
        match self {
            ConditionMatch::SourceIp(m) => m.matches(c.source_ip),
            ConditionMatch::DestinationIp(m) => m.matches(c.destination_ip),
            ConditionMatch::DestinationPort(m) => m.matches(c.destination_port),
            ConditionMatch::SourcePrincipal(m) => m.matches(c.principal),
            ConditionMatch::SourceNamespace(m) => m.matches(c.namespace),
        }
    }
}

impl CompiledRule {
    fn matches(&self, c: &ConnFacts<'_>) -> bool {
        !self.never
            && (self.from.is_empty() || self.from.iter().any(|s| s.matches(c)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.ports.matches(c.destination_port)))
            && self.when.iter().all(|w| w.matches(c))
    }
}

impl CompiledAuthz {
    /// Index of the first matching rule.
    pub(crate) fn matching_rule(&self, c: &ConnFacts<'_>) -> Option<usize> {
        self.rules.iter().position(|r| r.matches(c))
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
