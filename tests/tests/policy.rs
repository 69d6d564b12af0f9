//! Privileged: Istio policies enforced by the receiving agent on the two-node testbed.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::time::Duration;

use ambit_e2e::testbed::{APP_PORT, MESH_NS, PodSpec, Testbed};

const LOG_WAIT: Duration = Duration::from_secs(10);

fn bed_with(policies: &str) -> anyhow::Result<Testbed> {
    let pods = [
        PodSpec::new("frontend", MESH_NS, 0),
        PodSpec::new("intruder", MESH_NS, 0),
        PodSpec::new("outsider", "other", 0),
        PodSpec::new("backend", MESH_NS, 1),
    ];
    let mut bed = Testbed::build(2, &pods, Vec::new())?;
    bed.policies = policies.to_string();
    bed.write_config()?;
    bed.start_agents()?;
    Ok(bed)
}

/// A request that the mesh refused shows up to the caller as a reset or an empty reply.
fn refused(result: anyhow::Result<String>) -> bool {
    match result {
        Err(_) => true,
        Ok(reply) => reply.is_empty(),
    }
}

const ALLOW_FRONTEND: &str = "---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: backend-from-frontend, namespace: mesh}
spec:
  selector: {matchLabels: {app: backend}}
  action: ALLOW
  rules:
    - from:
        - source: {principals: [cluster.local/ns/mesh/sa/frontend]}
";

#[test]
fn identity_allow_lets_one_client_in_and_keeps_another_out() -> anyhow::Result<()> {
    let bed = bed_with(ALLOW_FRONTEND)?;
    let backend = bed.pod("backend").addr(APP_PORT);
    let reply = bed.pod("frontend").request(backend, b"let me in")?;
    assert!(reply.ends_with("let me in"), "frontend is allowed: {reply}");
    let intruder = bed.pod("intruder").request(backend, b"let me in too");
    assert!(refused(intruder), "intruder is refused");
    let denial = bed
        .agent(1)
        .wait_for_log(&["denied", "intruder"], LOG_WAIT)?;
    assert!(
        denial.contains("frontend")
            || denial.contains("backend-from-frontend")
            || denial.contains("no_allow_policy_matched"),
        "{denial}"
    );
    Ok(())
}

#[test]
fn deny_by_namespace() -> anyhow::Result<()> {
    let bed = bed_with(
        "---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: no-other-namespace, namespace: mesh}
spec:
  action: DENY
  rules:
    - from:
        - source: {namespaces: [other]}
",
    )?;
    let backend = bed.pod("backend").addr(APP_PORT);
    assert!(
        bed.pod("frontend")
            .request(backend, b"same ns")?
            .ends_with("same ns")
    );
    assert!(
        refused(bed.pod("outsider").request(backend, b"other ns")),
        "namespace `other` is denied"
    );
    bed.agent(1)
        .wait_for_log(&["denied", "ns/other/sa/outsider"], LOG_WAIT)?;
    Ok(())
}

#[test]
fn policy_update_revokes_a_live_connection() -> anyhow::Result<()> {
    let mut bed = bed_with("")?;
    let backend = bed.pod("backend").addr(APP_PORT);
    let live = bed.pod("intruder").connect(backend)?;
    let mut greeting = String::new();
    let mut reader = BufReader::new(live.try_clone()?);
    reader.read_line(&mut greeting)?;
    assert!(greeting.starts_with("backend "), "{greeting}");
    let mut live = live;
    live.write_all(b"ping")?;
    let mut echo = [0u8; 4];
    reader.read_exact(&mut echo)?;
    assert_eq!(&echo, b"ping", "allowed while no policy exists");

    bed.policies = ALLOW_FRONTEND.to_string();
    bed.write_config()?;
    bed.agent(1)
        .wait_for_log(&["revoking a live connection", "intruder"], LOG_WAIT)?;
    let mut rest = Vec::new();
    let outcome = reader.read_to_end(&mut rest);
    assert!(
        outcome.is_err() || rest.is_empty(),
        "the revoked connection ends: {outcome:?} {rest:?}"
    );
    let reply = bed.pod("frontend").request(backend, b"still fine")?;
    assert!(
        reply.ends_with("still fine"),
        "allowed traffic is untouched"
    );
    Ok(())
}
