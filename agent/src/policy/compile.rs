//! Turning Istio documents into compiled, indexed policies.
//!
//! All validation happens here so that evaluation never has to fail.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use serde_yaml::Value;

use super::engine::{
    Action, CompiledAuthz, CompiledPeerAuth, CompiledRule, ConditionMatch, IdentityMatch, Indexed,
    IpMatch, ModeSetting, OperationMatch, PortMatch, SPIFFE_SCHEME, ServiceAccountMatch,
    SourceMatch, StrMatch,
};
use super::istio::{
    AuthorizationPolicySpec, Condition, Metadata, Operation, PeerAuthenticationSpec, Scalar,
    Selector, Source,
};
use super::{KIND_AP, KIND_PA, PolicyError, PolicyName, PolicyWarning};

pub(crate) struct Built {
    pub(crate) peer: Indexed<CompiledPeerAuth>,
    pub(crate) authz: Indexed<CompiledAuthz>,
    pub(crate) skipped: BTreeMap<String, usize>,
    pub(crate) warnings: Vec<PolicyWarning>,
}

struct Warnings(Vec<PolicyWarning>);

impl Warnings {
    fn push(&mut self, kind: &'static str, policy: &PolicyName, message: impl Into<String>) {
        self.0.push(PolicyWarning {
            policy: policy.clone(),
            kind,
            message: message.into(),
        });
    }
}

fn invalid(
    kind: &'static str,
    policy: &PolicyName,
    field: impl Into<String>,
    message: impl Into<String>,
) -> PolicyError {
    PolicyError::Invalid {
        kind,
        policy: policy.clone(),
        field: field.into(),
        message: message.into(),
    }
}

pub(crate) fn build(
    docs: Vec<Value>,
    default_namespace: &str,
    root_namespace: &str,
) -> Result<Built, PolicyError> {
    let mut warnings = Warnings(Vec::new());
    let mut skipped: BTreeMap<String, usize> = BTreeMap::new();
    // BTreeMaps give the (namespace, name) order that tie-breaks rely on.
    let mut pas: BTreeMap<PolicyName, (usize, Value)> = BTreeMap::new();
    let mut aps: BTreeMap<PolicyName, (usize, Value)> = BTreeMap::new();

    for (index, doc) in docs.into_iter().enumerate() {
        let mut map = match doc {
            Value::Mapping(m) => m,
            // An empty document (`---` followed by nothing) carries no
            // resource; kubectl accepts it too.
            Value::Null => continue,
            _ => return Err(PolicyError::NotAMapping { index }),
        };
        let kind = match map.get("kind") {
            Some(Value::String(k)) => k.clone(),
            _ => return Err(PolicyError::MissingKind { index }),
        };
        let kind: &'static str = match kind.as_str() {
            "PeerAuthentication" => KIND_PA,
            "AuthorizationPolicy" => KIND_AP,
            _ => {
                *skipped.entry(kind).or_default() += 1;
                continue;
            }
        };
        let api_version = map
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if !matches!(
            api_version,
            "security.istio.io/v1" | "security.istio.io/v1beta1"
        ) {
            return Err(PolicyError::UnsupportedApiVersion {
                index,
                kind,
                api_version: api_version.to_owned(),
            });
        }
        let metadata: Metadata = match map.remove("metadata") {
            None | Some(Value::Null) => Metadata::default(),
            Some(v) => serde_yaml::from_value(v).map_err(|source| PolicyError::BadMetadata {
                index,
                kind,
                source,
            })?,
        };
        let Some(name) = metadata.name.filter(|n| !n.is_empty()) else {
            return Err(PolicyError::MissingName { index, kind });
        };
        let namespace = metadata
            .namespace
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| default_namespace.to_owned());
        let policy = PolicyName::new(namespace, name);
        let spec = map.remove("spec").unwrap_or(Value::Null);
        let target = if kind == KIND_PA { &mut pas } else { &mut aps };
        if let Some((earlier, _)) = target.insert(policy.clone(), (index, spec)) {
            warnings.push(
                kind,
                &policy,
                format!("defined again in document {index}; it replaces document {earlier}"),
            );
        }
    }

    let mut peer = Indexed::default();
    for (policy, (index, spec)) in pas {
        let spec: PeerAuthenticationSpec = parse_spec(spec, index, KIND_PA, &policy)?;
        let pa = compile_peer_auth(policy, spec, &mut warnings)?;
        let i = peer.items.len();
        peer.by_namespace
            .entry(pa.name.namespace.clone())
            .or_default()
            .insert(i, pa.selector.as_ref());
        peer.items.push(pa);
    }
    warn_peer_conflicts(&peer.items, &mut warnings);

    let mut authz = Indexed::default();
    for (policy, (index, spec)) in aps {
        let spec: AuthorizationPolicySpec = parse_spec(spec, index, KIND_AP, &policy)?;
        let Some(ap) = compile_authz(policy, spec, root_namespace, &mut warnings)? else {
            continue;
        };
        let i = authz.items.len();
        if ap.name.namespace == root_namespace {
            authz.mesh.insert(i, ap.selector.as_ref());
        } else {
            authz
                .by_namespace
                .entry(ap.name.namespace.clone())
                .or_default()
                .insert(i, ap.selector.as_ref());
        }
        authz.items.push(ap);
    }

    Ok(Built {
        peer,
        authz,
        skipped,
        warnings: warnings.0,
    })
}

