//! The policy engine as the tunnel's decision point: turns an
//! [`InboundConnection`] into a [`Workload`]/[`Connection`] pair, evaluates the
//! current [`PolicySet`] and counts the outcome.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;

use super::{Connection, Decision, DecisionReason, PolicyName, PolicySet, Workload};
use crate::tunnel::{Authorizer, InboundConnection, LocalWorkload, Verdict};

/// Looks up a local workload's labels; the tunnel's [`LocalWorkload`] does not
/// carry them, and policies select workloads by label.
pub type LabelLookup = Arc<dyn Fn(&LocalWorkload) -> BTreeMap<String, String> + Send + Sync>;

/// Key of one decision counter: (allowed, reason, deciding policy).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DecisionKey {
    pub allowed: bool,
    pub reason: DecisionReason,
    pub policy: Option<PolicyName>,
}

/// Where the authorizer reads the policies and the labels of the workload a connection
/// is for. The agent answers both from one state snapshot, so a connection never meets
/// new workloads with old policies.
pub trait PolicySource: Send + Sync {
    fn policies(&self) -> Arc<PolicySet>;
    /// The policy set and `workload`'s labels, from the same snapshot.
    fn policies_and_labels(
        &self,
        workload: &LocalWorkload,
    ) -> (Arc<PolicySet>, BTreeMap<String, String>);
}

/// A policy set of its own, swapped by [`PolicyAuthorizer::replace`] (tools and tests).
struct OwnedPolicies {
    /// Loaded without a lock: a `replace` never waits on an evaluation and in-flight
    /// checks keep their snapshot.
    set: ArcSwap<PolicySet>,
    labels: LabelLookup,
}

impl PolicySource for OwnedPolicies {
    fn policies(&self) -> Arc<PolicySet> {
        self.set.load_full()
    }

    fn policies_and_labels(
        &self,
        workload: &LocalWorkload,
    ) -> (Arc<PolicySet>, BTreeMap<String, String>) {
        (self.policies(), (self.labels)(workload))
    }
}

/// Authorizes inbound connections against the current [`PolicySet`].
pub struct PolicyAuthorizer {
    source: Arc<dyn PolicySource>,
    owned: Option<Arc<OwnedPolicies>>,
    /// Counted by every new connection and read by every scrape: a counter per decision,
    /// found without a lock (the map is copied only when a decision is first seen).
    counters: ArcSwap<BTreeMap<DecisionKey, Arc<AtomicU64>>>,
}

impl std::fmt::Debug for PolicyAuthorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyAuthorizer")
            .field("policies", &self.snapshot().len())
            .finish_non_exhaustive()
    }
}

impl PolicyAuthorizer {
    /// An authorizer with a policy set of its own and a label lookup.
    pub fn new(set: PolicySet, labels: LabelLookup) -> Self {
        let owned = Arc::new(OwnedPolicies {
            set: ArcSwap::from_pointee(set),
            labels,
        });
        Self {
            source: owned.clone(),
            owned: Some(owned),
            counters: ArcSwap::default(),
        }
    }

    /// An authorizer reading policies and labels from `source` (the agent's state).
    pub fn from_source(source: Arc<dyn PolicySource>) -> Self {
        Self {
            source,
            owned: None,
            counters: ArcSwap::default(),
        }
    }

    /// Swaps in new policies for an authorizer made by [`Self::new`]; every connection
    /// authorized afterwards uses them. One reading a [`PolicySource`] follows its source.
    pub fn replace(&self, set: PolicySet) {
        if let Some(owned) = &self.owned {
            owned.set.store(Arc::new(set));
        }
    }

    /// The policies new connections are checked against.
    pub fn snapshot(&self) -> Arc<PolicySet> {
        self.source.policies()
    }

    /// Evaluates without counting or logging (for diagnostics).
    pub fn decide(&self, conn: &InboundConnection) -> Decision {
        let (set, labels) = self.source.policies_and_labels(&conn.workload);
        let workload = Workload {
            namespace: &conn.workload.namespace,
            labels: &labels,
        };
        let principal = conn.source_identity.as_ref().map(ToString::to_string);
        let connection = Connection {
            source_principal: principal.as_deref(),
            source_ip: conn.source_addr.ip(),
            destination_ip: conn.destination.ip(),
            destination_port: conn.destination.port(),
        };
        set.evaluate(&workload, &connection)
    }

