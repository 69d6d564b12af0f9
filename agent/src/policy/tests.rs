//! Table-driven tests: each row is policy YAML, a destination workload, a
//! connection, and the expected verdict.

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::*;

const ROOT: &str = "istio-system";
const DEFAULT_NS: &str = "default";
const CLIENT: &str = "spiffe://cluster.local/ns/bar/sa/client";

#[derive(Clone, Copy)]
struct Case {
    name: &'static str,
    yaml: &'static str,
    ns: &'static str,
    labels: &'static [(&'static str, &'static str)],
    principal: Option<&'static str>,
    src: &'static str,
    dst: &'static str,
    port: u16,
    allowed: bool,
    reason: DecisionReason,
    /// Expected deciding policy as `ns/name`.
    policy: Option<&'static str>,
}

/// Defaults: workload `foo` with `app: web`, mTLS client `bar/client` from
/// 10.1.2.3 to 10.9.9.9:8080, allowed with no policies.
const BASE: Case = Case {
    name: "",
    yaml: "",
    ns: "foo",
    labels: &[("app", "web"), ("version", "v1")],
    principal: Some(CLIENT),
    src: "10.1.2.3",
    dst: "10.9.9.9",
    port: 8080,
    allowed: true,
    reason: DecisionReason::NoPolicies,
    policy: None,
};

const DENIED: Case = Case {
    allowed: false,
    reason: DecisionReason::NoAllowPolicyMatched,
    ..BASE
};

const ALLOWED: Case = Case {
    reason: DecisionReason::AllowedByPolicy,
    ..BASE
};

const MTLS_REQUIRED: Case = Case {
    allowed: false,
    reason: DecisionReason::MtlsRequired,
    principal: None,
    ..BASE
};

/// DENY/AUDIT policies apply, none denies, and no ALLOW policy applies.
const NOT_DENIED: Case = Case {
    reason: DecisionReason::NoAllowPolicies,
    ..BASE
};

const DENIED_BY: Case = Case {
    allowed: false,
    reason: DecisionReason::DeniedByPolicy,
    ..BASE
};

fn load(yaml: &str) -> (PolicySet, Vec<PolicyWarning>) {
    PolicySet::from_yaml(yaml, DEFAULT_NS, ROOT).expect("policy YAML loads")
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test IP parses")
}

fn run(case: &Case) -> Decision {
    let (set, _) = PolicySet::from_yaml(case.yaml, DEFAULT_NS, ROOT)
        .unwrap_or_else(|e| panic!("{}: load failed: {e}", case.name));
    let labels = labels(case.labels);
    let workload = Workload {
        namespace: case.ns,
        labels: &labels,
    };
    let conn = Connection {
        source_principal: case.principal,
        source_ip: ip(case.src),
        destination_ip: ip(case.dst),
        destination_port: case.port,
    };
    set.evaluate(&workload, &conn)
}

#[test]
fn table() {
    let mut failures = Vec::new();
    for case in CASES {
        let d = run(case);
        let got_policy = d.policy.as_ref().map(ToString::to_string);
        if d.allowed != case.allowed
            || d.reason != case.reason
            || got_policy.as_deref() != case.policy
        {
            failures.push(format!(
                "{}: expected allowed={} reason={} policy={:?}, got {d}",
                case.name, case.allowed, case.reason, case.policy
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        CASES.len(),
        failures.join("\n")
    );
    assert!(CASES.len() >= 60);
}

// ---- PeerAuthentication documents -------------------------------------

const MESH_STRICT: &str = "
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
";

const NS_STRICT: &str = "
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: ns-strict, namespace: foo}
spec: {mtls: {mode: STRICT}}
";

const MESH_STRICT_NS_PERMISSIVE: &str = "
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: ns-permissive, namespace: foo}
spec: {mtls: {mode: PERMISSIVE}}
";

const WORKLOAD_STRICT: &str = "
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: web-strict, namespace: foo}
spec:
  selector: {matchLabels: {app: web}}
  mtls: {mode: STRICT}
";

const NS_STRICT_WORKLOAD_PERMISSIVE: &str = "
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: ns-strict, namespace: foo}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: web-permissive, namespace: foo}
spec:
  selector: {matchLabels: {app: web}}
  mtls: {mode: PERMISSIVE}
";

const PORT_LEVEL: &str = "
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: web-ports, namespace: foo}
spec:
  selector: {matchLabels: {app: web}}
  mtls: {mode: PERMISSIVE}
  portLevelMtls:
    8080: {mode: STRICT}
";

const NS_STRICT_PORT_PERMISSIVE: &str = "
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: ns-strict, namespace: foo}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: web-ports, namespace: foo}
spec:
  selector: {matchLabels: {app: web}}
  portLevelMtls:
    \"8080\": {mode: PERMISSIVE}
";

const WORKLOAD_UNSET_NS_STRICT: &str = "
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: ns-strict, namespace: foo}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: web-unset, namespace: foo}
spec:
  selector: {matchLabels: {app: web}}
  mtls: {mode: UNSET}
";

const NS_UNSET_MESH_STRICT: &str = "
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: ns-unset, namespace: foo}
spec: {mtls: {mode: UNSET}}
";

const PORT_UNSET_WORKLOAD_STRICT: &str = "
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: web-strict, namespace: foo}
spec:
  selector: {matchLabels: {app: web}}
  mtls: {mode: STRICT}
  portLevelMtls:
    8080: {mode: UNSET}
    9090: {mode: PERMISSIVE}
";

const NS_DISABLE: &str = "
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: ns-disable, namespace: foo}
spec: {mtls: {mode: DISABLE}}
";

const PORT_LEVEL_WITHOUT_SELECTOR: &str = "
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: ns-strict, namespace: foo}
spec:
  mtls: {mode: STRICT}
  portLevelMtls:
    8080: {mode: PERMISSIVE}
";

const V1_NS_STRICT: &str = "
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: ns-strict-v1, namespace: foo}
spec: {mtls: {mode: STRICT}}
";

const ROOT_SELECTOR_STRICT: &str = "
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: root-web, namespace: istio-system}
spec:
  selector: {matchLabels: {app: web}}
  mtls: {mode: STRICT}
";

const NO_NAMESPACE_STRICT: &str = "
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: strict}
spec: {mtls: {mode: STRICT}}
";

const NS_TIE: &str = "
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: b-permissive, namespace: foo}
spec: {mtls: {mode: PERMISSIVE}}
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: a-strict, namespace: foo}
spec: {mtls: {mode: STRICT}}
";

// ---- AuthorizationPolicy documents ------------------------------------

const ALLOW_NOTHING: &str = "
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: foo}
spec: {}
";

const ALLOW_EMPTY_RULE: &str = "
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: allow-all, namespace: foo}
spec:
  rules:
  - {}
";

const DENY_NO_RULES: &str = "
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: foo}
spec:
  action: DENY
";

macro_rules! allow_source {
    ($name:literal, $source:literal) => {
        concat!(
            "
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: ",
            $name,
            ", namespace: foo}
spec:
  rules:
  - from:
    - source: ",
            $source,
            "\n"
        )
    };
}

macro_rules! deny_source {
    ($name:literal, $source:literal) => {
        concat!(
            "
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: ",
            $name,
            ", namespace: foo}
spec:
  action: DENY
  rules:
  - from:
    - source: ",
            $source,
            "\n"
        )
    };
}

macro_rules! allow_operation {
    ($name:literal, $op:literal) => {
        concat!(
            "
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: ",
            $name,
            ", namespace: foo}
spec:
  rules:
  - to:
    - operation: ",
            $op,
            "\n"
        )
    };
}

macro_rules! allow_when {
    ($name:literal, $cond:literal) => {
        concat!(
            "
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: ",
            $name,
            ", namespace: foo}
spec:
  rules:
  - when:
    - ",
            $cond,
            "\n"
        )
    };
}

