//! Who may have which certificate: the CA's authorization, as pure functions over a
//! reviewed caller, a pod index and the request, so every rule is tested without a network.
//!
//! The rules follow istiod's node authorization (istio `security/pkg/server/ca/node_auth.go`):
//! a workload may always ask for its own identity; asking for another identity
//! (`ImpersonatedIdentity`) is reserved to trusted node agents, and only for identities that
//! have a pod on the node agent's own node. A stolen node-agent token therefore yields at most
//! the identities of that one node.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;
use std::sync::RwLock;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::TokenReviewStatus;
use rcgen::{CertificateSigningRequestParams, PKCS_ECDSA_P256_SHA256, SanType};
use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::pem::PemObject;

use crate::identity::SpiffeId;

/// The metadata key a node agent names the wanted identity under (Istio's name).
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";
/// TokenReview `user.extra` keys the API server fills for pod-bound tokens.
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const SERVICE_ACCOUNT_USER_PREFIX: &str = "system:serviceaccount:";

/// Why a request was refused. The names (`as_str`) are stable: they are metric labels and
/// appear in logs and in the gRPC status message, so scripts and alerts may match on them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RefusalReason {
    /// No `authorization: Bearer …` header.
    MissingToken,
    /// The API server did not authenticate the token (bad signature, deleted pod, …).
    TokenInvalid,
    TokenExpired,
    /// The token was not issued for the CA's audience.
    WrongAudience,
    /// Authenticated, but not as a service account (a user or a node credential).
    NotAServiceAccount,
    /// The TokenReview itself failed (API server unreachable): not the caller's fault.
    TokenReviewFailed,
    /// The pod index has not finished its first list: nothing can be decided yet.
    PodsNotSynced,
    /// `ImpersonatedIdentity` is not a SPIFFE ID.
    InvalidIdentity,
    /// The requested identity is in another trust domain than the CA's.
    WrongTrustDomain,
    /// Another identity was requested by a caller that is not a trusted node agent.
    NotANodeAgent,
    /// A node agent's token is not bound to a pod, so its node is unknown.
    CallerPodUnknown,
    /// The pod the token is bound to does not exist (or not yet in the index).
    CallerPodNotFound,
    /// A pod of that name exists, but it is not the one the token was issued for.
    CallerPodUidMismatch,
    /// The caller's pod has no node yet.
    CallerPodNotScheduled,
    /// No pod with the requested namespace and service account runs on the caller's node.
    IdentityNotOnNode,
    /// The CSR is not a PEM PKCS#10 request with a valid self-signature.
    CsrMalformed,
    /// The CSR's key is not of an accepted type (ECDSA P-256).
    CsrKeyType,
    /// The CSR's names are not exactly the requested identity as its only URI SAN.
    CsrSanMismatch,
    /// The CSR carries more than one URI SAN.
    CsrMultipleUriSans,
    /// The requested validity is over the CA's maximum.
    ValidityTooLong,
    /// The requested validity is negative.
    ValidityInvalid,
}

