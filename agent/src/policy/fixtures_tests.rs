//! The seed configuration users write today must load unchanged, and do at
//! L4 what can be done at L4. Namespace-less documents land in `default`.

use std::collections::BTreeMap;
use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use super::*;

const DIR: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../shared/fixtures/seed-config"
);
const ROOT: &str = "istio-system";
const FRONTEND: &str = "spiffe://cluster.local/ns/frontend/sa/web-app";

fn fixture_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(DIR)
        .unwrap_or_else(|e| panic!("reading {DIR}: {e}"))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

fn load_file(name: &str) -> (PolicySet, Vec<PolicyWarning>) {
    let path = Path::new(DIR).join(name);
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    PolicySet::from_yaml(&text, "default", ROOT).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Decision for a connection to a workload in `ns` with `app: <app>`.
fn check(set: &PolicySet, ns: &str, app: &str, principal: Option<&str>, port: u16) -> Decision {
    let labels = BTreeMap::from([("app".to_owned(), app.to_owned())]);
    let workload = Workload {
        namespace: ns,
        labels: &labels,
    };
    let conn = Connection {
        source_principal: principal,
        source_ip: "10.2.3.4".parse::<IpAddr>().expect("IP"),
        destination_ip: "10.8.0.9".parse::<IpAddr>().expect("IP"),
        destination_port: port,
    };
    set.evaluate(&workload, &conn)
}

fn assert_decision(d: &Decision, allowed: bool, reason: DecisionReason, policy: Option<&str>) {
    assert_eq!(d.allowed, allowed, "{d}");
    assert_eq!(d.reason, reason, "{d}");
    assert_eq!(
        d.policy.as_ref().map(ToString::to_string).as_deref(),
        policy,
        "{d}"
    );
}

#[test]
fn every_fixture_loads() {
    let files = fixture_files();
    assert!(files.len() >= 23, "found only {} fixtures", files.len());
    let mut policies = 0;
    let mut skipped = 0;
    for path in &files {
        let text = fs::read_to_string(path).expect("readable fixture");
        let (set, _) = PolicySet::from_yaml(&text, "default", ROOT)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        policies += set.len();
        skipped += set.skipped_documents();
    }
    // 11 PeerAuthentication + 4 AuthorizationPolicy documents, none refused;
    // 11 documents of other kinds.
    assert_eq!(policies, 15);
    assert_eq!(skipped, 11);
}

#[test]
fn other_kinds_only_files_are_empty() {
    for (name, kind) in [
        ("02-integrity-protection.yaml", "DestinationRule"),
        ("05-service-cert.yaml", "Certificate"),
        ("15-certificate-pinning.yaml", "DestinationRule"),
        ("16-secure-connection-pool.yaml", "DestinationRule"),
        ("17-secure-timeout.yaml", "VirtualService"),
        ("18-mtls-monitor.yaml", "ServiceMonitor"),
        ("19-auth-failure-metrics.yaml", "Telemetry"),
        ("20-connection-anomaly-alerts.yaml", "PrometheusRule"),
        ("21-auth-failure-alerts.yaml", "PrometheusRule"),
    ] {
        let (set, warnings) = load_file(name);
        assert!(set.is_empty(), "{name}");
        assert!(warnings.is_empty(), "{name}");
        assert_eq!(set.skipped_kinds().get(kind), Some(&1), "{name}");
        // Nothing applies, so everything is allowed.
        assert_decision(
            &check(&set, "default", "user-service", None, 8080),
            true,
            DecisionReason::NoPolicies,
            None,
        );
    }
}

/// 01, 04, 07, 10: namespace-wide STRICT in `default` (01/04/10 get it from
/// the default namespace): plaintext refused there, mTLS admitted, other
/// namespaces untouched.
#[test]
fn namespace_strict_fixtures() {
    for (file, policy) in [
        (
            "01-confidentiality-protection.yaml",
            "default/confidentiality-protection",
        ),
        ("04-mtls-communication.yaml", "default/mtls-communication"),
        ("07-namespace-security.yaml", "default/namespace-security"),
        (
            "10-strict-authentication.yaml",
            "default/strict-authentication",
        ),
    ] {
        let (set, warnings) = load_file(file);
        assert!(warnings.is_empty(), "{file}: {warnings:?}");
        assert_eq!(set.len(), 1, "{file}");
        assert_decision(
            &check(&set, "default", "user-service", None, 8080),
            false,
            DecisionReason::MtlsRequired,
            Some(policy),
        );
        assert_decision(
            &check(&set, "default", "user-service", Some(FRONTEND), 8080),
            true,
            DecisionReason::NoPolicies,
            None,
        );
        assert_decision(
            &check(&set, "other", "user-service", None, 8080),
            true,
            DecisionReason::NoPolicies,
            None,
        );
    }
}

/// 06: mesh-wide STRICT from the root namespace reaches every namespace.
#[test]
fn mesh_strict_fixture() {
    let (set, _) = load_file("06-default.yaml");
    for ns in ["default", "frontend", "istio-system"] {
        assert_decision(
            &check(&set, ns, "anything", None, 80),
            false,
            DecisionReason::MtlsRequired,
            Some("istio-system/default"),
        );
        assert!(check(&set, ns, "anything", Some(FRONTEND), 80).allowed);
    }
}

/// 03, 08: STRICT only for `app: user-service`.
#[test]
fn workload_strict_fixtures() {
    for (file, policy) in [
        (
            "03-identity-verification.yaml",
            "default/identity-verification",
        ),
        (
            "08-user-service-security.yaml",
            "default/user-service-security",
        ),
    ] {
        let (set, _) = load_file(file);
        assert_decision(
            &check(&set, "default", "user-service", None, 8080),
            false,
            DecisionReason::MtlsRequired,
            Some(policy),
        );
        assert!(
            check(&set, "default", "billing", None, 8080).allowed,
            "{file}"
        );
        assert!(check(&set, "default", "user-service", Some(FRONTEND), 8080).allowed);
    }
}

/// 09: user-service is STRICT on 8080, PERMISSIVE on 9090, and inherits
/// (here: the PERMISSIVE default) elsewhere; together with 06's mesh STRICT
/// the other ports inherit STRICT.
#[test]
fn port_level_fixture() {
    let (set, warnings) = load_file("09-port-level-security.yaml");
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_decision(
        &check(&set, "default", "user-service", None, 8080),
        false,
        DecisionReason::MtlsRequired,
        Some("default/port-level-security"),
    );
    assert!(check(&set, "default", "user-service", None, 9090).allowed);
    assert!(check(&set, "default", "user-service", None, 3000).allowed);
    assert!(check(&set, "default", "billing", None, 8080).allowed);

    let mut docs = Vec::new();
    for name in ["06-default.yaml", "09-port-level-security.yaml"] {
        let text = fs::read_to_string(Path::new(DIR).join(name)).expect("fixture");
        docs.push(serde_yaml::from_str::<serde_yaml::Value>(&text).expect("one document"));
    }
    let (set, _) = PolicySet::from_documents(docs, "default", ROOT).expect("loads");
    assert!(check(&set, "default", "user-service", None, 9090).allowed);
    assert_decision(
        &check(&set, "default", "user-service", None, 3000),
        false,
        DecisionReason::MtlsRequired,
        Some("istio-system/default"),
    );
}

/// 11, 12: PERMISSIVE and DISABLE both admit plaintext and mTLS.
#[test]
fn permissive_and_disable_fixtures() {
    for (file, mode) in [
        ("11-permissive-authentication.yaml", MtlsMode::Permissive),
        ("12-disable-authentication.yaml", MtlsMode::Disable),
    ] {
        let (set, _) = load_file(file);
        let labels = BTreeMap::new();
        let w = Workload {
            namespace: "default",
            labels: &labels,
        };
        assert_eq!(set.mtls_mode(&w, 8080), mode, "{file}");
        assert!(check(&set, "default", "user-service", None, 8080).allowed);
        assert!(check(&set, "default", "user-service", Some(FRONTEND), 8080).allowed);
    }
}

/// 13, 23, 14: ALLOW policies whose only rule needs L7 data. At L4 the rule
/// can never match, so user-service becomes unreachable (fail closed) even
/// from the intended frontend identity, and the loader says why.
#[test]
fn l7_allow_fixtures_fail_closed_and_warn() {
    for (file, policy, fields) in [
        (
            "13-identity-based-authorization.yaml",
            "default/identity-based-authorization",
            &["methods", "paths"][..],
        ),
        (
            "23-least-privilege.yaml",
            "default/least-privilege",
            &["methods", "paths"][..],
        ),
        (
            "14-attribute-based-authorization.yaml",
            "default/attribute-based-authorization",
            &["methods", "paths", "when[request.headers[x-api-key]]"][..],
        ),
    ] {
        let (set, warnings) = load_file(file);
        assert_eq!(warnings.len(), 1, "{file}: {warnings:?}");
        assert_eq!(warnings[0].policy.to_string(), policy);
        for field in fields {
            assert!(warnings[0].message.contains(field), "{file}: {field}");
        }
        // The ALLOW policy that applied and did not match is named.
        assert_decision(
            &check(&set, "default", "user-service", Some(FRONTEND), 8080),
            false,
            DecisionReason::NoAllowPolicyMatched,
            Some(policy),
        );
        // Other workloads are outside the selector.
        assert!(check(&set, "default", "billing", Some(FRONTEND), 8080).allowed);
    }
}

/// 22: the README's trap. STRICT mTLS is enforced, but the rule-less DENY
/// denies nothing (Istio semantics) and is reported.
#[test]
fn zero_trust_fixture_deny_all_denies_nothing() {
    let (set, warnings) = load_file("22-zero-trust.yaml");
    assert_eq!(set.len(), 2);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(warnings[0].policy.to_string(), "default/deny-all");
    assert!(warnings[0].message.contains("denies nothing"));
    // A policy applies (the DENY), so the reason is not "no policies".
    assert_decision(
        &check(&set, "default", "user-service", Some(FRONTEND), 8080),
        true,
        DecisionReason::NoAllowPolicies,
        None,
    );
    assert_decision(
        &check(&set, "default", "user-service", None, 8080),
        false,
        DecisionReason::MtlsRequired,
        Some("default/zero-trust"),
    );
}

/// All fixtures applied together, as a user pasting them into one cluster
/// would: the namespace-wide PeerAuthentications in `default` conflict and
/// the loader reports it, picking the first by name.
#[test]
fn all_fixtures_together() {
    use serde::Deserialize;
    let mut docs = Vec::new();
    for path in fixture_files() {
        let text = fs::read_to_string(&path).expect("fixture");
        for de in serde_yaml::Deserializer::from_str(&text) {
            docs.push(serde_yaml::Value::deserialize(de).expect("valid YAML"));
        }
    }
    let (set, warnings) = PolicySet::from_documents(docs, "default", ROOT).expect("loads");
    assert_eq!(set.len(), 15);
    assert!(
        warnings
            .iter()
            .any(|w| w.kind == "PeerAuthentication" && w.message.contains("conflicts with")),
        "{warnings:?}"
    );
    // First namespace-wide PeerAuthentication in `default` by name is
    // confidentiality-protection (STRICT).
    assert_decision(
        &check(&set, "default", "billing", None, 8080),
        false,
        DecisionReason::MtlsRequired,
        Some("default/confidentiality-protection"),
    );
}