fn parse_spec<T: serde::de::DeserializeOwned + Default>(
    spec: Value,
    index: usize,
    kind: &'static str,
    policy: &PolicyName,
) -> Result<T, PolicyError> {
    if spec.is_null() {
        return Ok(T::default());
    }
    serde_yaml::from_value(spec).map_err(|source| PolicyError::Malformed {
        index,
        kind,
        policy: policy.clone(),
        source,
    })
}

/// An empty `matchLabels` selects every workload, same as no selector.
fn compile_selector(selector: Option<Selector>) -> Option<BTreeMap<String, String>> {
    let labels: BTreeMap<String, String> = selector?
        .match_labels?
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .collect();
    (!labels.is_empty()).then_some(labels)
}

fn parse_mode(
    mode: Option<&str>,
    policy: &PolicyName,
    field: &str,
) -> Result<ModeSetting, PolicyError> {
    Ok(match mode {
        None | Some("UNSET") => ModeSetting::Unset,
        Some("STRICT") => ModeSetting::Strict,
        Some("PERMISSIVE") => ModeSetting::Permissive,
        Some("DISABLE") => ModeSetting::Disable,
        Some(other) => {
            return Err(invalid(
                KIND_PA,
                policy,
                field,
                format!("unknown mode {other:?} (expected STRICT, PERMISSIVE, DISABLE or UNSET)"),
            ));
        }
    })
}

fn compile_peer_auth(
    name: PolicyName,
    spec: PeerAuthenticationSpec,
    warnings: &mut Warnings,
) -> Result<CompiledPeerAuth, PolicyError> {
    // A typo here (`mdoe: STRICT`) would leave the mode UNSET, i.e. inherited
    // and possibly PERMISSIVE: name it so that it cannot go unnoticed.
    let unknown: Vec<String> = spec
        .unknown
        .keys()
        .map(|k| format!("spec.{k}"))
        .chain(
            spec.mtls
                .iter()
                .flat_map(|m| m.unknown.keys().map(|k| format!("spec.mtls.{k}"))),
        )
        .collect();
    if !unknown.is_empty() {
        warnings.push(
            KIND_PA,
            &name,
            format!(
                "unknown fields (a typo?): {}; ignored, the mode is resolved without them",
                unknown.join(", ")
            ),
        );
    }
    let selector = compile_selector(spec.selector);
    let mode = parse_mode(
        spec.mtls.as_ref().and_then(|m| m.mode.as_deref()),
        &name,
        "spec.mtls.mode",
    )?;
    let mut port_modes = BTreeMap::new();
    let port_level = spec.port_level_mtls.unwrap_or_default();
    if !port_level.is_empty() && selector.is_none() {
        // Istio only honours port-level settings on workload policies, since
        // target ports mean nothing without a concrete workload.
        warnings.push(
            KIND_PA,
            &name,
            "portLevelMtls requires a workload selector; ignored",
        );
    } else {
        for (key, value) in port_level {
            let key_text = match &key {
                Value::Number(n) => n.to_string(),
                Value::String(s) => s.clone(),
                other => format!("{other:?}"),
            };
            let field = format!("spec.portLevelMtls.{key_text}");
            let port = parse_port(&key_text)
                .ok_or_else(|| invalid(KIND_PA, &name, &field, "expected a port 1-65535"))?;
            let mode = match value {
                Value::Null => None,
                Value::Mapping(m) => match m.get("mode") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(s)) => Some(s.clone()),
                    Some(_) => {
                        return Err(invalid(
                            KIND_PA,
                            &name,
                            format!("{field}.mode"),
                            "expected a string",
                        ));
                    }
                },
                _ => return Err(invalid(KIND_PA, &name, field, "expected a mapping")),
            };
            let mode = parse_mode(mode.as_deref(), &name, &format!("{field}.mode"))?;
            port_modes.insert(port, mode);
        }
    }
    Ok(CompiledPeerAuth {
        name,
        selector,
        mode,
        port_modes,
    })
}