const ALLOW_PRINCIPAL_PLUS_IP: &str = "
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: p, namespace: foo}
spec:
  rules:
  - from:
    - source:
        principals: [cluster.local/ns/bar/sa/client]
        ipBlocks: [192.168.0.0/16]
";

const ALLOW_TWO_FROMS: &str = "
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: p, namespace: foo}
spec:
  rules:
  - from:
    - source: {principals: [cluster.local/ns/other/sa/x]}
    - source: {ipBlocks: [10.0.0.0/8]}
";

const ALLOW_TWO_TOS: &str = "
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: p, namespace: foo}
spec:
  rules:
  - to:
    - operation: {ports: [\"9090\"]}
    - operation: {ports: [\"8080\"]}
";

const ALLOW_TWO_RULES: &str = "
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: p, namespace: foo}
spec:
  rules:
  - from:
    - source: {namespaces: [other]}
  - to:
    - operation: {ports: [\"8080\"]}
";

const ALLOW_FROM_AND_TO: &str = "
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: p, namespace: foo}
spec:
  rules:
  - from:
    - source: {namespaces: [bar]}
    to:
    - operation: {ports: [\"9090\"]}
";

const ALLOW_FROM_AND_WHEN: &str = "
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: p, namespace: foo}
spec:
  rules:
  - from:
    - source: {namespaces: [bar]}
    when:
    - key: destination.ip
      values: [10.0.0.1]
";

const DENY_AND_ALLOW_SAME: &str = "
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: allow-bar, namespace: foo}
spec:
  rules:
  - from:
    - source: {namespaces: [bar]}
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: deny-bar, namespace: foo}
spec:
  action: DENY
  rules:
  - from:
    - source: {namespaces: [bar]}
";

const DENY_OTHER_ALLOW_BAR: &str = "
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: allow-bar, namespace: foo}
spec:
  rules:
  - from:
    - source: {namespaces: [bar]}
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: deny-other, namespace: foo}
spec:
  action: DENY
  rules:
  - from:
    - source: {namespaces: [other]}
";

const AUDIT_ALL: &str = "
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: audit-all, namespace: foo}
spec:
  action: AUDIT
  rules:
  - {}
";

const AUDIT_AND_ALLOW_NOTHING: &str = "
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: audit-all, namespace: foo}
spec:
  action: AUDIT
  rules:
  - {}
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: foo}
spec: {}
";

const ROOT_ALLOW_NOTHING: &str = "
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: istio-system}
spec: {}
";

const OTHER_NS_ALLOW_NOTHING: &str = "
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: bar}
spec: {}
";

const SELECTOR_OTHER_APP: &str = "
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: db-only, namespace: foo}
spec:
  selector: {matchLabels: {app: db}}
";

const SELECTOR_WEB: &str = "
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: web-only, namespace: foo}
spec:
  selector: {matchLabels: {app: web, version: v1}}
";

const ROOT_SELECTOR_WEB: &str = "
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: root-web, namespace: istio-system}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules:
  - from:
    - source: {namespaces: [bar]}
";

const ALLOW_L7_METHODS: &str = "
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: l7, namespace: foo}
spec:
  rules:
  - from:
    - source: {namespaces: [bar]}
    to:
    - operation: {methods: [GET]}
";

