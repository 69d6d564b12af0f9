//! Privileged: the CA service (`ambit ca`) with node authorization, on the two-node testbed
//! in Kubernetes mode. The CA validates tokens with TokenReviews and reads pods from the
//! project's fake API server; the agents take their workload certificates from it.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ambit_e2e::apiserver::Kind;
use ambit_e2e::ca::{CaProcess, ca_root, free_port, register_node_agents};
use ambit_e2e::testbed::{APP_PORT, MESH_NS, PodSpec, RemoteCa, Testbed};
use anyhow::Context as _;

const WAIT: Duration = Duration::from_secs(20);

/// The two-node testbed in Kubernetes mode with a running `ambit ca`; agents started
/// with `agent_args` take their certificates from it.
struct CaBed {
    bed: Testbed,
    ca: Option<CaProcess>,
    kubeconfig: PathBuf,
    token_dir: PathBuf,
    trust_file: PathBuf,
    port: u16,
    metrics: SocketAddr,
}

fn ca_bed(agent_args: &[&str]) -> anyhow::Result<CaBed> {
    let pods = [
        PodSpec::new("client", MESH_NS, 0),
        PodSpec::new("server", MESH_NS, 1),
    ];
    let mut bed = Testbed::build(2, &pods, Vec::new())?;
    bed.enable_kubernetes()?;
    bed.agent_args = agent_args.iter().map(|a| (*a).to_owned()).collect();
    let token_dir = register_node_agents(&bed)?;
    let kubeconfig = bed
        .kube
        .as_ref()
        .context("kubernetes mode")?
        .kubeconfig
        .clone();
    let port = free_port()?;
    let metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
    let ca = CaProcess::start(&kubeconfig, port, metrics)?;
    assert_eq!(
        bed.kube
            .as_ref()
            .context("kubernetes mode")?
            .api
            .list_json(Kind::Secret)
            .len(),
        1,
        "the CA bootstrapped its root into one Secret"
    );
    let trust_file = bed.dir.join("ca-root.pem");
    std::fs::write(&trust_file, ca_root(&bed)?)?;
    bed.remote_ca = Some(RemoteCa {
        address: format!("https://localhost:{port}"),
        trust_file: trust_file.clone(),
        token_dir: token_dir.clone(),
    });
    bed.start_agents()?;
    Ok(CaBed {
        bed,
        ca: Some(ca),
        kubeconfig,
        token_dir,
        trust_file,
        port,
        metrics,
    })
}

#[test]
fn agents_get_certificates_from_the_ca_which_checks_the_asking_node() -> anyhow::Result<()> {
    let CaBed {
        bed,
        ca,
        kubeconfig,
        token_dir,
        trust_file,
        port,
        metrics,
    } = ca_bed(&[])?;
    let mut ca = ca.context("CA running")?;

    // Both pods got their certificates from the CA: mTLS across nodes works.
    let server = bed.pod("server").addr(APP_PORT);
    let reply = bed.pod("client").request(server, b"signed by the CA")?;
    assert!(reply.ends_with("signed by the CA"), "{reply}");
    bed.agent(1).wait_for_log(
        &[
            "inbound connection closed",
            "spiffe://cluster.local/ns/mesh/sa/client",
        ],
        WAIT,
    )?;
    let issued = ca.metrics()?;
    assert!(
        issued.lines().any(
            |l| l.starts_with("ambit_ca_requests_total{result=\"issued\"") && !l.ends_with(" 0")
        ),
        "issuances counted: {issued}"
    );

    // Node 1's agent asks for an identity that runs only on node 2: refused, counted, logged.
    ambit_agent::identity::install_crypto_provider();
    let node1 = bed.nodes[0].name.clone();
    let mut config = ambit_agent::identity::RemoteCaConfig::new(
        format!("https://localhost:{port}"),
        token_dir.join(format!("{node1}.token")),
        &trust_file,
    );
    config.connect_timeout = Duration::from_secs(5);
    let runtime = tokio::runtime::Runtime::new()?;
    let remote = {
        let _context = runtime.enter();
        ambit_agent::identity::RemoteCa::new(config)?
    };
    let other_node_identity: ambit_agent::identity::SpiffeId =
        "spiffe://cluster.local/ns/mesh/sa/server".parse()?;
    use ambit_agent::identity::CertificateAuthority as _;
    let refused = runtime.block_on(remote.issue(&other_node_identity, Duration::from_secs(3600)));
    match refused {
        Err(ambit_agent::identity::IdentityError::CaRefused { reason, .. }) => {
            assert_eq!(reason.as_deref(), Some("identity_not_on_node"));
        }
        other => panic!("expected a refusal, got {:?}", other.map(|c| c.serial)),
    }
    let denial = ca.wait_for_log("identity_not_on_node")?;
    assert!(
        denial.contains(&node1),
        "the denial names the node: {denial}"
    );
    assert!(
        !ca.logs().iter().any(|l| l.contains("token-")),
        "no token in the CA's log"
    );
    let metrics_text = ca.metrics()?;
    assert!(
        metrics_text.contains(
            "ambit_ca_requests_total{result=\"denied\",reason=\"identity_not_on_node\"} 1"
        ),
        "the denial is counted: {metrics_text}"
    );

    // The CA goes away: certificates already issued keep every connection working.
    drop(ca);
    for i in 0..10 {
        let payload = format!("without the CA {i}");
        let reply = bed.pod("client").request(server, payload.as_bytes())?;
        assert!(reply.ends_with(&payload), "{reply}");
    }
    // And comes back on the same address: the agents need no restart.
    ca = CaProcess::start(&kubeconfig, port, metrics)?;
    let reply = bed.pod("client").request(server, b"CA is back")?;
    assert!(reply.ends_with("CA is back"), "{reply}");
    drop(ca);
    Ok(())
}

#[test]
fn short_lived_certificates_renew_under_traffic_without_a_failed_connection() -> anyhow::Result<()>
{
    // 30 s certificates renewed at half-life; every connection does a full handshake, so
    // each one checks the certificates in force at that moment.
    let CaBed { bed, ca, .. } = ca_bed(&["--cert-ttl-secs", "30", "--no-pool"])?;
    let ca = ca.context("CA running")?;
    let server = bed.pod("server").addr(APP_PORT);
    let until = Instant::now() + Duration::from_secs(40);
    let mut connections = 0;
    while Instant::now() < until {
        let payload = format!("renewal {connections}");
        let reply = bed.pod("client").request(server, payload.as_bytes())?;
        assert!(
            reply.ends_with(&payload),
            "connection {connections}: {reply}"
        );
        connections += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let renewals = |agent: usize| -> anyhow::Result<f64> {
        let text = bed.agent(agent).metrics()?;
        Ok(text
            .lines()
            .find(|l| l.starts_with("ambit_certificate_renewals_total"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0))
    };
    assert!(
        renewals(0)? >= 2.0,
        "the client's certificate renewed at least twice"
    );
    assert!(
        renewals(1)? >= 2.0,
        "the server's certificate renewed at least twice"
    );
    eprintln!(
        "{connections} connections, all through renewals; CA log lines: {}",
        ca.logs().len()
    );
    Ok(())
}
