use std::net::SocketAddr;

use super::*;

const EXAMPLE: &str = include_str!("../../../examples/local.yaml");

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

#[test]
fn example_file_parses_and_enrolls_only_opted_in_pods_of_this_node() {
    let (state, warnings) = parse(EXAMPLE, "node1").expect("example parses");
    assert!(warnings.is_empty(), "{warnings:?}");
    let local: Vec<_> = state.local_pods().map(|w| w.name.as_str()).collect();
    assert_eq!(local, ["frontend"], "batch opted out; checkout is on node2");
    let (state2, _) = parse(EXAMPLE, "node2").expect("example parses");
    let local2: Vec<_> = state2.local_pods().map(|w| w.name.as_str()).collect();
    assert_eq!(
        local2,
        ["checkout-v1"],
        "reporting's namespace is not opted in"
    );
    assert_eq!(state.policies().len(), 2);
    let frontend = state
        .workload_by_ip("10.11.1.2".parse().expect("ip"))
        .expect("frontend");
    assert_eq!(
        frontend.identity.to_string(),
        "spiffe://cluster.local/ns/shop/sa/frontend"
    );
}

#[test]
fn routes_workloads_services_and_the_rest() {
    let (state, _) = parse(EXAMPLE, "node1").expect("parses");
    match state.route(addr("10.11.2.2:8080"), 0) {
        Route::Hbone {
            workload,
            target,
            hbone_addr,
        } => {
            assert_eq!(workload.name, "checkout-v1");
            assert_eq!(target, addr("10.11.2.2:8080"));
            assert_eq!(hbone_addr, addr("10.11.2.2:15008"));
        }
        other => panic!("expected HBONE, got {other:?}"),
    }
    match state.route(addr("10.96.0.10:80"), 7) {
        Route::Hbone { target, .. } => {
            assert_eq!(target, addr("10.11.2.2:8080"), "VIP -> endpoint:targetPort")
        }
        other => panic!("expected HBONE to the endpoint, got {other:?}"),
    }
    assert_eq!(
        state.route(addr("10.11.2.3:80"), 0),
        Route::Direct {
            target: addr("10.11.2.3:80")
        },
        "a workload outside the mesh is reached directly"
    );
    assert_eq!(
        state.route(addr("10.11.1.3:80"), 0),
        Route::Direct {
            target: addr("10.11.1.3:80")
        },
        "an opted-out pod is reached directly"
    );
    assert_eq!(
        state.route(addr("192.0.2.1:443"), 0),
        Route::Direct {
            target: addr("192.0.2.1:443")
        },
        "passthrough by default"
    );
    let denying = EXAMPLE.replace(
        "unknownDestination: passthrough",
        "unknownDestination: deny",
    );
    let (state, _) = parse(&denying, "node1").expect("parses");
    assert!(matches!(
        state.route(addr("192.0.2.1:443"), 0),
        Route::Deny { .. }
    ));
}

#[test]
fn service_load_is_spread_over_endpoints() {
    let two = EXAMPLE.replace(
        "  - name: batch\n",
        "  - name: checkout-v2\n    namespace: shop\n    serviceAccount: checkout\n    labels: {app: checkout, version: v2}\n    ips: [10.11.1.9]\n    node: node1\n    netns: /run/netns/checkout-v2\n  - name: batch\n",
    );
    let (state, _) = parse(&two, "node1").expect("parses");
    let mut targets: Vec<SocketAddr> = (0..4)
        .filter_map(|i| match state.route(addr("10.96.0.10:80"), i) {
            Route::Hbone { target, .. } => Some(target),
            _ => None,
        })
        .collect();
    targets.sort();
    targets.dedup();
    assert_eq!(targets, [addr("10.11.1.9:8080"), addr("10.11.2.2:8080")]);
}

#[test]
fn bad_files_are_refused_with_the_place_named() {
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "syntax",
            "kind: AmbitLocalConfig\nworkloads: [".into(),
            "document 0",
        ),
        (
            "no config",
            "kind: Other\n".into(),
            "no document of kind AmbitLocalConfig",
        ),
        (
            "two configs",
            format!("{EXAMPLE}\n---\nkind: AmbitLocalConfig\n"),
            "both of kind AmbitLocalConfig",
        ),
        (
            "bad ip",
            EXAMPLE.replace("ips: [10.11.1.2]", "ips: [10.11.1.300]"),
            "line",
        ),
        (
            "duplicate ip",
            EXAMPLE.replace("ips: [10.11.2.3]", "ips: [10.11.2.2]"),
            "workloads[3] (legacy/reporting): IP 10.11.2.2 is already used by shop/checkout-v1",
        ),
        (
            "unknown field",
            EXAMPLE.replace("trustDomain:", "trustDomian:"),
            "unknown field `trustDomian`",
        ),
        (
            "missing netns",
            EXAMPLE.replace("    netns: /run/netns/frontend\n", ""),
            "workloads[0] (shop/frontend): an enrolled workload on this node needs `netns`",
        ),
        (
            "bad service account",
            EXAMPLE.replace("serviceAccount: frontend", "serviceAccount: Front/End"),
            "workloads[0] (shop/frontend)",
        ),
        (
            "bad policy",
            EXAMPLE.replace("mode: STRICT", "mode: STRICTEST"),
            "STRICTEST",
        ),
    ];
    for (name, text, expected) in &cases {
        let err = parse(text, "node1")
            .err()
            .unwrap_or_else(|| panic!("{name}: must be refused"));
        let message = err.to_string();
        assert!(
            message.contains(expected),
            "{name}: {message:?} should contain {expected:?}"
        );
    }
}