const ALLOW_L7_THEN_L4: &str = "
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: mixed, namespace: foo}
spec:
  rules:
  - to:
    - operation: {paths: [/api/*]}
  - from:
    - source: {namespaces: [bar]}
";

const DENY_L7_PATHS_AND_PORT: &str = "
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: foo}
spec:
  action: DENY
  rules:
  - to:
    - operation: {paths: [/admin], ports: [\"8080\"]}
";

const DENY_L7_HEADER: &str = "
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: deny-header, namespace: foo}
spec:
  action: DENY
  rules:
  - when:
    - key: request.headers[x-debug]
      values: [\"1\"]
";

const DENY_REQUEST_PRINCIPALS: &str = "
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: deny-jwt, namespace: foo}
spec:
  action: DENY
  rules:
  - from:
    - source: {notRequestPrincipals: [\"*\"]}
";

const ALLOW_HOSTS: &str = "
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: hosts, namespace: foo}
spec:
  rules:
  - to:
    - operation: {hosts: [web.foo.svc]}
";

const ALLOW_REMOTE_IP_KEY: &str = "
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: remote-key, namespace: foo}
spec:
  rules:
  - when:
    - key: remote.ip
      values: [10.0.0.0/8]
";

const CUSTOM: &str = "
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: ext-authz, namespace: foo}
spec:
  action: CUSTOM
  provider: {name: opa}
  rules:
  - {}
";

const TARGET_REFS_ALLOW: &str = "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: waypoint-allow, namespace: foo}
spec:
  targetRefs:
  - {kind: Service, group: \"\", name: web}
  rules:
  - from:
    - source: {namespaces: [bar]}
";

const TARGET_REF_DENY: &str = "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: waypoint-deny, namespace: foo}
spec:
  targetRef: {kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}
  action: DENY
  rules:
  - {}
";

const V1_ALLOW: &str = "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: v1-allow, namespace: foo}
spec:
  action: ALLOW
  rules:
  - from:
    - source: {principals: [\"*\"]}
";

const MIXED_KINDS: &str = "
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {name: dr}
spec: {host: web, trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}}
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: bar-only, namespace: foo}
spec:
  rules:
  - from:
    - source: {namespaces: [bar]}
---
apiVersion: monitoring.coreos.com/v1
kind: ServiceMonitor
metadata: {name: sm}
spec: {}
";

const DEFAULT_NS_ALLOW_NOTHING: &str = "
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: lockdown}
spec: {}
";

const PERMISSIVE_ALLOW_IP: &str = "
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: lan, namespace: foo}
spec:
  rules:
  - from:
    - source: {ipBlocks: [10.0.0.0/8]}
";

#[rustfmt::skip]
const CASES: &[Case] = &[
    // PeerAuthentication
    Case { name: "no policies, plaintext", principal: None, ..BASE },
    Case { name: "mesh STRICT denies plaintext", yaml: MESH_STRICT, policy: Some("istio-system/default"), ..MTLS_REQUIRED },
    Case { name: "mesh STRICT admits mTLS", yaml: MESH_STRICT, ..BASE },
    Case { name: "namespace STRICT denies plaintext", yaml: NS_STRICT, policy: Some("foo/ns-strict"), ..MTLS_REQUIRED },
    Case { name: "namespace STRICT elsewhere does not apply", yaml: NS_STRICT, ns: "bar", principal: None, ..BASE },
    Case { name: "namespace PERMISSIVE overrides mesh STRICT", yaml: MESH_STRICT_NS_PERMISSIVE, principal: None, ..BASE },
    Case { name: "mesh STRICT still applies to other namespaces", yaml: MESH_STRICT_NS_PERMISSIVE, ns: "baz", policy: Some("istio-system/default"), ..MTLS_REQUIRED },
    Case { name: "workload STRICT, selector matches", yaml: WORKLOAD_STRICT, policy: Some("foo/web-strict"), ..MTLS_REQUIRED },
    Case { name: "workload STRICT, selector mismatch", yaml: WORKLOAD_STRICT, labels: &[("app", "db")], principal: None, ..BASE },
    Case { name: "workload PERMISSIVE overrides namespace STRICT", yaml: NS_STRICT_WORKLOAD_PERMISSIVE, principal: None, ..BASE },
    Case { name: "namespace STRICT for workloads the selector misses", yaml: NS_STRICT_WORKLOAD_PERMISSIVE, labels: &[("app", "db")], policy: Some("foo/ns-strict"), ..MTLS_REQUIRED },
    Case { name: "port-level STRICT on the port", yaml: PORT_LEVEL, policy: Some("foo/web-ports"), ..MTLS_REQUIRED },
    Case { name: "port-level STRICT, other port uses workload mode", yaml: PORT_LEVEL, port: 9090, principal: None, ..BASE },
    Case { name: "port-level PERMISSIVE beats namespace STRICT", yaml: NS_STRICT_PORT_PERMISSIVE, principal: None, ..BASE },
    Case { name: "port-level only, other port inherits namespace STRICT", yaml: NS_STRICT_PORT_PERMISSIVE, port: 9090, policy: Some("foo/ns-strict"), ..MTLS_REQUIRED },
    Case { name: "workload UNSET inherits namespace STRICT", yaml: WORKLOAD_UNSET_NS_STRICT, policy: Some("foo/ns-strict"), ..MTLS_REQUIRED },
    Case { name: "namespace UNSET inherits mesh STRICT", yaml: NS_UNSET_MESH_STRICT, policy: Some("istio-system/default"), ..MTLS_REQUIRED },
    Case { name: "port-level UNSET inherits workload STRICT", yaml: PORT_UNSET_WORKLOAD_STRICT, policy: Some("foo/web-strict"), ..MTLS_REQUIRED },
    Case { name: "port-level PERMISSIVE beats workload STRICT", yaml: PORT_UNSET_WORKLOAD_STRICT, port: 9090, principal: None, ..BASE },
    Case { name: "DISABLE admits plaintext", yaml: NS_DISABLE, principal: None, ..BASE },
    Case { name: "DISABLE admits mTLS", yaml: NS_DISABLE, ..BASE },
    Case { name: "portLevelMtls without selector is ignored", yaml: PORT_LEVEL_WITHOUT_SELECTOR, policy: Some("foo/ns-strict"), ..MTLS_REQUIRED },
    Case { name: "v1 PeerAuthentication", yaml: V1_NS_STRICT, policy: Some("foo/ns-strict-v1"), ..MTLS_REQUIRED },
    Case { name: "root-namespace PA with selector only covers root namespace", yaml: ROOT_SELECTOR_STRICT, principal: None, ..BASE },
    Case { name: "PA without namespace lands in the default namespace", yaml: NO_NAMESPACE_STRICT, ns: "default", policy: Some("default/strict"), ..MTLS_REQUIRED },
    Case { name: "PA without namespace does not reach foo", yaml: NO_NAMESPACE_STRICT, principal: None, ..BASE },
    Case { name: "namespace-level tie: first by name wins", yaml: NS_TIE, policy: Some("foo/a-strict"), ..MTLS_REQUIRED },
    // Empty policies and actions
    Case { name: "ALLOW spec {} denies everything", yaml: ALLOW_NOTHING, policy: Some("foo/allow-nothing"), ..DENIED },
    Case { name: "ALLOW rule {} allows everything", yaml: ALLOW_EMPTY_RULE, policy: Some("foo/allow-all"), ..ALLOWED },
    Case { name: "ALLOW rule {} admits plaintext too", yaml: ALLOW_EMPTY_RULE, principal: None, policy: Some("foo/allow-all"), ..ALLOWED },
    Case { name: "DENY without rules denies nothing", yaml: DENY_NO_RULES, ..NOT_DENIED },
    // principals
    Case { name: "principals exact match", yaml: allow_source!("p", "{principals: [cluster.local/ns/bar/sa/client]}"), policy: Some("foo/p"), ..ALLOWED },
    Case { name: "principals exact mismatch", yaml: allow_source!("p", "{principals: [cluster.local/ns/bar/sa/other]}"), policy: Some("foo/p"), ..DENIED },
    Case { name: "principals with spiffe:// prefix never match (Istio)", yaml: allow_source!("p", "{principals: [\"spiffe://cluster.local/ns/bar/sa/client\"]}"), policy: Some("foo/p"), ..DENIED },
    Case { name: "principals prefix wildcard", yaml: allow_source!("p", "{principals: [\"cluster.local/ns/bar/*\"]}"), policy: Some("foo/p"), ..ALLOWED },
    Case { name: "principals prefix wildcard mismatch", yaml: allow_source!("p", "{principals: [\"cluster.local/ns/baz/*\"]}"), policy: Some("foo/p"), ..DENIED },
    Case { name: "principals suffix wildcard", yaml: allow_source!("p", "{principals: [\"*/sa/client\"]}"), policy: Some("foo/p"), ..ALLOWED },
    Case { name: "principals * admits any identity", yaml: allow_source!("p", "{principals: [\"*\"]}"), policy: Some("foo/p"), ..ALLOWED },
    Case { name: "principals * refuses plaintext", yaml: allow_source!("p", "{principals: [\"*\"]}"), principal: None, policy: Some("foo/p"), ..DENIED },
    Case { name: "notPrincipals, identity not listed", yaml: allow_source!("p", "{notPrincipals: [cluster.local/ns/bar/sa/other]}"), policy: Some("foo/p"), ..ALLOWED },
    Case { name: "notPrincipals, identity listed", yaml: allow_source!("p", "{notPrincipals: [\"cluster.local/ns/bar/*\"]}"), policy: Some("foo/p"), ..DENIED },
    Case { name: "ALLOW notPrincipals admits plaintext (Istio)", yaml: allow_source!("p", "{notPrincipals: [cluster.local/ns/bar/sa/other]}"), principal: None, policy: Some("foo/p"), ..ALLOWED },
    Case { name: "DENY notPrincipals denies plaintext", yaml: deny_source!("d", "{notPrincipals: [\"*\"]}"), principal: None, policy: Some("foo/d"), ..DENIED_BY },
    Case { name: "DENY notPrincipals spares listed identity", yaml: deny_source!("d", "{notPrincipals: [\"*/sa/client\"]}"), ..NOT_DENIED },
    // namespaces
    Case { name: "namespaces match", yaml: allow_source!("p", "{namespaces: [bar]}"), policy: Some("foo/p"), ..ALLOWED },
    Case { name: "namespaces mismatch", yaml: allow_source!("p", "{namespaces: [baz]}"), policy: Some("foo/p"), ..DENIED },
    Case { name: "namespaces prefix wildcard", yaml: allow_source!("p", "{namespaces: [\"ba*\"]}"), policy: Some("foo/p"), ..ALLOWED },
    Case { name: "namespaces suffix wildcard", yaml: allow_source!("p", "{namespaces: [\"*ar\"]}"), policy: Some("foo/p"), ..ALLOWED },
    Case { name: "namespaces refuse plaintext", yaml: allow_source!("p", "{namespaces: [\"*\"]}"), principal: None, policy: Some("foo/p"), ..DENIED },
    Case { name: "notNamespaces listed", yaml: allow_source!("p", "{notNamespaces: [bar]}"), policy: Some("foo/p"), ..DENIED },
    Case { name: "notNamespaces not listed", yaml: allow_source!("p", "{notNamespaces: [kube-system]}"), policy: Some("foo/p"), ..ALLOWED },
    Case { name: "DENY notNamespaces denies plaintext", yaml: deny_source!("d", "{notNamespaces: [foo]}"), principal: None, policy: Some("foo/d"), ..DENIED_BY },
    // ipBlocks / remoteIpBlocks
    Case { name: "ipBlocks v4 CIDR match", yaml: allow_source!("p", "{ipBlocks: [10.0.0.0/8]}"), policy: Some("foo/p"), ..ALLOWED },
    Case { name: "ipBlocks v4 CIDR mismatch", yaml: allow_source!("p", "{ipBlocks: [192.168.0.0/16]}"), policy: Some("foo/p"), ..DENIED },
    Case { name: "ipBlocks single IP", yaml: allow_source!("p", "{ipBlocks: [10.1.2.3]}"), policy: Some("foo/p"), ..ALLOWED },
    Case { name: "ipBlocks single IP mismatch", yaml: allow_source!("p", "{ipBlocks: [10.1.2.4]}"), policy: Some("foo/p"), ..DENIED },
    Case { name: "ipBlocks v6 CIDR match", yaml: allow_source!("p", "{ipBlocks: [\"fd00::/64\"]}"), src: "fd00::5", policy: Some("foo/p"), ..ALLOWED },
    Case { name: "ipBlocks v6 single IP", yaml: allow_source!("p", "{ipBlocks: [\"fd00::5\"]}"), src: "fd00::5", policy: Some("foo/p"), ..ALLOWED },
    Case { name: "ipBlocks v6 CIDR vs v4 source", yaml: allow_source!("p", "{ipBlocks: [\"fd00::/64\"]}"), policy: Some("foo/p"), ..DENIED },
    Case { name: "ipBlocks v4 CIDR vs v4-mapped v6 source", yaml: allow_source!("p", "{ipBlocks: [10.0.0.0/8]}"), src: "::ffff:10.1.2.3", policy: Some("foo/p"), ..ALLOWED },
    Case { name: "notIpBlocks containing source", yaml: allow_source!("p", "{notIpBlocks: [10.1.0.0/16]}"), policy: Some("foo/p"), ..DENIED },
    Case { name: "notIpBlocks not containing source", yaml: allow_source!("p", "{notIpBlocks: [10.2.0.0/16]}"), policy: Some("foo/p"), ..ALLOWED },
    Case { name: "remoteIpBlocks is HTTP-only: ALLOW rule never matches (Istio)", yaml: allow_source!("p", "{remoteIpBlocks: [10.1.2.0/24]}"), policy: Some("foo/p"), ..DENIED },
    Case { name: "remoteIpBlocks mismatch", yaml: allow_source!("p", "{remoteIpBlocks: [10.1.3.0/24]}"), policy: Some("foo/p"), ..DENIED },
    Case { name: "DENY remoteIpBlocks is ignored, rule matches without it (Istio)", yaml: deny_source!("d", "{remoteIpBlocks: [192.168.0.0/16]}"), policy: Some("foo/d"), ..DENIED_BY },
    // serviceAccounts (ns/sa, or sa in the policy's namespace; exact)
    Case { name: "serviceAccounts ns/sa match", yaml: allow_source!("p", "{serviceAccounts: [bar/client]}"), policy: Some("foo/p"), ..ALLOWED },
    Case { name: "serviceAccounts bare sa is in the policy's namespace", yaml: allow_source!("p", "{serviceAccounts: [client]}"), policy: Some("foo/p"), ..DENIED },
    Case { name: "serviceAccounts bare sa matches a client of that namespace", yaml: allow_source!("p", "{serviceAccounts: [client]}"), principal: Some("spiffe://cluster.local/ns/foo/sa/client"), policy: Some("foo/p"), ..ALLOWED },
    Case { name: "serviceAccounts ignore the trust domain", yaml: allow_source!("p", "{serviceAccounts: [bar/client]}"), principal: Some("spiffe://other.td/ns/bar/sa/client"), policy: Some("foo/p"), ..ALLOWED },
    Case { name: "serviceAccounts have no wildcards", yaml: allow_source!("p", "{serviceAccounts: [\"bar/*\"]}"), policy: Some("foo/p"), ..DENIED },
    Case { name: "serviceAccounts refuse plaintext", yaml: allow_source!("p", "{serviceAccounts: [bar/client]}"), principal: None, policy: Some("foo/p"), ..DENIED },
    Case { name: "notServiceAccounts listed", yaml: allow_source!("p", "{notServiceAccounts: [bar/client]}"), policy: Some("foo/p"), ..DENIED },
    Case { name: "notServiceAccounts admit plaintext (Istio)", yaml: allow_source!("p", "{notServiceAccounts: [bar/client]}"), principal: None, policy: Some("foo/p"), ..ALLOWED },
    Case { name: "DENY serviceAccounts", yaml: deny_source!("d", "{serviceAccounts: [bar/client]}"), policy: Some("foo/d"), ..DENIED_BY },
    // unknown fields: like HTTP attributes (ALLOW never matches, DENY matches without)
    Case { name: "ALLOW with a typo (principles) admits no one", yaml: allow_source!("p", "{principles: [cluster.local/ns/bar/sa/client]}"), policy: Some("foo/p"), ..DENIED },
    Case { name: "ALLOW with a typo (principles) keeps plaintext out", yaml: allow_source!("p", "{principles: [cluster.local/ns/bar/sa/client]}"), principal: None, policy: Some("foo/p"), ..DENIED },
    Case { name: "DENY with an unknown field matches without it", yaml: deny_source!("d", "{namespaces: [bar], futureField: [x]}"), policy: Some("foo/d"), ..DENIED_BY },
    Case { name: "notRemoteIpBlocks containing source", yaml: allow_source!("p", "{notRemoteIpBlocks: [10.1.2.3]}"), policy: Some("foo/p"), ..DENIED },
    Case { name: "ipBlocks admit plaintext under PERMISSIVE", yaml: PERMISSIVE_ALLOW_IP, principal: None, policy: Some("foo/lan"), ..ALLOWED },
    // operation ports
    Case { name: "ports match", yaml: allow_operation!("p", "{ports: [\"8080\"]}"), policy: Some("foo/p"), ..ALLOWED },
    Case { name: "ports mismatch", yaml: allow_operation!("p", "{ports: [\"9090\"]}"), policy: Some("foo/p"), ..DENIED },
    Case { name: "ports written as integers", yaml: allow_operation!("p", "{ports: [8080, 9090]}"), policy: Some("foo/p"), ..ALLOWED },
    Case { name: "notPorts listed", yaml: allow_operation!("p", "{notPorts: [\"8080\"]}"), policy: Some("foo/p"), ..DENIED },
    Case { name: "notPorts not listed", yaml: allow_operation!("p", "{notPorts: [\"9090\"]}"), policy: Some("foo/p"), ..ALLOWED },
    // when
    Case { name: "when source.ip values", yaml: allow_when!("p", "{key: source.ip, values: [10.1.0.0/16]}"), policy: Some("foo/p"), ..ALLOWED },
    Case { name: "when source.ip notValues", yaml: allow_when!("p", "{key: source.ip, notValues: [10.1.2.3]}"), policy: Some("foo/p"), ..DENIED },
    Case { name: "when destination.ip values", yaml: allow_when!("p", "{key: destination.ip, values: [10.9.9.9]}"), policy: Some("foo/p"), ..ALLOWED },
    Case { name: "when destination.ip notValues", yaml: allow_when!("p", "{key: destination.ip, notValues: [10.9.0.0/16]}"), policy: Some("foo/p"), ..DENIED },
    Case { name: "when destination.port values", yaml: allow_when!("p", "{key: destination.port, values: [\"8080\"]}"), policy: Some("foo/p"), ..ALLOWED },
    Case { name: "when destination.port notValues", yaml: allow_when!("p", "{key: destination.port, notValues: [\"8080\"]}"), policy: Some("foo/p"), ..DENIED },
    Case { name: "when source.namespace values", yaml: allow_when!("p", "{key: source.namespace, values: [bar]}"), policy: Some("foo/p"), ..ALLOWED },
    Case { name: "when source.namespace notValues", yaml: allow_when!("p", "{key: source.namespace, notValues: [\"b*\"]}"), policy: Some("foo/p"), ..DENIED },
    Case { name: "when source.principal values", yaml: allow_when!("p", "{key: source.principal, values: [\"cluster.local/ns/bar/sa/client\"]}"), policy: Some("foo/p"), ..ALLOWED },
    Case { name: "when source.principal notValues", yaml: allow_when!("p", "{key: source.principal, notValues: [\"*\"]}"), policy: Some("foo/p"), ..DENIED },
    Case { name: "when source.principal refuses plaintext", yaml: allow_when!("p", "{key: source.principal, values: [\"*\"]}"), principal: None, policy: Some("foo/p"), ..DENIED },
    // Combination logic
    Case { name: "source fields are ANDed", yaml: ALLOW_PRINCIPAL_PLUS_IP, policy: Some("foo/p"), ..DENIED },
    Case { name: "from entries are ORed", yaml: ALLOW_TWO_FROMS, policy: Some("foo/p"), ..ALLOWED },
    Case { name: "to entries are ORed", yaml: ALLOW_TWO_TOS, policy: Some("foo/p"), ..ALLOWED },
    Case { name: "rules are ORed", yaml: ALLOW_TWO_RULES, policy: Some("foo/p"), ..ALLOWED },
    Case { name: "from and to are ANDed", yaml: ALLOW_FROM_AND_TO, policy: Some("foo/p"), ..DENIED },
    Case { name: "from and to are ANDed (both match)", yaml: ALLOW_FROM_AND_TO, port: 9090, policy: Some("foo/p"), ..ALLOWED },
    Case { name: "from and when are ANDed", yaml: ALLOW_FROM_AND_WHEN, policy: Some("foo/p"), ..DENIED },
    // Precedence
    Case { name: "DENY wins over ALLOW", yaml: DENY_AND_ALLOW_SAME, policy: Some("foo/deny-bar"), ..DENIED_BY },
    Case { name: "non-matching DENY, matching ALLOW", yaml: DENY_OTHER_ALLOW_BAR, policy: Some("foo/allow-bar"), ..ALLOWED },
    Case { name: "matching DENY alone", yaml: deny_source!("d", "{namespaces: [bar]}"), policy: Some("foo/d"), ..DENIED_BY },
    Case { name: "non-matching DENY alone allows", yaml: deny_source!("d", "{namespaces: [other]}"), ..NOT_DENIED },
    Case { name: "AUDIT does not change an allow", yaml: AUDIT_ALL, ..NOT_DENIED },
    Case { name: "AUDIT does not change a deny", yaml: AUDIT_AND_ALLOW_NOTHING, policy: Some("foo/allow-nothing"), ..DENIED },
    // Scopes
    Case { name: "root-namespace ALLOW applies mesh-wide", yaml: ROOT_ALLOW_NOTHING, policy: Some("istio-system/allow-nothing"), ..DENIED },
    Case { name: "other namespace's ALLOW does not apply", yaml: OTHER_NS_ALLOW_NOTHING, ..BASE },
    Case { name: "selector mismatch does not apply", yaml: SELECTOR_OTHER_APP, ..BASE },
    Case { name: "selector match applies", yaml: SELECTOR_WEB, policy: Some("foo/web-only"), ..DENIED },
    Case { name: "selector needs all labels", yaml: SELECTOR_WEB, labels: &[("app", "web")], ..BASE },
    Case { name: "root-namespace selector applies in every namespace", yaml: ROOT_SELECTOR_WEB, policy: Some("istio-system/root-web"), ..DENIED_BY },
    Case { name: "root-namespace selector mismatch", yaml: ROOT_SELECTOR_WEB, labels: &[("app", "db")], ..BASE },
    Case { name: "AP without namespace lands in default namespace", yaml: DEFAULT_NS_ALLOW_NOTHING, ns: "default", policy: Some("default/lockdown"), ..DENIED },
    Case { name: "AP without namespace does not reach foo", yaml: DEFAULT_NS_ALLOW_NOTHING, ..BASE },
    // L7 fields
    Case { name: "ALLOW with methods never matches", yaml: ALLOW_L7_METHODS, policy: Some("foo/l7"), ..DENIED },
    Case { name: "ALLOW L7 rule skipped, L4 rule matches", yaml: ALLOW_L7_THEN_L4, policy: Some("foo/mixed"), ..ALLOWED },
    Case { name: "DENY with paths matches on its ports", yaml: DENY_L7_PATHS_AND_PORT, policy: Some("foo/deny-admin"), ..DENIED_BY },
    Case { name: "DENY with paths, other port", yaml: DENY_L7_PATHS_AND_PORT, port: 9090, ..NOT_DENIED },
    Case { name: "DENY with header condition denies all", yaml: DENY_L7_HEADER, policy: Some("foo/deny-header"), ..DENIED_BY },
    Case { name: "DENY with notRequestPrincipals denies all", yaml: DENY_REQUEST_PRINCIPALS, policy: Some("foo/deny-jwt"), ..DENIED_BY },
    Case { name: "ALLOW with hosts never matches", yaml: ALLOW_HOSTS, policy: Some("foo/hosts"), ..DENIED },
    Case { name: "ALLOW with remote.ip condition never matches", yaml: ALLOW_REMOTE_IP_KEY, policy: Some("foo/remote-key"), ..DENIED },
    // Refused / ignored policies
    Case { name: "CUSTOM is ignored", yaml: CUSTOM, ..BASE },
    Case { name: "targetRefs ALLOW keeps the namespace allow-listed", yaml: TARGET_REFS_ALLOW, policy: Some("foo/waypoint-allow"), ..DENIED },
    Case { name: "targetRef DENY is ignored", yaml: TARGET_REF_DENY, ..BASE },
    // Versions and mixed input
    Case { name: "v1 AuthorizationPolicy", yaml: V1_ALLOW, policy: Some("foo/v1-allow"), ..ALLOWED },
    Case { name: "other kinds skipped", yaml: MIXED_KINDS, policy: Some("foo/bar-only"), ..ALLOWED },
    Case { name: "other kinds skipped, policy still enforced", yaml: MIXED_KINDS, principal: Some("spiffe://cluster.local/ns/baz/sa/x"), policy: Some("foo/bar-only"), ..DENIED },
];