impl RefusalReason {
    pub const ALL: [RefusalReason; 21] = [
        Self::MissingToken,
        Self::TokenInvalid,
        Self::TokenExpired,
        Self::WrongAudience,
        Self::NotAServiceAccount,
        Self::TokenReviewFailed,
        Self::PodsNotSynced,
        Self::InvalidIdentity,
        Self::WrongTrustDomain,
        Self::NotANodeAgent,
        Self::CallerPodUnknown,
        Self::CallerPodNotFound,
        Self::CallerPodUidMismatch,
        Self::CallerPodNotScheduled,
        Self::IdentityNotOnNode,
        Self::CsrMalformed,
        Self::CsrKeyType,
        Self::CsrSanMismatch,
        Self::CsrMultipleUriSans,
        Self::ValidityTooLong,
        Self::ValidityInvalid,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::MissingToken => "missing_token",
            Self::TokenInvalid => "token_invalid",
            Self::TokenExpired => "token_expired",
            Self::WrongAudience => "wrong_audience",
            Self::NotAServiceAccount => "not_a_service_account",
            Self::TokenReviewFailed => "token_review_failed",
            Self::PodsNotSynced => "pods_not_synced",
            Self::InvalidIdentity => "invalid_identity",
            Self::WrongTrustDomain => "wrong_trust_domain",
            Self::NotANodeAgent => "not_a_node_agent",
            Self::CallerPodUnknown => "caller_pod_unknown",
            Self::CallerPodNotFound => "caller_pod_not_found",
            Self::CallerPodUidMismatch => "caller_pod_uid_mismatch",
            Self::CallerPodNotScheduled => "caller_pod_not_scheduled",
            Self::IdentityNotOnNode => "identity_not_on_node",
            Self::CsrMalformed => "csr_malformed",
            Self::CsrKeyType => "csr_key_type",
            Self::CsrSanMismatch => "csr_san_mismatch",
            Self::CsrMultipleUriSans => "csr_multiple_uri_sans",
            Self::ValidityTooLong => "validity_too_long",
            Self::ValidityInvalid => "validity_invalid",
        }
    }

    /// The gRPC status a refusal is answered with: the caller can tell "who are you"
    /// (Unauthenticated) from "not you" (PermissionDenied) from "ask differently"
    /// (InvalidArgument) from "try again later" (Unavailable).
    pub fn grpc_code(self) -> tonic::Code {
        match self {
            Self::MissingToken
            | Self::TokenInvalid
            | Self::TokenExpired
            | Self::WrongAudience
            | Self::NotAServiceAccount => tonic::Code::Unauthenticated,
            Self::TokenReviewFailed | Self::PodsNotSynced => tonic::Code::Unavailable,
            Self::WrongTrustDomain
            | Self::NotANodeAgent
            | Self::CallerPodUnknown
            | Self::CallerPodNotFound
            | Self::CallerPodUidMismatch
            | Self::CallerPodNotScheduled
            | Self::IdentityNotOnNode => tonic::Code::PermissionDenied,
            Self::InvalidIdentity
            | Self::CsrMalformed
            | Self::CsrKeyType
            | Self::CsrSanMismatch
            | Self::CsrMultipleUriSans
            | Self::ValidityTooLong
            | Self::ValidityInvalid => tonic::Code::InvalidArgument,
        }
    }
}

impl fmt::Display for RefusalReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refusal: the stable reason and a human-readable detail (never a token).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub reason: RefusalReason,
    pub detail: String,
}

impl Refusal {
    pub fn new(reason: RefusalReason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason, self.detail)
    }
}

/// A Kubernetes service account, `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceAccountRef {
    pub namespace: String,
    pub name: String,
}

impl ServiceAccountRef {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ServiceAccountRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl FromStr for ServiceAccountRef {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(Self::new(ns, name))
            }
            _ => Err(format!(
                "{s:?} is not a service account: expected NAMESPACE/NAME"
            )),
        }
    }
}

/// The caller as the API server vouched for it in a TokenReview.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReviewedCaller {
    pub service_account: ServiceAccountRef,
    /// Set for pod-bound (projected) tokens.
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
}

/// Maps a TokenReview's answer to the caller or to a refusal. `audience` is the one the CA
/// asked the review for; an API server that does not echo it back is treated as a refusal
/// (the API documents that a client setting `spec.audiences` must check `status.audiences`).
pub fn review_outcome(
    status: Option<&TokenReviewStatus>,
    audience: &str,
) -> Result<ReviewedCaller, Refusal> {
    let Some(status) = status else {
        return Err(Refusal::new(
            RefusalReason::TokenReviewFailed,
            "the TokenReview came back without a status",
        ));
    };
    if status.authenticated != Some(true) {
        let error = status.error.as_deref().unwrap_or("not authenticated");
        // The API server reports why only as text: "service account token has expired",
        // "token audiences [...] is invalid for the target audiences [...]". Matching it is
        // only for the reason label; any other text is a plain invalid token.
        let lower = error.to_ascii_lowercase();
        let reason = if lower.contains("expired") {
            RefusalReason::TokenExpired
        } else if lower.contains("audience") {
            RefusalReason::WrongAudience
        } else {
            RefusalReason::TokenInvalid
        };
        return Err(Refusal::new(reason, error));
    }
    let audiences = status.audiences.as_deref().unwrap_or_default();
    if !audiences.iter().any(|a| a == audience) {
        return Err(Refusal::new(
            RefusalReason::WrongAudience,
            format!("token is valid for {audiences:?}, not for {audience:?}"),
        ));
    }
    let user = status.user.as_ref();
    let username = user.and_then(|u| u.username.as_deref()).unwrap_or("");
    let service_account = username
        .strip_prefix(SERVICE_ACCOUNT_USER_PREFIX)
        .and_then(|rest| rest.split_once(':'))
        .filter(|(ns, name)| !ns.is_empty() && !name.is_empty() && !name.contains(':'))
        .map(|(ns, name)| ServiceAccountRef::new(ns, name))
        .ok_or_else(|| {
            Refusal::new(
                RefusalReason::NotAServiceAccount,
                format!("{username:?} is not a service account"),
            )
        })?;
    let extra = |key: &str| {
        user.and_then(|u| u.extra.as_ref())
            .and_then(|extra: &BTreeMap<String, Vec<String>>| extra.get(key))
            .and_then(|values| values.first())
            .filter(|v| !v.is_empty())
            .cloned()
    };
    Ok(ReviewedCaller {
        service_account,
        pod_name: extra(EXTRA_POD_NAME),
        pod_uid: extra(EXTRA_POD_UID),
    })
}

