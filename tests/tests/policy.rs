//! Privileged: Istio policies enforced by the receiving agent on the two-node testbed.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::time::Duration;

use ambit_e2e::testbed::{APP_PORT, MESH_NS, PLAIN_NS, PodSpec, Testbed};

const LOG_WAIT: Duration = Duration::from_secs(10);

fn bed_with(policies: &str) -> anyhow::Result<Testbed> {
    let pods = [
        PodSpec::new("frontend", MESH_NS, 0),
        PodSpec::new("intruder", MESH_NS, 0),
        PodSpec::new("outsider", "other", 0),
        PodSpec::new("backend", MESH_NS, 1),
        PodSpec::new("legacy", PLAIN_NS, 0),
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
    assert!(denial.contains("no_allow_policy_matched"), "{denial}");
    // The receiving agent counts both decisions: the allow under the policy that matched,
    // the denial under its reason.
    let metrics = bed.agent(1).metrics()?;
    let counted = |action: &str, reason: &str| {
        metrics.lines().any(|l| {
            l.starts_with("ambit_authorization_decisions_total{")
                && l.contains(&format!("action=\"{action}\""))
                && l.contains(&format!("reason=\"{reason}\""))
                && l.ends_with(" 1")
        })
    };
    assert!(
        counted("allow", "allowed_by_policy"),
        "allow counted: {metrics}"
    );
    assert!(
        counted("deny", "no_allow_policy_matched"),
        "denial counted: {metrics}"
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

fn peer_auth(mode: &str, port_exception: Option<&str>) -> String {
    let mut doc = format!(
        "---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: mesh-wide, namespace: istio-system}}
spec:
  mtls: {{mode: {mode}}}
"
    );
    if let Some(port_mode) = port_exception {
        doc.push_str(&format!(
            "---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: backend-port-exception, namespace: mesh}}
spec:
  selector: {{matchLabels: {{app: backend}}}}
  mtls: {{mode: UNSET}}
  portLevelMtls:
    \"{APP_PORT}\": {{mode: {port_mode}}}
"
        ));
    }
    doc
}

#[test]
fn strict_refuses_plaintext_and_permissive_accepts_it_with_the_real_client_address()
-> anyhow::Result<()> {
    let mut bed = bed_with(&peer_auth("STRICT", None))?;
    let backend = bed.pod("backend").addr(APP_PORT);
    let legacy_ip = bed.pod("legacy").ip;
    assert!(
        refused(bed.pod("legacy").request(backend, b"plaintext")),
        "STRICT: a non-enrolled pod's plaintext is refused"
    );
    bed.agent(1)
        .wait_for_log(&["plaintext connection denied", "mtls_required"], LOG_WAIT)?;
    let mtls = bed.pod("frontend").request(backend, b"over mTLS")?;
    assert!(
        mtls.ends_with("over mTLS"),
        "mTLS still works under STRICT: {mtls}"
    );

    // Emergency relaxation: patch the mesh-wide policy, no restart.
    bed.policies = peer_auth("PERMISSIVE", None);
    bed.write_config()?;
    bed.agent(1)
        .wait_for_log(&["configuration applied"], LOG_WAIT)?;
    let reply = bed.pod("legacy").request(backend, b"plaintext again")?;
    assert!(
        reply.ends_with("plaintext again"),
        "PERMISSIVE accepts plaintext: {reply}"
    );
    assert!(
        greeting(&reply).contains(&format!("peer={legacy_ip}:")),
        "the app sees the real client address: {reply}"
    );
    Ok(())
}

#[test]
fn port_level_permissive_is_an_exception_to_mesh_wide_strict() -> anyhow::Result<()> {
    let bed = bed_with(&peer_auth("STRICT", Some("PERMISSIVE")))?;
    let backend = bed.pod("backend").addr(APP_PORT);
    let reply = bed
        .pod("legacy")
        .request(backend, b"through the exception")?;
    assert!(reply.ends_with("through the exception"), "{reply}");
    // The exception is per workload and port: the same plaintext to another workload under
    // the mesh-wide STRICT is refused.
    let frontend = bed.pod("frontend").addr(APP_PORT);
    assert!(refused(
        bed.pod("legacy").request(frontend, b"no exception here")
    ));
    Ok(())
}

fn greeting(reply: &str) -> &str {
    reply.lines().next().unwrap_or_default()
}