// ---- Non-table checks --------------------------------------------------

fn web_labels() -> BTreeMap<String, String> {
    labels(&[("app", "web"), ("version", "v1")])
}

fn conn(principal: Option<&str>, port: u16) -> Connection<'_> {
    Connection {
        source_principal: principal,
        source_ip: ip("10.1.2.3"),
        destination_ip: ip("10.9.9.9"),
        destination_port: port,
    }
}

fn load_err(yaml: &str) -> String {
    match PolicySet::from_yaml(yaml, DEFAULT_NS, ROOT) {
        Ok(_) => panic!("expected an error for:\n{yaml}"),
        Err(e) => e.to_string(),
    }
}

fn messages(warnings: &[PolicyWarning]) -> Vec<String> {
    warnings.iter().map(ToString::to_string).collect()
}

#[test]
fn matching_rule_index_is_reported() {
    let (set, _) = load(ALLOW_TWO_RULES);
    let labels = web_labels();
    let w = Workload {
        namespace: "foo",
        labels: &labels,
    };
    let d = set.evaluate(&w, &conn(Some(CLIENT), 8080));
    assert_eq!(d.rule, Some(1));
    assert_eq!(
        d.to_string(),
        "ALLOW (allowed_by_policy) policy=foo/p rule=1"
    );
}

