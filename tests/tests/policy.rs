//! Privileged: Istio policies enforced by the receiving agent on the two-node testbed.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::time::Duration;

use ambit_e2e::refusal::{assert_reset, exchange, read_until_end};
use ambit_e2e::testbed::{APP_PORT, MESH_NS, PLAIN_NS, PodSpec, Testbed};

const LOG_WAIT: Duration = Duration::from_secs(10);
/// How long a refused request may take to be reset; a refusal is immediate, so reaching this
/// means the connection was left hanging (and the test fails on the timeout).
const REFUSAL_WAIT: Duration = Duration::from_secs(5);

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
    let intruder = exchange(bed.pod("intruder"), backend, b"let me in too", REFUSAL_WAIT)?;
    assert_reset(&intruder, "intruder is refused");
    // The tunnel's denial line, the one logged for a denial.
    let denial = bed
        .agent(1)
        .wait_for_log(&["connection denied", "intruder", "authz=DENY"], LOG_WAIT)?;
    assert!(
        denial.contains("no_allow_policy_matched")
            && denial.contains("policy=mesh/backend-from-frontend"),
        "the denial names its reason and the ALLOW policy that did not match: {denial}"
    );
    let denial_lines: Vec<String> = bed
        .agent(1)
        .logs()
        .into_iter()
        .filter(|l| l.contains("denied") && l.contains("intruder"))
        .collect();
    assert_eq!(
        denial_lines.len(),
        1,
        "one log line per denial: {denial_lines:#?}"
    );
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
    assert_reset(
        &exchange(bed.pod("outsider"), backend, b"other ns", REFUSAL_WAIT)?,
        "namespace `other` is denied",
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
    // Reset, not closed and not merely silent: the read timeout (5 s, set by `connect`)
    // fails this assertion too.
    assert_reset(
        &read_until_end(&mut reader, &live),
        "the revoked connection is reset",
    );
    // The re-check after the policy change is not a new decision: nothing was denied
    // (the live connection was admitted, under no policy, before the change).
    let metrics = bed.agent(1).metrics()?;
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("ambit_authorization_decisions_total{")
                && l.contains("action=\"deny\"")),
        "revocation re-checks are not counted as decisions: {metrics}"
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
    assert_reset(
        &exchange(bed.pod("legacy"), backend, b"plaintext", REFUSAL_WAIT)?,
        "STRICT: a non-enrolled pod's plaintext is refused",
    );
    bed.agent(1).wait_for_log(
        &["connection denied", "security=\"none\"", "mtls_required"],
        LOG_WAIT,
    )?;
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
    assert_reset(
        &exchange(
            bed.pod("legacy"),
            frontend,
            b"no exception here",
            REFUSAL_WAIT,
        )?,
        "plaintext to a workload without the exception is refused",
    );
    Ok(())
}

fn greeting(reply: &str) -> &str {
    reply.lines().next().unwrap_or_default()
}