/// Policies in one namespace at the same level with the same selector tie;
/// evaluation picks the first by name, and the user should hear about it.
fn warn_peer_conflicts(items: &[CompiledPeerAuth], warnings: &mut Warnings) {
    type Level<'a> = (&'a str, Option<&'a BTreeMap<String, String>>);
    let mut seen: BTreeMap<Level<'_>, &PolicyName> = BTreeMap::new();
    for pa in items {
        let key = (pa.name.namespace.as_str(), pa.selector.as_ref());
        if let Some(winner) = seen.get(&key) {
            let level = if pa.selector.is_some() {
                "the same selector"
            } else {
                "namespace-wide scope"
            };
            warnings.push(
                KIND_PA,
                &pa.name,
                format!("conflicts with {winner} ({level}); {winner} wins (first by name)"),
            );
        } else {
            seen.insert(key, &pa.name);
        }
    }
}

fn parse_port(s: &str) -> Option<u16> {
    s.trim().parse::<u16>().ok().filter(|p| *p != 0)
}

fn parse_ip_block(s: &str) -> Option<IpNet> {
    let s = s.trim();
    if s.contains('/') {
        IpNet::from_str(s).ok()
    } else {
        IpAddr::from_str(s).ok().map(IpNet::from)
    }
}

/// Compiles one policy; `None` means refused (with a warning).
fn compile_authz(
    name: PolicyName,
    spec: AuthorizationPolicySpec,
    root_namespace: &str,
    warnings: &mut Warnings,
) -> Result<Option<CompiledAuthz>, PolicyError> {
    let action = match spec.action.as_deref() {
        None | Some("ALLOW") => Action::Allow,
        Some("DENY") => Action::Deny,
        Some("AUDIT") => Action::Audit,
        Some("CUSTOM") => {
            warnings.push(
                KIND_AP,
                &name,
                "action CUSTOM (external authorization) is not supported; policy ignored",
            );
            return Ok(None);
        }
        Some(other) => {
            return Err(invalid(
                KIND_AP,
                &name,
                "spec.action",
                format!("unknown action {other:?} (expected ALLOW, DENY, AUDIT or CUSTOM)"),
            ));
        }
    };
    // `provider` belongs to CUSTOM, refused above. Other unknown spec fields
    // cannot be applied rule by rule; they are named, and the policy is
    // enforced as written without them.
    let spec_unknown: Vec<&str> = spec
        .unknown
        .keys()
        .map(String::as_str)
        .filter(|k| *k != "provider")
        .collect();
    if !spec_unknown.is_empty() {
        warnings.push(
            KIND_AP,
            &name,
            format!(
                "unknown fields in spec (a typo?): {}; ignored, the policy is enforced without them",
                spec_unknown.join(", ")
            ),
        );
    }
    let selector = compile_selector(spec.selector);
    let has_target_refs =
        spec.target_ref.is_some() || spec.target_refs.as_ref().is_some_and(|t| !t.is_empty());
    let raw_rules = spec.rules.unwrap_or_default();

    if has_target_refs {
        if action == Action::Allow {
            // Istio binds targetRef policies to a waypoint or gateway and
            // never sends them to ztunnel, so pod-to-pod traffic is as if the
            // policy did not exist. ambit runs no waypoint; rather than open
            // a namespace whose owner asked for an allow-list, it keeps the
            // policy as an ALLOW that matches nothing (fail closed).
            let scope = match (&selector, name.namespace == root_namespace) {
                (Some(_), _) => format!("the workloads its selector picks in {}", name.namespace),
                (None, true) => "every workload in the mesh (root namespace)".to_owned(),
                (None, false) => format!("every workload in namespace {}", name.namespace),
            };
            warnings.push(
                KIND_AP,
                &name,
                format!(
                    "targetRef/targetRefs: ambit runs no waypoint or gateway to bind this ALLOW \
                     policy to, so it keeps it as an ALLOW policy that matches nothing for \
                     {scope}: they admit only what another ALLOW policy allows. Istio differs: \
                     it does not send targetRef policies to ztunnel at all, so there this \
                     policy has no effect on pod-to-pod traffic"
                ),
            );
            return Ok(Some(CompiledAuthz {
                name,
                action,
                selector,
                rules: Vec::new(),
            }));
        }
        warnings.push(
            KIND_AP,
            &name,
            "targetRef/targetRefs: ambit runs no waypoint or gateway to bind this policy to; \
             ignored, as Istio's ztunnel ignores it",
        );
        return Ok(None);
    }

    if action == Action::Deny && raw_rules.is_empty() {
        warnings.push(
            KIND_AP,
            &name,
            "DENY policy without rules matches nothing and denies nothing; to deny all traffic \
             use an ALLOW policy with an empty spec (`spec: {}`)",
        );
    }

    let mut l7 = BTreeSet::new();
    let mut unknown = BTreeSet::new();
    let mut rules = Vec::with_capacity(raw_rules.len());
    for (i, raw) in raw_rules.into_iter().enumerate() {
        let mut ctx = RuleCtx {
            policy: &name,
            l7: BTreeSet::new(),
            unknown: BTreeSet::new(),
            spiffe: Vec::new(),
        };
        let mut rule = CompiledRule::default();
        ctx.note_unknown(&raw.unknown, &format!("spec.rules[{i}]"));
        // What Istio's validation refuses is refused here too: in ambit an
        // empty list or entry would otherwise mean "anything".
        let refuse = |field: String, message: &str| Err(invalid(KIND_AP, &name, field, message));
        if raw.from.as_ref().is_some_and(Vec::is_empty) {
            return refuse(format!("spec.rules[{i}].from"), "must not be empty");
        }
        if raw.to.as_ref().is_some_and(Vec::is_empty) {
            return refuse(format!("spec.rules[{i}].to"), "must not be empty");
        }
        for (j, from) in raw.from.unwrap_or_default().into_iter().enumerate() {
            ctx.note_unknown(&from.unknown, &format!("spec.rules[{i}].from[{j}]"));
            let path = format!("spec.rules[{i}].from[{j}].source");
            let Some(source) = from.source.filter(|s| !source_is_empty(s)) else {
                return refuse(path, "must not be empty");
            };
            rule.from.push(ctx.source(source, &path)?);
        }
        for (j, to) in raw.to.unwrap_or_default().into_iter().enumerate() {
            ctx.note_unknown(&to.unknown, &format!("spec.rules[{i}].to[{j}]"));
            let path = format!("spec.rules[{i}].to[{j}].operation");
            let Some(op) = to.operation.filter(|o| !operation_is_empty(o)) else {
                return refuse(path, "must not be empty");
            };
            ctx.note_unknown(&op.unknown, &path);
            for (field, present) in [
                ("hosts", &op.hosts),
                ("notHosts", &op.not_hosts),
                ("methods", &op.methods),
                ("notMethods", &op.not_methods),
                ("paths", &op.paths),
                ("notPaths", &op.not_paths),
            ] {
                if present.as_ref().is_some_and(|v| !v.is_empty()) {
                    ctx.l7.insert(field.to_owned());
                }
            }
            rule.to.push(OperationMatch {
                ports: PortMatch {
                    values: ctx.ports(op.ports, &format!("{path}.ports"))?,
                    negated: ctx.ports(op.not_ports, &format!("{path}.notPorts"))?,
                },
            });
        }
        for (j, cond) in raw.when.unwrap_or_default().into_iter().enumerate() {
            let path = format!("spec.rules[{i}].when[{j}]");
            let none = |v: &Option<Vec<Scalar>>| v.as_ref().is_none_or(Vec::is_empty);
            if cond.key.is_empty() {
                return refuse(format!("{path}.key"), "must not be empty");
            }
            if none(&cond.values) && none(&cond.not_values) {
                return refuse(path, "needs values or notValues");
            }
            ctx.note_unknown(&cond.unknown, &path);
            if let Some(c) = ctx.condition(cond, &path)? {
                rule.when.push(c);
            }
        }
        // ALLOW: a rule depending on what we cannot see (or do not know) must
        // not grant access. DENY/AUDIT: those parts were simply not compiled,
        // so the rule matches on the rest alone (wider, i.e. fail closed).
        // Both as istiod translates L7 fields for ztunnel.
        rule.never = action == Action::Allow && (!ctx.l7.is_empty() || !ctx.unknown.is_empty());
        for (path, value) in &ctx.spiffe {
            let effect = if path.contains(".not") || path.contains("notValues") {
                "so it excludes no one"
            } else {
                "so it admits or matches no one"
            };
            warnings.push(
                KIND_AP,
                &name,
                format!(
                    "{path}: principal {value:?} never matches, {effect}: Istio compares \
                     principals without the spiffe:// prefix (write {:?}); ambit does the same",
                    value.trim_start_matches(SPIFFE_SCHEME)
                ),
            );
        }
        if action == Action::Allow && admits_plaintext_by_negation(&rule) {
            warnings.push(
                KIND_AP,
                &name,
                format!(
                    "spec.rules[{i}] admits plaintext connections (no identity): a connection \
                     without an identity is in no notPrincipals/notNamespaces/notServiceAccounts \
                     list, as in Istio; require mTLS with a STRICT PeerAuthentication to keep \
                     plaintext out"
                ),
            );
        }
        l7.append(&mut ctx.l7);
        unknown.append(&mut ctx.unknown);
        rules.push(rule);
    }

    let effect = |what: &str| match action {
        Action::Allow => "ALLOW rules using them never match (fail closed)".to_owned(),
        Action::Deny => {
            format!("they are ignored, so DENY rules using them match without {what} (fail closed)")
        }
        Action::Audit => {
            format!("they are ignored, so AUDIT rules using them match without {what}")
        }
    };
    if !l7.is_empty() {
        let fields = l7.into_iter().collect::<Vec<_>>().join(", ");
        warnings.push(
            KIND_AP,
            &name,
            format!(
                "fields that cannot be enforced at L4 (HTTP attributes): {fields}; {}",
                effect("them, on their L4 parts alone")
            ),
        );
    }
    if !unknown.is_empty() {
        let fields = unknown.into_iter().collect::<Vec<_>>().join(", ");
        warnings.push(
            KIND_AP,
            &name,
            format!(
                "unknown fields (not AuthorizationPolicy fields ambit knows; a typo?): {fields}; {}",
                effect("them")
            ),
        );
    }

    Ok(Some(CompiledAuthz {
        name,
        action,
        selector,
        rules,
    }))
}