#[test]
fn audit_matches_are_recorded() {
    let (set, _) = load(AUDIT_AND_ALLOW_NOTHING);
    let labels = web_labels();
    let w = Workload {
        namespace: "foo",
        labels: &labels,
    };
    let d = set.evaluate(&w, &conn(Some(CLIENT), 8080));
    assert!(!d.allowed);
    assert_eq!(d.audited, vec![PolicyName::new("foo", "audit-all")]);
    assert!(d.to_string().contains("audited=[foo/audit-all]"), "{d}");
}

#[test]
fn mtls_mode_is_effective() {
    let (set, _) = load(PORT_UNSET_WORKLOAD_STRICT);
    let labels = web_labels();
    let w = Workload {
        namespace: "foo",
        labels: &labels,
    };
    assert_eq!(set.mtls_mode(&w, 8080), MtlsMode::Strict);
    assert_eq!(set.mtls_mode(&w, 9090), MtlsMode::Permissive);
    let other = Workload {
        namespace: "bar",
        labels: &labels,
    };
    assert_eq!(set.mtls_mode(&other, 8080), MtlsMode::Permissive);
    let (set, _) = load(NS_DISABLE);
    assert_eq!(set.mtls_mode(&w, 8080), MtlsMode::Disable);
    let (set, _) = load(NS_UNSET_MESH_STRICT);
    assert_eq!(set.mtls_mode(&w, 1), MtlsMode::Strict);
}