    /// Decision counts so far, by (allowed, reason, policy).
    pub fn decision_counts(&self) -> BTreeMap<DecisionKey, u64> {
        (self.counters.load().iter())
            .map(|(key, count)| (key.clone(), count.load(Ordering::Relaxed)))
            .collect()
    }

    fn count(&self, decision: &Decision) {
        let key = DecisionKey {
            allowed: decision.allowed,
            reason: decision.reason,
            policy: decision.policy.clone(),
        };
        if let Some(count) = self.counters.load().get(&key) {
            count.fetch_add(1, Ordering::Relaxed);
            return;
        }
        // A decision not counted before (their kinds are bounded by the policies' names).
        let mut counter = None;
        self.counters.rcu(|counters| {
            // Another connection may have added it meanwhile: theirs is the one.
            counter = counters.get(&key).cloned();
            if counter.is_some() {
                return Arc::clone(counters);
            }
            let fresh = Arc::new(AtomicU64::new(0));
            counter = Some(Arc::clone(&fresh));
            let mut with = BTreeMap::clone(counters);
            with.insert(key.clone(), fresh);
            Arc::new(with)
        });
        if let Some(count) = counter {
            count.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Authorizer for PolicyAuthorizer {
    /// The verdict alone, neither counted nor logged. The tunnel calls this
    /// only to re-check live connections after a policy change
    /// (`Inbound::revoke_denied`): a re-check is not a new decision, so it
    /// must not add to `ambit_authorization_decisions_total` once per live
    /// connection, and the tunnel logs each revocation itself.
    fn authorize(&self, conn: &InboundConnection) -> Verdict {
        verdict(&self.decide(conn))
    }

    /// The decision on a new connection: counted once. Not logged here: the
    /// tunnel logs every refusal (with the reason text returned here), so a
    /// log line here would make two lines per denial.
    fn authorize_explained(&self, conn: &InboundConnection) -> (Verdict, String) {
        let decision = self.decide(conn);
        self.count(&decision);
        (verdict(&decision), decision.to_string())
    }
}

fn verdict(decision: &Decision) -> Verdict {
    if decision.allowed {
        Verdict::Allow
    } else {
        Verdict::Deny {
            reason: decision.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::identity::SpiffeId;

    const STRICT: &str = "
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: strict, namespace: shop}
spec: {mtls: {mode: STRICT}}
";

    const ALLOW_WEB: &str = "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-web, namespace: shop}
spec:
  selector: {matchLabels: {app: cart}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/front/sa/web]}}]
";

    const MESH_PERMISSIVE: &str = "
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: relax, namespace: istio-system}
spec: {mtls: {mode: PERMISSIVE}}
";

    fn set(yaml: &str) -> PolicySet {
        PolicySet::from_yaml(yaml, "default", "istio-system")
            .expect("valid policy")
            .0
    }

    fn authorizer(yaml: &str) -> PolicyAuthorizer {
        let labels: LabelLookup =
            Arc::new(|w: &LocalWorkload| BTreeMap::from([("app".to_owned(), w.name.clone())]));
        PolicyAuthorizer::new(set(yaml), labels)
    }

    fn conn(source: Option<&str>) -> InboundConnection {
        InboundConnection {
            source_identity: source.map(|s| s.parse::<SpiffeId>().expect("valid id")),
            source_addr: "10.0.0.1:40000".parse().expect("addr"),
            destination: "10.0.1.5:8080".parse().expect("addr"),
            workload: LocalWorkload {
                name: "cart".to_owned(),
                namespace: "shop".to_owned(),
                identity: "spiffe://cluster.local/ns/shop/sa/cart"
                    .parse()
                    .expect("valid id"),
            },
        }
    }

    const WEB: &str = "spiffe://cluster.local/ns/front/sa/web";
    const OTHER: &str = "spiffe://cluster.local/ns/front/sa/other";

    #[test]
    fn strict_denies_plaintext_and_allows_mtls() {
        let a = authorizer(STRICT);
        match a.authorize(&conn(None)) {
            Verdict::Deny { reason } => {
                assert!(reason.contains("mtls_required"), "{reason}");
                assert!(reason.contains("shop/strict"), "{reason}");
            }
            Verdict::Allow => panic!("plaintext must be denied under STRICT"),
        }
        assert_eq!(a.authorize(&conn(Some(WEB))), Verdict::Allow);
    }