fn empty(lists: &[&Option<Vec<String>>]) -> bool {
    lists.iter().all(|v| v.as_ref().is_none_or(Vec::is_empty))
}

/// No field at all, known or not (Istio: "`from.source` must not be empty").
fn source_is_empty(s: &Source) -> bool {
    s.unknown.is_empty()
        && empty(&[
            &s.principals,
            &s.not_principals,
            &s.request_principals,
            &s.not_request_principals,
            &s.namespaces,
            &s.not_namespaces,
            &s.ip_blocks,
            &s.not_ip_blocks,
            &s.remote_ip_blocks,
            &s.not_remote_ip_blocks,
            &s.service_accounts,
            &s.not_service_accounts,
        ])
}

/// No field at all, known or not (Istio: "`to.operation` must not be empty").
fn operation_is_empty(o: &Operation) -> bool {
    o.unknown.is_empty()
        && o.ports.as_ref().is_none_or(Vec::is_empty)
        && o.not_ports.as_ref().is_none_or(Vec::is_empty)
        && empty(&[
            &o.hosts,
            &o.not_hosts,
            &o.methods,
            &o.not_methods,
            &o.paths,
            &o.not_paths,
        ])
}

/// True when an ALLOW rule can match a connection without identity only
/// because a negated identity list (notPrincipals, notNamespaces,
/// notServiceAccounts, `when` notValues on source.principal/namespace) is
/// satisfied by the missing identity.
fn admits_plaintext_by_negation(rule: &CompiledRule) -> bool {
    if rule.never {
        return false;
    }
    let identity_when = |positive: bool| {
        rule.when.iter().any(|w| match w {
            ConditionMatch::SourcePrincipal(m) | ConditionMatch::SourceNamespace(m) => {
                if positive {
                    !m.values.is_empty()
                } else {
                    !m.negated.is_empty()
                }
            }
            _ => false,
        })
    };
    if identity_when(true) {
        return false;
    }
    let negated_when = identity_when(false);
    if rule.from.is_empty() {
        return negated_when;
    }
    rule.from.iter().any(|s| {
        let needs_identity = !s.principals.values.is_empty()
            || !s.namespaces.values.is_empty()
            || !s.service_accounts.values.is_empty();
        let negated = !s.principals.negated.is_empty()
            || !s.namespaces.negated.is_empty()
            || !s.service_accounts.negated.is_empty();
        !needs_identity && (negated || negated_when)
    })
}