#[test]
fn reasons_display_as_metric_labels() {
    let all = [
        (DecisionReason::MtlsRequired, "mtls_required"),
        (DecisionReason::DeniedByPolicy, "denied_by_policy"),
        (DecisionReason::AllowedByPolicy, "allowed_by_policy"),
        (
            DecisionReason::NoAllowPolicyMatched,
            "no_allow_policy_matched",
        ),
        (DecisionReason::NoPolicies, "no_policies"),
    ];
    for (reason, text) in all {
        assert_eq!(reason.to_string(), text);
    }
}

#[test]
fn explain_names_mode_policy_and_rule() {
    let yaml = format!("{NS_STRICT}---\n{ALLOW_TWO_RULES}");
    let (set, _) = load(&yaml);
    let labels = web_labels();
    let w = Workload {
        namespace: "foo",
        labels: &labels,
    };
    let text = set.explain(&w, &conn(Some(CLIENT), 8080));
    assert!(text.contains("mtls=STRICT (from foo/ns-strict)"), "{text}");
    assert!(
        text.contains("ALLOW (allowed_by_policy) policy=foo/p rule=1"),
        "{text}"
    );
    let text = set.explain(&w, &conn(None, 8080));
    assert!(text.contains("<plaintext>"), "{text}");
    assert!(
        text.contains("DENY (mtls_required) policy=foo/ns-strict"),
        "{text}"
    );
}

#[test]
fn deny_without_rules_warns() {
    let (set, warnings) = load(DENY_NO_RULES);
    assert_eq!(set.len(), 1);
    assert_eq!(warnings.len(), 1, "{:?}", messages(&warnings));
    assert_eq!(warnings[0].policy, PolicyName::new("foo", "deny-all"));
    assert_eq!(warnings[0].kind, "AuthorizationPolicy");
    assert!(warnings[0].message.contains("denies nothing"));
    assert!(
        warnings[0]
            .to_string()
            .starts_with("AuthorizationPolicy foo/deny-all: ")
    );
}

#[test]
fn reasons_say_which_policies_applied() {
    let labels = web_labels();
    let workload = Workload {
        namespace: "foo",
        labels: &labels,
    };
    let client = conn(Some(CLIENT), 8080);
    // `spec: {}` denies everything, and the denial names it.
    let (set, _) = load(ALLOW_NOTHING);
    let d = set.evaluate(&workload, &client);
    assert_eq!(
        d.to_string(),
        "DENY (no_allow_policy_matched) policy=foo/allow-nothing"
    );
    // Several ALLOW policies, none matching: all are named.
    let two = format!(
        "{ALLOW_NOTHING}---{}",
        allow_source!("p", "{principals: [cluster.local/ns/bar/sa/other]}")
    );
    let (set, _) = load(&two);
    let d = set.evaluate(&workload, &client);
    assert_eq!(d.policy, Some(PolicyName::new("foo", "allow-nothing")));
    assert_eq!(
        d.to_string(),
        "DENY (no_allow_policy_matched) policies=[foo/allow-nothing, foo/p]"
    );
    // A DENY policy applies but does not match: not "no policies".
    let (set, _) = load(DENY_NO_RULES);
    assert_eq!(
        set.evaluate(&workload, &client).to_string(),
        "ALLOW (no_allow_policies)"
    );
    // Nothing applies to this workload at all.
    let other = self::labels(&[("app", "db")]);
    let (set, _) = load(
        allow_source!("p", "{principals: [\"*\"]}")
            .replace("rules:", "selector: {matchLabels: {app: web}}\n  rules:")
            .as_str(),
    );
    let db = Workload {
        namespace: "foo",
        labels: &other,
    };
    assert_eq!(
        set.evaluate(&db, &client).to_string(),
        "ALLOW (no_policies)"
    );
}