    #[test]
    fn identity_allow_admits_one_principal_only() {
        let a = authorizer(ALLOW_WEB);
        assert_eq!(a.authorize(&conn(Some(WEB))), Verdict::Allow);
        match a.authorize(&conn(Some(OTHER))) {
            Verdict::Deny { reason } => assert!(reason.contains("no_allow_policy_matched")),
            Verdict::Allow => panic!("other principal must be kept out"),
        }
    }

    #[test]
    fn replace_with_mesh_permissive_relaxes_at_once() {
        let a = authorizer(STRICT);
        assert!(matches!(a.authorize(&conn(None)), Verdict::Deny { .. }));
        // The namespace STRICT would still win over a mesh-wide PERMISSIVE,
        // so the emergency set drops it, as an operator would.
        a.replace(set(MESH_PERMISSIVE));
        assert_eq!(a.authorize(&conn(None)), Verdict::Allow);
    }

    #[test]
    fn rechecks_of_live_connections_are_not_counted() {
        let a = authorizer(ALLOW_WEB);
        let (verdict, text) = a.authorize_explained(&conn(Some(OTHER)));
        assert!(matches!(verdict, Verdict::Deny { .. }), "{text}");
        // A policy change re-checks every live connection through `authorize`.
        for _ in 0..5 {
            assert!(matches!(
                a.authorize(&conn(Some(OTHER))),
                Verdict::Deny { .. }
            ));
            assert_eq!(a.authorize(&conn(Some(WEB))), Verdict::Allow);
        }
        let counts = a.decision_counts();
        assert_eq!(counts.values().sum::<u64>(), 1, "{counts:?}");
    }

    /// The tunnel logs each refusal; the authorizer must not add a second line.
    #[test]
    fn a_denial_is_not_logged_by_the_authorizer() {
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().expect("log buffer").extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || writer.clone())
            .finish();
        let a = authorizer(ALLOW_WEB);
        let (verdict, text) = tracing::subscriber::with_default(subscriber, || {
            a.authorize_explained(&conn(Some(OTHER)))
        });
        assert!(matches!(verdict, Verdict::Deny { .. }));
        // What the tunnel puts in its one log line names the reason and policy.
        assert_eq!(text, "DENY (no_allow_policy_matched) policy=shop/allow-web");
        let logged =
            String::from_utf8(buf.0.lock().expect("log buffer").clone()).expect("utf-8 log");
        assert!(logged.is_empty(), "{logged}");
    }

    #[test]
    fn counters_count_decisions() {
        let a = authorizer(&format!("{STRICT}---{ALLOW_WEB}"));
        a.authorize_explained(&conn(None));
        a.authorize_explained(&conn(None));
        a.authorize_explained(&conn(Some(WEB)));
        let counts = a.decision_counts();
        let denied = DecisionKey {
            allowed: false,
            reason: DecisionReason::MtlsRequired,
            policy: Some(PolicyName::new("shop", "strict")),
        };
        let allowed = DecisionKey {
            allowed: true,
            reason: DecisionReason::AllowedByPolicy,
            policy: Some(PolicyName::new("shop", "allow-web")),
        };
        assert_eq!(counts.get(&denied), Some(&2));
        assert_eq!(counts.get(&allowed), Some(&1));
        assert_eq!(counts.values().sum::<u64>(), 3);
    }

    /// Decisions first seen on several threads at once: the copy-on-write counter map
    /// loses no count (each new kind of decision copies it).
    #[test]
    fn decisions_counted_on_many_threads_at_once_are_all_counted() {
        let a = Arc::new(authorizer(&format!("{STRICT}---{ALLOW_WEB}")));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let a = a.clone();
                std::thread::spawn(move || {
                    for i in 0..500 {
                        let source = ((i + t) % 2 == 0).then_some(WEB);
                        a.authorize_explained(&conn(source));
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("counting thread");
        }
        let counts = a.decision_counts();
        assert_eq!(counts.values().sum::<u64>(), 2000);
        assert_eq!(counts.values().copied().collect::<Vec<_>>(), [1000, 1000]);
    }
}