/// What the CA needs to know about one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodFacts {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub service_account: String,
    /// `spec.nodeName`; `None` while unscheduled.
    pub node: Option<String>,
}

/// The pods the CA decides over.
pub trait PodIndex: Send + Sync {
    /// False until the first complete list: before that, absence proves nothing.
    fn synced(&self) -> bool;
    fn pod(&self, namespace: &str, name: &str) -> Option<PodFacts>;
    /// Whether a pod with this namespace and service account runs on `node`.
    fn service_account_on_node(&self, node: &str, namespace: &str, service_account: &str) -> bool;
}

/// An in-memory [`PodIndex`] with the two lookups the CA makes indexed (by name, and by node
/// and service account), so a request costs two hash lookups however many pods there are.
/// Filled from a Pod watch in production and directly in tests.
#[derive(Debug, Default)]
pub struct PodStore {
    inner: RwLock<PodStoreInner>,
}

#[derive(Debug, Default)]
struct PodStoreInner {
    synced: bool,
    by_name: HashMap<(String, String), PodFacts>,
    /// node -> (namespace, service account) -> number of pods.
    by_node: HashMap<String, HashMap<(String, String), usize>>,
}

impl PodStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Inserts or replaces one pod.
    pub fn apply(&self, pod: PodFacts) {
        let mut inner = self.write();
        inner.insert(pod);
    }

    /// Removes one pod (by namespace and name).
    pub fn delete(&self, namespace: &str, name: &str) {
        let mut inner = self.write();
        inner.remove(namespace, name);
    }

    /// Replaces everything with a complete list and marks the store synced.
    pub fn replace_all(&self, pods: impl IntoIterator<Item = PodFacts>) {
        let mut fresh = PodStoreInner {
            synced: true,
            ..PodStoreInner::default()
        };
        for pod in pods {
            fresh.insert(pod);
        }
        *self.write() = fresh;
    }

    pub fn len(&self) -> usize {
        self.read().by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, PodStoreInner> {
        self.inner
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, PodStoreInner> {
        self.inner
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl PodStoreInner {
    fn insert(&mut self, pod: PodFacts) {
        self.remove(&pod.namespace, &pod.name);
        if let Some(node) = &pod.node {
            *self
                .by_node
                .entry(node.clone())
                .or_default()
                .entry((pod.namespace.clone(), pod.service_account.clone()))
                .or_default() += 1;
        }
        self.by_name
            .insert((pod.namespace.clone(), pod.name.clone()), pod);
    }

    fn remove(&mut self, namespace: &str, name: &str) {
        let Some(old) = self
            .by_name
            .remove(&(namespace.to_owned(), name.to_owned()))
        else {
            return;
        };
        let Some(node) = &old.node else { return };
        let Some(accounts) = self.by_node.get_mut(node) else {
            return;
        };
        let key = (old.namespace.clone(), old.service_account.clone());
        if let Some(count) = accounts.get_mut(&key) {
            *count -= 1;
            if *count == 0 {
                accounts.remove(&key);
            }
        }
        if accounts.is_empty() {
            self.by_node.remove(node);
        }
    }
}

impl PodIndex for PodStore {
    fn synced(&self) -> bool {
        self.read().synced
    }

    fn pod(&self, namespace: &str, name: &str) -> Option<PodFacts> {
        self.read()
            .by_name
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    fn service_account_on_node(&self, node: &str, namespace: &str, service_account: &str) -> bool {
        self.read().by_node.get(node).is_some_and(|accounts| {
            accounts.contains_key(&(namespace.to_owned(), service_account.to_owned()))
        })
    }
}

/// The CA's rules.
#[derive(Clone, Debug)]
pub struct AuthzPolicy {
    pub trust_domain: String,
    /// Service accounts whose pods may ask for the identities of pods on their node.
    pub node_agents: Vec<ServiceAccountRef>,
    /// Validity granted when the request asks for none (0).
    pub default_validity: Duration,
    /// Longest validity granted; longer requests are refused, not shortened, so a client
    /// never holds a certificate shorter than it planned its renewal for.
    pub max_validity: Duration,
}

/// One certificate request, as received.
#[derive(Clone, Copy, Debug)]
pub struct CertificateRequest<'a> {
    pub csr_pem: &'a str,
    /// `ImpersonatedIdentity` from the metadata; `None` or empty asks for the caller's own.
    pub impersonated_identity: Option<&'a str>,
    /// Seconds; 0 means the default.
    pub validity_seconds: i64,
}

/// A request the CA will sign.
#[derive(Debug)]
pub struct Authorized {
    pub identity: SpiffeId,
    pub csr: CertificateSigningRequestDer<'static>,
    pub validity: Duration,
    /// The caller's node when it asked on behalf of another workload.
    pub node: Option<String>,
}

/// Decides one request. Checks run in a fixed order (identity, caller, node, CSR, validity)
/// and the first failing one gives the reason.
pub fn authorize(
    policy: &AuthzPolicy,
    caller: &ReviewedCaller,
    pods: &dyn PodIndex,
    request: &CertificateRequest<'_>,
) -> Result<Authorized, Refusal> {
    let caller_sa = &caller.service_account;
    let own = SpiffeId::new(
        policy.trust_domain.as_str(),
        caller_sa.namespace.as_str(),
        caller_sa.name.as_str(),
    )
    .map_err(|e| Refusal::new(RefusalReason::InvalidIdentity, e.to_string()))?;

    let identity = match request.impersonated_identity.filter(|s| !s.is_empty()) {
        None => own.clone(),
        Some(text) => SpiffeId::from_str(text)
            .map_err(|e| Refusal::new(RefusalReason::InvalidIdentity, e.to_string()))?,
    };
    if identity.trust_domain() != policy.trust_domain {
        return Err(Refusal::new(
            RefusalReason::WrongTrustDomain,
            format!(
                "{identity} is not in this CA's trust domain {:?}",
                policy.trust_domain
            ),
        ));
    }

    let node = if identity == own {
        None
    } else {
        Some(authorize_node_agent(policy, caller, pods, &identity)?)
    };

    let csr = check_csr(request.csr_pem, &identity)?;
    let validity = check_validity(policy, request.validity_seconds)?;
    Ok(Authorized {
        identity,
        csr,
        validity,
        node,
    })
}

/// Checks 1–3 of node authorization; returns the caller's node.
fn authorize_node_agent(
    policy: &AuthzPolicy,
    caller: &ReviewedCaller,
    pods: &dyn PodIndex,
    identity: &SpiffeId,
) -> Result<String, Refusal> {
    let caller_sa = &caller.service_account;
    if !policy.node_agents.contains(caller_sa) {
        return Err(Refusal::new(
            RefusalReason::NotANodeAgent,
            format!("{caller_sa} may only ask for its own identity, not for {identity}"),
        ));
    }
    let (Some(pod_name), Some(pod_uid)) = (&caller.pod_name, &caller.pod_uid) else {
        return Err(Refusal::new(
            RefusalReason::CallerPodUnknown,
            "the token is not bound to a pod (use a projected service account token)",
        ));
    };
    if !pods.synced() {
        return Err(Refusal::new(
            RefusalReason::PodsNotSynced,
            "the CA has not finished listing pods yet",
        ));
    }
    let pod = pods.pod(&caller_sa.namespace, pod_name).ok_or_else(|| {
        Refusal::new(
            RefusalReason::CallerPodNotFound,
            format!("pod {}/{pod_name} not found", caller_sa.namespace),
        )
    })?;
    if pod.uid != *pod_uid || pod.service_account != caller_sa.name {
        return Err(Refusal::new(
            RefusalReason::CallerPodUidMismatch,
            format!(
                "pod {}/{pod_name} is not the pod the token was issued for",
                caller_sa.namespace
            ),
        ));
    }
    let Some(node) = pod.node else {
        return Err(Refusal::new(
            RefusalReason::CallerPodNotScheduled,
            format!("pod {}/{pod_name} has no node", caller_sa.namespace),
        ));
    };
    if !pods.service_account_on_node(&node, identity.namespace(), identity.service_account()) {
        return Err(Refusal::new(
            RefusalReason::IdentityNotOnNode,
            format!("no pod with identity {identity} runs on node {node}"),
        ));
    }
    Ok(node)
}

/// Check 4: a well-formed, self-signed CSR with an accepted key and exactly the requested
/// identity as its only name.
fn check_csr(
    csr_pem: &str,
    identity: &SpiffeId,
) -> Result<CertificateSigningRequestDer<'static>, Refusal> {
    let malformed = |detail: String| Refusal::new(RefusalReason::CsrMalformed, detail);
    let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
        .map_err(|e| malformed(format!("no PEM CERTIFICATE REQUEST: {e}")))?;
    // Parsing verifies the self-signature: the requester holds the private key.
    let parsed = CertificateSigningRequestParams::from_der(&der)
        .map_err(|e| malformed(format!("invalid PKCS#10 request: {e}")))?;
    if *parsed.public_key.algorithm() != PKCS_ECDSA_P256_SHA256 {
        return Err(Refusal::new(
            RefusalReason::CsrKeyType,
            "only ECDSA P-256 keys are accepted",
        ));
    }
    let names = &parsed.params.subject_alt_names;
    let uris: Vec<&str> = names
        .iter()
        .filter_map(|san| match san {
            SanType::URI(uri) => Some(uri.as_str()),
            _ => None,
        })
        .collect();
    if uris.len() > 1 {
        return Err(Refusal::new(
            RefusalReason::CsrMultipleUriSans,
            format!("the CSR names {} URIs; exactly one is allowed", uris.len()),
        ));
    }
    let wanted = identity.to_string();
    if uris.first() != Some(&wanted.as_str()) || names.len() != 1 {
        return Err(Refusal::new(
            RefusalReason::CsrSanMismatch,
            format!("the CSR must name exactly {wanted} (as its only SAN)"),
        ));
    }
    Ok(der)
}

fn check_validity(policy: &AuthzPolicy, seconds: i64) -> Result<Duration, Refusal> {
    let requested = match u64::try_from(seconds) {
        Ok(0) => return Ok(policy.default_validity.min(policy.max_validity)),
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => {
            return Err(Refusal::new(
                RefusalReason::ValidityInvalid,
                format!("validity of {seconds}s is negative"),
            ));
        }
    };
    if requested > policy.max_validity {
        return Err(Refusal::new(
            RefusalReason::ValidityTooLong,
            format!(
                "validity of {}s is over the maximum of {}s",
                requested.as_secs(),
                policy.max_validity.as_secs()
            ),
        ));
    }
    Ok(requested)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::authentication::v1::UserInfo;
    use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P384_SHA384};

    use super::*;
    use crate::identity::generate_csr;

    const TD: &str = "cluster.local";
    const HOUR: Duration = Duration::from_secs(3600);

    fn policy() -> AuthzPolicy {
        AuthzPolicy {
            trust_domain: TD.into(),
            node_agents: vec![ServiceAccountRef::new("ambit-system", "ambit")],
            default_validity: 12 * HOUR,
            max_validity: 24 * HOUR,
        }
    }

    fn pod(ns: &str, name: &str, uid: &str, sa: &str, node: Option<&str>) -> PodFacts {
        PodFacts {
            namespace: ns.into(),
            name: name.into(),
            uid: uid.into(),
            service_account: sa.into(),
            node: node.map(Into::into),
        }
    }

    /// Two nodes: the agent on node-a, `web` on node-a, `db` on node-b.
    fn pods() -> PodStore {
        let store = PodStore::new();
        store.replace_all([
            pod("ambit-system", "ambit-a", "uid-a", "ambit", Some("node-a")),
            pod("ambit-system", "ambit-b", "uid-b", "ambit", Some("node-b")),
            pod("ambit-system", "ambit-new", "uid-n", "ambit", None),
            pod("shop", "web-1", "uid-w", "web", Some("node-a")),
            pod("shop", "db-1", "uid-d", "db", Some("node-b")),
        ]);
        store
    }

    fn agent_on_a() -> ReviewedCaller {
        ReviewedCaller {
            service_account: ServiceAccountRef::new("ambit-system", "ambit"),
            pod_name: Some("ambit-a".into()),
            pod_uid: Some("uid-a".into()),
        }
    }

    fn id(ns: &str, sa: &str) -> SpiffeId {
        SpiffeId::new(TD, ns, sa).unwrap()
    }

    fn csr_for(id: &SpiffeId) -> String {
        let (_key, der) = generate_csr(id).unwrap();
        pem("CERTIFICATE REQUEST", &der)
    }

    fn pem(label: &str, der: &[u8]) -> String {
        crate::ca::pem(label, der)
    }

    /// A CSR with arbitrary SANs and key algorithm.
    fn custom_csr(sans: &[SanType], alg: &'static rcgen::SignatureAlgorithm) -> String {
        let key = KeyPair::generate_for(alg).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = sans.to_vec();
        let csr = params.serialize_request(&key).unwrap();
        csr.pem().unwrap()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    struct Case {
        name: &'static str,
        caller: ReviewedCaller,
        impersonated: Option<String>,
        csr: String,
        validity: i64,
        want: Result<&'static str, RefusalReason>,
    }

    #[test]
    fn authorization_table() {
        let web = id("shop", "web");
        let db = id("shop", "db");
        let plain_web = ReviewedCaller {
            service_account: ServiceAccountRef::new("shop", "web"),
            pod_name: Some("web-1".into()),
            pod_uid: Some("uid-w".into()),
        };
        let case = |name, caller: &ReviewedCaller, imp: Option<&SpiffeId>, csr: String| Case {
            name,
            caller: caller.clone(),
            impersonated: imp.map(ToString::to_string),
            csr,
            validity: 0,
            want: Ok("spiffe://cluster.local/ns/shop/sa/web"),
        };
        let mut cases = vec![
            case(
                "node agent, identity on its node",
                &agent_on_a(),
                Some(&web),
                csr_for(&web),
            ),
            case(
                "workload asking for its own identity (no metadata)",
                &plain_web,
                None,
                csr_for(&web),
            ),
            case(
                "workload naming its own identity",
                &plain_web,
                Some(&web),
                csr_for(&web),
            ),
        ];
        let refused = |name, caller: &ReviewedCaller, imp: Option<String>, csr, reason| Case {
            name,
            caller: caller.clone(),
            impersonated: imp,
            csr,
            validity: 0,
            want: Err(reason),
        };
        let s = |id: &SpiffeId| Some(id.to_string());
        let mut uid_mismatch = agent_on_a();
        uid_mismatch.pod_uid = Some("uid-old".into());
        let mut gone = agent_on_a();
        gone.pod_name = Some("ambit-gone".into());
        let mut unbound = agent_on_a();
        unbound.pod_name = None;
        unbound.pod_uid = None;
        let unscheduled = ReviewedCaller {
            pod_name: Some("ambit-new".into()),
            pod_uid: Some("uid-n".into()),
            ..agent_on_a()
        };
        let impostor = ReviewedCaller {
            service_account: ServiceAccountRef::new("shop", "ambit"),
            ..agent_on_a()
        };
        cases.extend([
            refused(
                "identity only on another node",
                &agent_on_a(),
                s(&db),
                csr_for(&db),
                RefusalReason::IdentityNotOnNode,
            ),
            refused(
                "unknown service account",
                &agent_on_a(),
                s(&id("shop", "ghost")),
                csr_for(&id("shop", "ghost")),
                RefusalReason::IdentityNotOnNode,
            ),
            refused(
                "workload asking for another identity",
                &plain_web,
                s(&db),
                csr_for(&db),
                RefusalReason::NotANodeAgent,
            ),
            refused(
                "same account name in another namespace is no node agent",
                &impostor,
                s(&web),
                csr_for(&web),
                RefusalReason::NotANodeAgent,
            ),
            refused(
                "pod UID mismatch",
                &uid_mismatch,
                s(&web),
                csr_for(&web),
                RefusalReason::CallerPodUidMismatch,
            ),
            refused(
                "caller pod gone",
                &gone,
                s(&web),
                csr_for(&web),
                RefusalReason::CallerPodNotFound,
            ),
            refused(
                "token not bound to a pod",
                &unbound,
                s(&web),
                csr_for(&web),
                RefusalReason::CallerPodUnknown,
            ),
            refused(
                "caller pod not scheduled",
                &unscheduled,
                s(&web),
                csr_for(&web),
                RefusalReason::CallerPodNotScheduled,
            ),
            refused(
                "CSR SAN differs from the requested identity",
                &agent_on_a(),
                s(&web),
                csr_for(&db),
                RefusalReason::CsrSanMismatch,
            ),
            refused(
                "CSR with two URI SANs",
                &agent_on_a(),
                s(&web),
                custom_csr(
                    &[uri(&web.to_string()), uri(&db.to_string())],
                    &PKCS_ECDSA_P256_SHA256,
                ),
                RefusalReason::CsrMultipleUriSans,
            ),
            refused(
                "CSR with an extra DNS SAN",
                &agent_on_a(),
                s(&web),
                custom_csr(
                    &[
                        uri(&web.to_string()),
                        SanType::DnsName("evil.example".try_into().unwrap()),
                    ],
                    &PKCS_ECDSA_P256_SHA256,
                ),
                RefusalReason::CsrSanMismatch,
            ),
            refused(
                "CSR without SAN",
                &agent_on_a(),
                s(&web),
                custom_csr(&[], &PKCS_ECDSA_P256_SHA256),
                RefusalReason::CsrSanMismatch,
            ),
            refused(
                "CSR with a P-384 key",
                &agent_on_a(),
                s(&web),
                custom_csr(&[uri(&web.to_string())], &PKCS_ECDSA_P384_SHA384),
                RefusalReason::CsrKeyType,
            ),
            refused(
                "CSR not PEM",
                &agent_on_a(),
                s(&web),
                "hello".into(),
                RefusalReason::CsrMalformed,
            ),
            refused(
                "CSR with a broken signature",
                &agent_on_a(),
                s(&web),
                tamper(&csr_for(&web)),
                RefusalReason::CsrMalformed,
            ),
            refused(
                "wrong trust domain",
                &agent_on_a(),
                Some("spiffe://other.domain/ns/shop/sa/web".into()),
                csr_for(&SpiffeId::new("other.domain", "shop", "web").unwrap()),
                RefusalReason::WrongTrustDomain,
            ),
            refused(
                "impersonated identity not a SPIFFE ID",
                &agent_on_a(),
                Some("https://shop/web".into()),
                csr_for(&web),
                RefusalReason::InvalidIdentity,
            ),
        ]);
        let mut too_long = case(
            "validity over the cap",
            &agent_on_a(),
            Some(&web),
            csr_for(&web),
        );
        too_long.validity = 24 * 3600 + 1;
        too_long.want = Err(RefusalReason::ValidityTooLong);
        let mut negative = case(
            "negative validity",
            &agent_on_a(),
            Some(&web),
            csr_for(&web),
        );
        negative.validity = -1;
        negative.want = Err(RefusalReason::ValidityInvalid);
        let mut at_cap = case(
            "validity at the cap",
            &agent_on_a(),
            Some(&web),
            csr_for(&web),
        );
        at_cap.validity = 24 * 3600;
        cases.extend([too_long, negative, at_cap]);

        let store = pods();
        for c in &cases {
            let request = CertificateRequest {
                csr_pem: &c.csr,
                impersonated_identity: c.impersonated.as_deref(),
                validity_seconds: c.validity,
            };
            let got = authorize(&policy(), &c.caller, &store, &request);
            match (&got, c.want) {
                (Ok(ok), Ok(want)) => assert_eq!(ok.identity.to_string(), want, "{}", c.name),
                (Err(refusal), Err(want)) => {
                    assert_eq!(refusal.reason, want, "{}: {}", c.name, refusal.detail)
                }
                _ => panic!("{}: got {got:?}, want {:?}", c.name, c.want),
            }
        }
    }

    /// Flips one bit of the signature (the last bytes of the DER).
    fn tamper(csr_pem: &str) -> String {
        let mut der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec();
        let last = der.len() - 1;
        der[last] ^= 1;
        pem("CERTIFICATE REQUEST", &der)
    }

    #[test]
    fn granted_validity_and_node() {
        let web = id("shop", "web");
        let csr = csr_for(&web);
        let request = |validity| CertificateRequest {
            csr_pem: &csr,
            impersonated_identity: Some("spiffe://cluster.local/ns/shop/sa/web"),
            validity_seconds: validity,
        };
        let ok = authorize(&policy(), &agent_on_a(), &pods(), &request(0)).unwrap();
        assert_eq!(ok.validity, 12 * HOUR);
        assert_eq!(ok.node.as_deref(), Some("node-a"));
        let ok = authorize(&policy(), &agent_on_a(), &pods(), &request(600)).unwrap();
        assert_eq!(ok.validity, Duration::from_secs(600));
    }

    #[test]
    fn node_agent_waits_for_the_first_pod_list() {
        let web = id("shop", "web");
        let request = CertificateRequest {
            csr_pem: &csr_for(&web),
            impersonated_identity: Some("spiffe://cluster.local/ns/shop/sa/web"),
            validity_seconds: 0,
        };
        let refusal = authorize(&policy(), &agent_on_a(), &PodStore::new(), &request).unwrap_err();
        assert_eq!(refusal.reason, RefusalReason::PodsNotSynced);
    }

    #[test]
    fn pod_store_indexes_follow_updates_and_deletes() {
        let store = pods();
        assert!(store.service_account_on_node("node-a", "shop", "web"));
        // A second web pod on node-a, then the first one moves away (recreated elsewhere).
        store.apply(pod("shop", "web-2", "uid-w2", "web", Some("node-a")));
        store.apply(pod("shop", "web-1", "uid-w3", "web", Some("node-b")));
        assert!(store.service_account_on_node("node-a", "shop", "web"));
        assert!(store.service_account_on_node("node-b", "shop", "web"));
        store.delete("shop", "web-2");
        assert!(!store.service_account_on_node("node-a", "shop", "web"));
        assert_eq!(store.pod("shop", "web-1").unwrap().uid, "uid-w3");
        store.delete("shop", "web-1");
        store.delete("shop", "never-existed");
        assert!(!store.service_account_on_node("node-b", "shop", "web"));
        assert!(store.service_account_on_node("node-b", "shop", "db"));
        assert_eq!(store.len(), 4);
    }

    fn status(
        authenticated: bool,
        error: Option<&str>,
        audiences: &[&str],
        username: &str,
        pod: Option<(&str, &str)>,
    ) -> TokenReviewStatus {
        let extra = pod.map(|(name, uid)| {
            BTreeMap::from([
                (EXTRA_POD_NAME.to_owned(), vec![name.to_owned()]),
                (EXTRA_POD_UID.to_owned(), vec![uid.to_owned()]),
            ])
        });
        TokenReviewStatus {
            authenticated: Some(authenticated),
            error: error.map(Into::into),
            audiences: Some(audiences.iter().map(|a| (*a).to_owned()).collect()),
            user: Some(UserInfo {
                username: Some(username.into()),
                extra,
                ..UserInfo::default()
            }),
        }
    }

    #[test]
    fn token_review_outcomes() {
        let sa_user = "system:serviceaccount:ambit-system:ambit";
        let ok = review_outcome(
            Some(&status(
                true,
                None,
                &["ambit-ca"],
                sa_user,
                Some(("ambit-a", "uid-a")),
            )),
            "ambit-ca",
        )
        .unwrap();
        assert_eq!(ok, agent_on_a());

        let no_pod = review_outcome(
            Some(&status(true, None, &["ambit-ca"], sa_user, None)),
            "ambit-ca",
        )
        .unwrap();
        assert_eq!(no_pod.pod_name, None);
        assert_eq!(no_pod.pod_uid, None);

        let table: [(&str, TokenReviewStatus, RefusalReason); 6] = [
            (
                "invalid",
                status(
                    false,
                    Some(
                        "[invalid bearer token, square/go-jose: error in cryptographic primitive]",
                    ),
                    &[],
                    "",
                    None,
                ),
                RefusalReason::TokenInvalid,
            ),
            (
                "expired",
                status(
                    false,
                    Some("[invalid bearer token, service account token has expired]"),
                    &[],
                    "",
                    None,
                ),
                RefusalReason::TokenExpired,
            ),
            (
                "wrong audience (API server's text)",
                status(
                    false,
                    Some(
                        r#"[invalid bearer token, token audiences ["https://kubernetes.default.svc"] is invalid for the target audiences ["ambit-ca"]]"#,
                    ),
                    &[],
                    "",
                    None,
                ),
                RefusalReason::WrongAudience,
            ),
            (
                "authenticated but the audience not echoed",
                status(true, None, &["istio-ca"], sa_user, None),
                RefusalReason::WrongAudience,
            ),
            (
                "a user, not a service account",
                status(true, None, &["ambit-ca"], "kubernetes-admin", None),
                RefusalReason::NotAServiceAccount,
            ),
            (
                "a node, not a service account",
                status(true, None, &["ambit-ca"], "system:node:node-a", None),
                RefusalReason::NotAServiceAccount,
            ),
        ];
        for (name, status, want) in table {
            let got = review_outcome(Some(&status), "ambit-ca").unwrap_err();
            assert_eq!(got.reason, want, "{name}: {}", got.detail);
        }
        assert_eq!(
            review_outcome(None, "ambit-ca").unwrap_err().reason,
            RefusalReason::TokenReviewFailed
        );
    }

    #[test]
    fn reason_names_are_unique_snake_case() {
        let mut names: Vec<&str> = RefusalReason::ALL.iter().map(|r| r.as_str()).collect();
        assert!(
            names
                .iter()
                .all(|n| n.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        );
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), RefusalReason::ALL.len());
    }

    #[test]
    fn service_account_refs_parse() {
        assert_eq!(
            "ambit-system/ambit".parse::<ServiceAccountRef>().unwrap(),
            ServiceAccountRef::new("ambit-system", "ambit")
        );
        for bad in ["ambit", "/ambit", "ns/", "a/b/c"] {
            assert!(bad.parse::<ServiceAccountRef>().is_err(), "{bad}");
        }
    }
}