#[test]
fn spiffe_principals_warn_naming_policy_place_and_value() {
    let yaml = "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: foo}
spec:
  rules:
  - from:
    - source: {principals: [cluster.local/ns/a/sa/ok, \"spiffe://cluster.local/ns/bar/sa/client\"]}
  - from:
    - source: {namespaces: [bar], notPrincipals: [\"spiffe://cluster.local/ns/bar/sa/x\"]}
    when:
    - {key: source.principal, values: [\"spiffe://cluster.local/ns/bar/sa/client\"]}
";
    let (set, warnings) = load(yaml);
    let text = messages(&warnings);
    assert_eq!(warnings.len(), 3, "{text:?}");
    assert!(
        warnings
            .iter()
            .all(|w| w.policy == PolicyName::new("foo", "p"))
    );
    assert!(
        text[0].contains("spec.rules[0].from[0].source.principals[1]")
            && text[0].contains("\"spiffe://cluster.local/ns/bar/sa/client\"")
            && text[0].contains("never matches")
            && text[0].contains("\"cluster.local/ns/bar/sa/client\""),
        "{text:?}"
    );
    assert!(
        text[1].contains("source.notPrincipals[0]") && text[1].contains("excludes no one"),
        "{text:?}"
    );
    assert!(
        text[2].contains("spec.rules[1].when[0].values[0]"),
        "{text:?}"
    );
    // And it really never matches (rule 1 needs it through `when`).
    let labels = web_labels();
    let workload = Workload {
        namespace: "foo",
        labels: &labels,
    };
    assert!(!set.evaluate(&workload, &conn(Some(CLIENT), 8080)).allowed);
}

#[test]
fn allow_rules_admitting_plaintext_through_negation_warn() {
    let yaml = "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: foo}
spec:
  rules:
  - from:
    - source: {notPrincipals: [cluster.local/ns/bar/sa/x]}
  - from:
    - source: {principals: [\"*\"], notNamespaces: [kube-system]}
  - from:
    - source: {ipBlocks: [10.0.0.0/8]}
  - when:
    - {key: source.namespace, notValues: [kube-system]}
  - from:
    - source: {notServiceAccounts: [bar/x]}
    when:
    - {key: source.principal, values: [\"*\"]}
";
    let (_, warnings) = load(yaml);
    let text = messages(&warnings);
    // Rules 0 and 3 admit plaintext only because the missing identity is in no
    // negated list; rule 1 and 4 need an identity, rule 2 never looks at one.
    assert_eq!(warnings.len(), 2, "{text:?}");
    assert!(
        text[0].contains("spec.rules[0] admits plaintext"),
        "{text:?}"
    );
    assert!(
        text[1].contains("spec.rules[3] admits plaintext"),
        "{text:?}"
    );
    assert!(text[0].contains("STRICT PeerAuthentication"), "{text:?}");
    // DENY rules do not warn: matching plaintext there denies more.
    let (_, warnings) = load(&yaml.replace("spec:\n", "spec:\n  action: DENY\n"));
    assert!(warnings.is_empty(), "{:?}", messages(&warnings));
}

#[test]
fn l7_fields_warn_once_per_policy_naming_fields() {
    let yaml = "
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: l7, namespace: foo}
spec:
  rules:
  - to:
    - operation: {methods: [GET], paths: [/a]}
  - to:
    - operation: {methods: [POST], notHosts: [x]}
    when:
    - key: request.auth.claims[iss]
      values: [me]
  - from:
    - source: {requestPrincipals: [\"*\"]}
";
    let (_, warnings) = load(yaml);
    assert_eq!(warnings.len(), 1, "{:?}", messages(&warnings));
    let msg = &warnings[0].message;
    for field in [
        "methods",
        "paths",
        "notHosts",
        "requestPrincipals",
        "when[request.auth.claims[iss]]",
    ] {
        assert!(msg.contains(field), "{field} missing from {msg}");
    }
    assert!(msg.contains("never match"), "{msg}");
    let (_, warnings) = load(DENY_L7_HEADER);
    assert_eq!(warnings.len(), 1);
    assert!(
        warnings[0]
            .message
            .contains("when[request.headers[x-debug]]")
    );
}

#[test]
fn refused_policies_warn() {
    let (set, warnings) = load(CUSTOM);
    assert!(set.is_empty());
    assert!(messages(&warnings)[0].contains("CUSTOM"));
    let (set, warnings) = load(TARGET_REFS_ALLOW);
    assert_eq!(set.len(), 1);
    let msg = &warnings[0].message;
    // Says what ambit does, to which workloads, and how Istio differs.
    assert!(
        msg.contains("ALLOW policy that matches nothing for every workload in namespace foo")
            && msg.contains("Istio differs")
            && msg.contains("does not send targetRef policies to ztunnel"),
        "{msg}"
    );
    let (set, warnings) = load(TARGET_REF_DENY);
    assert!(set.is_empty());
    assert!(
        warnings[0]
            .message
            .contains("ignored, as Istio's ztunnel ignores it"),
        "{}",
        warnings[0].message
    );
}

#[test]
fn peer_authentication_unknown_fields_are_named() {
    let yaml = NS_STRICT.replace("mode: STRICT", "mdoe: STRICT");
    let (set, warnings) = load(&yaml);
    assert_eq!(set.len(), 1);
    let text = messages(&warnings);
    assert_eq!(text.len(), 1, "{text:?}");
    assert!(text[0].contains("spec.mtls.mdoe"), "{text:?}");
}

#[test]
fn peer_authentication_warnings() {
    let (_, warnings) = load(PORT_LEVEL_WITHOUT_SELECTOR);
    assert_eq!(warnings.len(), 1);
    assert_eq!(warnings[0].kind, "PeerAuthentication");
    assert!(warnings[0].message.contains("portLevelMtls"));
    let (_, warnings) = load(NS_TIE);
    assert_eq!(warnings.len(), 1);
    assert_eq!(warnings[0].policy, PolicyName::new("foo", "b-permissive"));
    assert!(warnings[0].message.contains("foo/a-strict wins"));
}

#[test]
fn duplicate_policy_replaces_and_warns() {
    let yaml = format!(
        "{ALLOW_NOTHING}---\n{}",
        ALLOW_NOTHING.replace("spec: {}", "spec: {rules: [{}]}")
    );
    let (set, warnings) = load(&yaml);
    assert_eq!(set.len(), 1);
    assert!(warnings[0].message.contains("replaces document 0"));
    let labels = web_labels();
    let w = Workload {
        namespace: "foo",
        labels: &labels,
    };
    assert!(set.evaluate(&w, &conn(Some(CLIENT), 8080)).allowed);
}

#[test]
fn other_kinds_are_counted() {
    let (set, warnings) = load(MIXED_KINDS);
    assert!(warnings.is_empty());
    assert_eq!(set.len(), 1);
    assert_eq!(set.skipped_documents(), 2);
    assert_eq!(set.skipped_kinds().get("DestinationRule"), Some(&1));
    assert_eq!(set.skipped_kinds().get("ServiceMonitor"), Some(&1));
}

#[test]
fn from_documents_matches_from_yaml() {
    use serde::Deserialize;
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(MIXED_KINDS)
        .map(serde_yaml::Value::deserialize)
        .collect::<Result<_, _>>()
        .expect("parses");
    let (set, _) = PolicySet::from_documents(docs, DEFAULT_NS, ROOT).expect("loads");
    assert_eq!(set.len(), 1);
}

#[test]
fn invalid_input_errors_name_the_place() {
    let cases: &[(&str, String, &[&str])] = &[
        (
            "bad mode",
            NS_STRICT.replace("STRICT", "STRIKT"),
            &["PeerAuthentication foo/ns-strict", "spec.mtls.mode", "STRIKT"],
        ),
        (
            "bad port-level mode",
            PORT_LEVEL.replace("{mode: STRICT}", "{mode: strict}"),
            &["foo/web-ports", "spec.portLevelMtls.8080.mode"],
        ),
        (
            "bad port-level key",
            PORT_LEVEL.replace("8080:", "http:"),
            &["foo/web-ports", "spec.portLevelMtls.http"],
        ),
        (
            "bad action",
            DENY_NO_RULES.replace("DENY", "REJECT"),
            &["AuthorizationPolicy foo/deny-all", "spec.action", "REJECT"],
        ),
        (
            "bad CIDR",
            allow_source!("p", "{ipBlocks: [10.0.0.0/8, 10.0.0.0/33]}").to_owned(),
            &["foo/p", "spec.rules[0].from[0].source.ipBlocks[1]", "10.0.0.0/33"],
        ),
        (
            "empty source (Istio refuses it; it would mean anyone)",
            allow_source!("p", "{}").to_owned(),
            &["foo/p", "spec.rules[0].from[0].source", "must not be empty"],
        ),
        (
            "empty operation",
            allow_operation!("p", "{}").to_owned(),
            &["spec.rules[0].to[0].operation", "must not be empty"],
        ),
        (
            "empty from list",
            ALLOW_NOTHING.replace("spec: {}", "spec: {rules: [{from: []}]}"),
            &["spec.rules[0].from", "must not be empty"],
        ),
        (
            "condition without values",
            allow_when!("p", "{key: source.ip}").to_owned(),
            &["spec.rules[0].when[0]", "needs values or notValues"],
        ),
        (
            "serviceAccounts with principals",
            allow_source!("p", "{serviceAccounts: [bar/client], principals: [\"*\"]}").to_owned(),
            &["foo/p", "spec.rules[0].from[0].source", "serviceAccounts cannot be set together"],
        ),
        (
            "malformed service account",
            allow_source!("p", "{notServiceAccounts: [a/b/c]}").to_owned(),
            &["spec.rules[0].from[0].source.notServiceAccounts[0]", "a/b/c"],
        ),
        (
            "bad IP in notRemoteIpBlocks",
            allow_source!("p", "{notRemoteIpBlocks: [not-an-ip]}").to_owned(),
            &["spec.rules[0].from[0].source.notRemoteIpBlocks[0]"],
        ),
        (
            "non-numeric port",
            allow_operation!("p", "{ports: [http]}").to_owned(),
            &["foo/p", "spec.rules[0].to[0].operation.ports[0]", "http"],
        ),
        (
            "out-of-range notPort",
            allow_operation!("p", "{notPorts: [\"70000\"]}").to_owned(),
            &["spec.rules[0].to[0].operation.notPorts[0]"],
        ),
        (
            "bad when IP",
            allow_when!("p", "{key: source.ip, values: [nope]}").to_owned(),
            &["spec.rules[0].when[0].values[0]"],
        ),
        (
            "bad when port",
            allow_when!("p", "{key: destination.port, notValues: [x]}").to_owned(),
            &["spec.rules[0].when[0].notValues[0]"],
        ),
        (
            "rules not a list",
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: foo}\nspec: {rules: nope}\n".to_owned(),
            &["document 0", "AuthorizationPolicy foo/p"],
        ),
        (
            "not a mapping",
            format!("{NS_STRICT}---\n- a list\n"),
            &["document 1", "not a mapping"],
        ),
        (
            "missing kind",
            format!("{NS_STRICT}---\n{NS_STRICT}---\napiVersion: v1\nmetadata: {{name: x}}\n"),
            &["document 2", "kind"],
        ),
        (
            "missing name",
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {namespace: foo}\n".to_owned(),
            &["document 0", "metadata.name"],
        ),
        (
            "metadata not a mapping",
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: [x]\n".to_owned(),
            &["document 0", "PeerAuthentication", "metadata"],
        ),
        (
            "unsupported apiVersion",
            "apiVersion: security.istio.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: p}\n".to_owned(),
            &["document 0", "v1alpha1"],
        ),
        (
            "invalid YAML",
            format!("{NS_STRICT}---\nkind: [unclosed\n"),
            &["document 1", "invalid YAML"],
        ),
    ];
    for (name, yaml, needles) in cases {
        let err = load_err(yaml);
        for needle in *needles {
            assert!(err.contains(needle), "{name}: {needle:?} not in {err:?}");
        }
    }
}

#[test]
fn unknown_fields_are_named_and_fail_closed() {
    let yaml = "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: foo, labels: {team: a}, annotations: {x: y}}
status: {conditions: []}
spec:
  futureField: 1
  rules:
  - from:
    - source: {namespaces: [bar], futureSourceField: [x]}
    futureRuleField: true
";
    let (set, warnings) = load(yaml);
    assert_eq!(set.len(), 1);
    let text = messages(&warnings).join("\n");
    // metadata and status are not checked; spec, source and rule fields are.
    assert_eq!(warnings.len(), 2, "{text}");
    assert!(
        text.contains("unknown fields in spec (a typo?): futureField"),
        "{text}"
    );
    assert!(
        text.contains("spec.rules[0].from[0].source.futureSourceField")
            && text.contains("spec.rules[0].futureRuleField")
            && text.contains("ALLOW rules using them never match"),
        "{text}"
    );
    // The rule needs fields ambit does not know: it admits no one.
    let labels = web_labels();
    let workload = Workload {
        namespace: "foo",
        labels: &labels,
    };
    assert!(!set.evaluate(&workload, &conn(Some(CLIENT), 8080)).allowed);
}

/// ztunnel's `src/rbac.rs` tests, one field at a time: an ALLOW policy
/// holding only that field, against a plaintext connection, an mTLS one
/// whose identity is listed, and another identity from another address and
/// port. ambit must give the same answers, and the opposite ones for the
/// same rule in a DENY policy (Istio evaluates both alike).
#[test]
fn ztunnel_rbac_field_table() {
    const TLS: &str = "spiffe://td/ns/namespace/sa/account";
    const ALT: &str = "spiffe://td-alt/ns/ns-alt/sa/sa=alt";
    // (field, rule body, plaintext, mTLS, other identity)
    let table: &[(&str, &str, bool, bool, bool)] = &[
        (
            "namespaces",
            "from: [{source: {namespaces: [namespace]}}]",
            false,
            true,
            false,
        ),
        (
            "not_namespaces",
            "from: [{source: {notNamespaces: [namespace]}}]",
            true,
            false,
            true,
        ),
        (
            "service_accounts",
            "from: [{source: {serviceAccounts: [namespace/account]}}]",
            false,
            true,
            false,
        ),
        (
            "not_service_accounts",
            "from: [{source: {notServiceAccounts: [namespace/account]}}]",
            true,
            false,
            true,
        ),
        (
            "principals",
            "from: [{source: {principals: [td/ns/namespace/sa/account]}}]",
            false,
            true,
            false,
        ),
        (
            "not_principals",
            "from: [{source: {notPrincipals: [td/ns/namespace/sa/account]}}]",
            true,
            false,
            true,
        ),
        (
            "source_ips",
            "from: [{source: {ipBlocks: [127.0.0.1/32]}}]",
            true,
            true,
            false,
        ),
        (
            "not_source_ips",
            "from: [{source: {notIpBlocks: [127.0.0.1/32]}}]",
            false,
            false,
            true,
        ),
        (
            "destination_ips",
            "when: [{key: destination.ip, values: [127.0.0.2/32]}]",
            true,
            true,
            false,
        ),
        (
            "not_destination_ips",
            "when: [{key: destination.ip, notValues: [127.0.0.2/32]}]",
            false,
            false,
            true,
        ),
        (
            "cidr_range",
            "when: [{key: destination.ip, values: [127.0.0.1/24]}]",
            true,
            true,
            true,
        ),
        (
            "destination_ports",
            "to: [{operation: {ports: [\"8080\"]}}]",
            true,
            true,
            false,
        ),
        (
            "not_destination_ports",
            "to: [{operation: {notPorts: [\"8080\"]}}]",
            false,
            false,
            true,
        ),
    ];
    let conns = [
        ("plaintext", None, "127.0.0.1", "127.0.0.2", 8080),
        ("mTLS", Some(TLS), "127.0.0.1", "127.0.0.2", 8080),
        ("other identity", Some(ALT), "127.0.0.3", "127.0.0.4", 9090),
    ];
    let labels = BTreeMap::new();
    let workload = Workload {
        namespace: "namespace",
        labels: &labels,
    };
    let mut failures = Vec::new();
    for (field, rule, plain, tls, alt) in table {
        for action in ["ALLOW", "DENY"] {
            let yaml = format!(
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
                 metadata: {{name: {field}, namespace: namespace}}\n\
                 spec:\n  action: {action}\n  rules:\n  - {rule}\n"
            );
            let (set, _) = load(&yaml);
            for ((label, principal, src, dst, port), expected) in
                conns.iter().zip([plain, tls, alt])
            {
                let conn = Connection {
                    source_principal: *principal,
                    source_ip: ip(src),
                    destination_ip: ip(dst),
                    destination_port: *port,
                };
                let decision = set.evaluate(&workload, &conn);
                // ALLOW: allowed iff the rule matched; DENY: denied iff it did.
                let matched = decision.allowed == (action == "ALLOW");
                if matched != *expected {
                    failures.push(format!(
                        "{action} {field} vs {label}: matched={matched}, ztunnel says {expected}"
                    ));
                }
            }
        }
    }
    // ztunnel's rbac_empty_policy: no rules match nothing, an empty rule matches all.
    let none = load("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: e, namespace: namespace}\nspec: {}\n").0;
    let all = load("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: e, namespace: namespace}\nspec: {rules: [{}]}\n").0;
    let plaintext = Connection {
        source_principal: None,
        source_ip: ip("127.0.0.1"),
        destination_ip: ip("127.0.0.2"),
        destination_port: 8080,
    };
    if none.evaluate(&workload, &plaintext).allowed {
        failures.push("ALLOW without rules matched".to_owned());
    }
    if !all.evaluate(&workload, &plaintext).allowed {
        failures.push("ALLOW with an empty rule did not match".to_owned());
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn empty_documents_are_skipped() {
    let yaml = format!("---\n{NS_STRICT}---\n---\n");
    let (set, _) = load(&yaml);
    assert_eq!(set.len(), 1);
    let (set, _) = load("");
    assert!(set.is_empty());
}

#[test]
fn policy_set_is_shareable() {
    fn assert_traits<T: Clone + Send + Sync + 'static>() {}
    assert_traits::<PolicySet>();
}

#[test]
fn ten_thousand_policies_decide_correctly() {
    let set = synthetic_policy_set(10_000).expect("synthetic set loads");
    assert_eq!(set.len(), 10_000);
    for i in [0, 1, 4_321, 9_998] {
        let d = synthetic_decision(&set, i, 8080);
        assert!(d.allowed, "{i}: {d}");
        assert_eq!(
            d.policy,
            Some(PolicyName::new(format!("ns-{}", i % 100), format!("p-{i}")))
        );
        let d = synthetic_decision(&set, i, 9090);
        assert_eq!(d.reason, DecisionReason::NoAllowPolicyMatched, "{i}: {d}");
    }
    // Policy 9 is a DENY on everything but 8080/9090; its workload has no ALLOW.
    let d = synthetic_decision(&set, 9, 1234);
    assert_eq!(d.reason, DecisionReason::DeniedByPolicy);
    assert!(synthetic_decision(&set, 9, 8080).allowed);
}

#[test]
fn measure_decision_time_runs() {
    let t = measure_decision_time(50, 11);
    assert!(t > std::time::Duration::ZERO);
    let set = synthetic_policy_set(50).expect("synthetic set loads");
    assert_eq!(
        synthetic_decision(&set, 25, 8080).reason,
        DecisionReason::AllowedByPolicy
    );
}