struct RuleCtx<'p> {
    policy: &'p PolicyName,
    /// HTTP attributes used by the rule, by field name.
    l7: BTreeSet<String>,
    /// Unknown fields used by the rule, by path.
    unknown: BTreeSet<String>,
    /// Principal values written with `spiffe://`: (path, value).
    spiffe: Vec<(String, String)>,
}

impl RuleCtx<'_> {
    fn note_unknown(&mut self, fields: &BTreeMap<String, Value>, path: &str) {
        for key in fields.keys() {
            self.unknown.insert(format!("{path}.{key}"));
        }
    }

    /// Principal patterns as istiod sends them: verbatim (a `spiffe://`
    /// value is kept, and never matches; see [`SPIFFE_SCHEME`]).
    fn principals(&mut self, v: Option<Vec<String>>, path: &str) -> Vec<StrMatch> {
        let v = v.unwrap_or_default();
        for (k, p) in v.iter().enumerate() {
            if p.starts_with(SPIFFE_SCHEME) {
                self.spiffe.push((format!("{path}[{k}]"), p.clone()));
            }
        }
        v.iter().map(|p| StrMatch::parse(p)).collect()
    }

    /// `ns/sa`, or `sa` in the policy's namespace (istiod's translation).
    fn service_accounts(
        &self,
        v: Option<Vec<String>>,
        path: &str,
    ) -> Result<Vec<(String, String)>, PolicyError> {
        v.unwrap_or_default()
            .into_iter()
            .enumerate()
            .map(|(k, entry)| {
                let (ns, sa) = match entry.split_once('/') {
                    Some((ns, sa)) => (ns.to_owned(), sa.to_owned()),
                    None => (self.policy.namespace.clone(), entry.clone()),
                };
                if ns.is_empty() || sa.is_empty() || sa.contains('/') {
                    return Err(invalid(
                        KIND_AP,
                        self.policy,
                        format!("{path}[{k}]"),
                        format!(
                            "invalid service account {entry:?} (expected namespace/name or name)"
                        ),
                    ));
                }
                Ok((ns, sa))
            })
            .collect()
    }

    fn source(&mut self, src: Source, path: &str) -> Result<SourceMatch, PolicyError> {
        self.note_unknown(&src.unknown, path);
        for (field, present) in [
            ("requestPrincipals", &src.request_principals),
            ("notRequestPrincipals", &src.not_request_principals),
            ("remoteIpBlocks", &src.remote_ip_blocks),
            ("notRemoteIpBlocks", &src.not_remote_ip_blocks),
        ] {
            if present.as_ref().is_some_and(|v| !v.is_empty()) {
                self.l7.insert(field.to_owned());
            }
        }
        // Not enforced, but still validated as Istio's webhook does.
        self.ip_blocks(src.remote_ip_blocks, &format!("{path}.remoteIpBlocks"))?;
        self.ip_blocks(
            src.not_remote_ip_blocks,
            &format!("{path}.notRemoteIpBlocks"),
        )?;
        let non_empty = |v: &Option<Vec<String>>| v.as_ref().is_some_and(|v| !v.is_empty());
        if (non_empty(&src.service_accounts) || non_empty(&src.not_service_accounts))
            && (non_empty(&src.principals)
                || non_empty(&src.not_principals)
                || non_empty(&src.namespaces)
                || non_empty(&src.not_namespaces))
        {
            // Istio's validation refuses this combination.
            return Err(invalid(
                KIND_AP,
                self.policy,
                path,
                "serviceAccounts cannot be set together with principals or namespaces",
            ));
        }
        let namespaces = |v: Option<Vec<String>>| -> Vec<StrMatch> {
            v.unwrap_or_default()
                .iter()
                .map(|p| StrMatch::parse(p))
                .collect()
        };
        Ok(SourceMatch {
            principals: IdentityMatch {
                values: self.principals(src.principals, &format!("{path}.principals")),
                negated: self.principals(src.not_principals, &format!("{path}.notPrincipals")),
            },
            namespaces: IdentityMatch {
                values: namespaces(src.namespaces),
                negated: namespaces(src.not_namespaces),
            },
            service_accounts: ServiceAccountMatch {
                values: self
                    .service_accounts(src.service_accounts, &format!("{path}.serviceAccounts"))?,
                negated: self.service_accounts(
                    src.not_service_accounts,
                    &format!("{path}.notServiceAccounts"),
                )?,
            },
            ips: IpMatch {
                values: self.ip_blocks(src.ip_blocks, &format!("{path}.ipBlocks"))?,
                negated: self.ip_blocks(src.not_ip_blocks, &format!("{path}.notIpBlocks"))?,
            },
        })
    }
    fn ip_blocks(&self, v: Option<Vec<String>>, path: &str) -> Result<Vec<IpNet>, PolicyError> {
        v.unwrap_or_default()
            .iter()
            .enumerate()
            .map(|(k, s)| {
                parse_ip_block(s).ok_or_else(|| {
                    invalid(
                        KIND_AP,
                        self.policy,
                        format!("{path}[{k}]"),
                        format!("invalid IP address or CIDR {s:?}"),
                    )
                })
            })
            .collect()
    }

    fn ports(&self, v: Option<Vec<Scalar>>, path: &str) -> Result<Vec<u16>, PolicyError> {
        v.unwrap_or_default()
            .iter()
            .enumerate()
            .map(|(k, s)| {
                parse_port(&s.0).ok_or_else(|| {
                    invalid(
                        KIND_AP,
                        self.policy,
                        format!("{path}[{k}]"),
                        format!("invalid port {:?} (expected a number 1-65535)", s.0),
                    )
                })
            })
            .collect()
    }

    /// `None` for keys that need L7 data (recorded for the warning).
    fn condition(
        &mut self,
        cond: Condition,
        path: &str,
    ) -> Result<Option<ConditionMatch>, PolicyError> {
        let strings = |v: Option<Vec<Scalar>>| -> Vec<String> {
            v.unwrap_or_default().into_iter().map(|s| s.0).collect()
        };
        let values = strings(cond.values);
        let not_values = strings(cond.not_values);
        let vp = format!("{path}.values");
        let np = format!("{path}.notValues");
        Ok(Some(match cond.key.as_str() {
            "source.ip" => ConditionMatch::SourceIp(IpMatch {
                values: self.ip_blocks(Some(values), &vp)?,
                negated: self.ip_blocks(Some(not_values), &np)?,
            }),
            "destination.ip" => ConditionMatch::DestinationIp(IpMatch {
                values: self.ip_blocks(Some(values), &vp)?,
                negated: self.ip_blocks(Some(not_values), &np)?,
            }),
            "destination.port" => {
                let scal = |v: Vec<String>| Some(v.into_iter().map(Scalar).collect());
                ConditionMatch::DestinationPort(PortMatch {
                    values: self.ports(scal(values), &vp)?,
                    negated: self.ports(scal(not_values), &np)?,
                })
            }
            "source.principal" => ConditionMatch::SourcePrincipal(IdentityMatch {
                values: self.principals(Some(values), &vp),
                negated: self.principals(Some(not_values), &np),
            }),
            "source.namespace" => ConditionMatch::SourceNamespace(IdentityMatch {
                values: values.iter().map(|s| StrMatch::parse(s)).collect(),
                negated: not_values.iter().map(|s| StrMatch::parse(s)).collect(),
            }),
            other => {
                self.l7.insert(format!("when[{other}]"));
                return Ok(None);
            }
        }))
    }
}
