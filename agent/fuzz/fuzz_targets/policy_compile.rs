//! Istio policy compile and evaluation: any YAML either compiles or is refused, and a
//! compiled set decides every connection without panicking.
#![no_main]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ambit_agent::policy::{Connection, PolicySet, Workload};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok((set, _warnings)) = PolicySet::from_yaml(text, "default", "istio-system") else {
        return;
    };
    let labels = BTreeMap::from([
        ("app".to_owned(), "checkout".to_owned()),
        ("version".to_owned(), "v1".to_owned()),
    ]);
    let no_labels = BTreeMap::new();
    let workloads = [
        Workload {
            namespace: "shop",
            labels: &labels,
        },
        Workload {
            namespace: "default",
            labels: &no_labels,
        },
    ];
    let connections = [
        Connection {
            source_principal: Some("spiffe://cluster.local/ns/shop/sa/frontend"),
            source_ip: IpAddr::V4(Ipv4Addr::new(10, 11, 1, 2)),
            destination_ip: IpAddr::V4(Ipv4Addr::new(10, 11, 2, 2)),
            destination_port: 8080,
        },
        Connection {
            source_principal: None,
            source_ip: IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 7)),
            destination_ip: IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 8)),
            destination_port: 443,
        },
    ];
    for workload in &workloads {
        let _ = set.mtls_mode(workload, 8080);
        for conn in &connections {
            let decision = set.evaluate(workload, conn);
            let _ = set.explain(workload, conn);
            let _ = format!("{decision:?}");
        }
    }
});
