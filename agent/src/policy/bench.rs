//! Synthetic policy sets and a small timing loop, for `cargo xtask bench` and
//! for correctness checks at scale. No harness dependency: just `Instant`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use super::{Connection, Decision, PolicyError, PolicySet, Workload};

/// Namespaces the synthetic policies are spread over.
const NAMESPACES: usize = 100;

/// `n` policies over [`NAMESPACES`] namespaces: policy `i` lives in
/// `ns-{i % 100}`, selects `app: svc-{i}` and allows only
/// `cluster.local/ns/client-{i}/sa/default` on port 8080. Every tenth is a
/// DENY for `notPorts: [8080, 9090]` instead, so both actions are exercised.
pub fn synthetic_policy_set(n: usize) -> Result<PolicySet, PolicyError> {
    let mut yaml = String::with_capacity(n * 400);
    for i in 0..n {
        let ns = i % NAMESPACES;
        let body = if i % 10 == 9 {
            "  action: DENY\n  rules:\n  - to:\n    - operation:\n        notPorts: [\"8080\", \"9090\"]\n".to_owned()
        } else {
            format!(
                "  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/client-{i}/sa/default\"]\n    to:\n    - operation:\n        ports: [\"8080\"]\n"
            )
        };
        // Writing to a String cannot fail.
        let _ = write!(
            yaml,
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: p-{i}\n  namespace: ns-{ns}\nspec:\n  selector:\n    matchLabels:\n      app: svc-{i}\n{body}"
        );
    }
    PolicySet::from_yaml(&yaml, "default", "istio-system").map(|(set, _)| set)
}

/// Decision for the synthetic workload `i` (`ns-{i % 100}`, `app: svc-{i}`)
/// reached from `client-{i}` on `port`.
pub fn synthetic_decision(set: &PolicySet, i: usize, port: u16) -> Decision {
    let labels = BTreeMap::from([("app".to_owned(), format!("svc-{i}"))]);
    let ns = format!("ns-{}", i % NAMESPACES);
    let principal = format!("spiffe://cluster.local/ns/client-{i}/sa/default");
    let workload = Workload {
        namespace: &ns,
        labels: &labels,
    };
    let conn = Connection {
        source_principal: Some(&principal),
        source_ip: IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)),
        destination_ip: IpAddr::V4(Ipv4Addr::new(10, 4, 5, 6)),
        destination_port: port,
    };
    set.evaluate(&workload, &conn)
}

/// Median time of one `evaluate` call with `n_policies` loaded, over
/// `iterations` samples. Returns zero if the synthetic set fails to build
/// (which would be a bug, reported through tracing).
pub fn measure_decision_time(n_policies: usize, iterations: usize) -> Duration {
    let set = match synthetic_policy_set(n_policies) {
        Ok(set) => set,
        Err(e) => {
            tracing::error!(error = %e, "synthetic policy set failed to build");
            return Duration::ZERO;
        }
    };
    let target = n_policies / 2;
    let labels = BTreeMap::from([("app".to_owned(), format!("svc-{target}"))]);
    let ns = format!("ns-{}", target % NAMESPACES);
    let principal = format!("spiffe://cluster.local/ns/client-{target}/sa/default");
    let workload = Workload {
        namespace: &ns,
        labels: &labels,
    };
    let conn = Connection {
        source_principal: Some(&principal),
        source_ip: IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)),
        destination_ip: IpAddr::V4(Ipv4Addr::new(10, 4, 5, 6)),
        destination_port: 8080,
    };
    let mut samples: Vec<Duration> = (0..iterations.max(1))
        .map(|_| {
            let start = Instant::now();
            black_box(set.evaluate(black_box(&workload), black_box(&conn)));
            start.elapsed()
        })
        .collect();
    samples.sort_unstable();
    samples[samples.len() / 2]
}
