//! Privileged: the CA service (`ambit ca`) with node authorization, on the two-node testbed
//! in Kubernetes mode. The CA validates tokens with TokenReviews and reads pods from the
//! project's fake API server; the agents take their workload certificates from it.

use std::io::{BufRead as _, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ambit_e2e::apiserver::{self, Kind, TokenIdentity};
use ambit_e2e::testbed::{APP_PORT, MESH_NS, PodSpec, RemoteCa, Testbed, agent_binary};
use ambit_e2e::unique_name;
use anyhow::Context as _;

const WAIT: Duration = Duration::from_secs(20);

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// A running `ambit ca`, killed on drop.
struct CaProcess {
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
    metrics: SocketAddr,
}

impl CaProcess {
    fn start(kubeconfig: &std::path::Path, port: u16, metrics: SocketAddr) -> anyhow::Result<Self> {
        let mut child = Command::new(agent_binary()?)
            .args(["ca", "--listen-addr"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--metrics-addr")
            .arg(metrics.to_string())
            .args([
                "--dns-names",
                "localhost",
                "--trust-domain",
                "cluster.local",
            ])
            .env("KUBECONFIG", kubeconfig)
            .env("AMBIT_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting ambit ca")?;
        let logs = Arc::new(Mutex::new(Vec::new()));
        for pipe in [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let logs = logs.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if std::env::var_os("AMBIT_TESTBED_ECHO").is_some() {
                        eprintln!("[ca] {line}");
                    }
                    if let Ok(mut l) = logs.lock() {
                        l.push(line);
                    }
                }
            });
        }
        let ca = Self {
            child,
            logs,
            metrics,
        };
        ca.wait_for_log("CA serving")?;
        Ok(ca)
    }

    fn logs(&self) -> Vec<String> {
        self.logs.lock().map(|l| l.clone()).unwrap_or_default()
    }

    fn wait_for_log(&self, part: &str) -> anyhow::Result<String> {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(line) = self.logs().into_iter().find(|l| l.contains(part)) {
                return Ok(line);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "CA never logged {part:?}:\n{}",
                self.logs().join("\n")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn metrics(&self) -> anyhow::Result<String> {
        Ok(ambit_agent::observability::client::get(
            self.metrics,
            "/metrics",
        )?)
    }
}

impl Drop for CaProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Registers one node agent pod per node (service account `ambit-system/ambit`) and its
/// projected token; returns the directory of token files.
fn register_node_agents(bed: &Testbed) -> anyhow::Result<PathBuf> {
    let api = &bed.kube.as_ref().context("kubernetes mode")?.api;
    api.create(&apiserver::namespace("ambit-system", &[]))?;
    let dir = bed.dir.join("tokens");
    std::fs::create_dir_all(&dir)?;
    for node in &bed.nodes {
        let pod = format!("ambit-{}", node.name);
        let uid = ambit_e2e::kubebed::new_uid();
        api.create(
            &apiserver::pod("ambit-system", &pod)
                .uid(&uid)
                .node(&node.name)
                .ip(&node.wire_ip.to_string())
                .host_network(true)
                .service_account("ambit")
                .build(),
        )?;
        let token = unique_name("token-");
        api.register_token(
            &token,
            TokenIdentity::service_account("ambit-system", "ambit", &pod, &uid, &["ambit-ca"]),
        );
        std::fs::write(dir.join(format!("{}.token", node.name)), token)?;
    }
    Ok(dir)
}

/// The CA's root, from the Secret it created at first start.
fn ca_root(bed: &Testbed) -> anyhow::Result<Vec<u8>> {
    let api = &bed.kube.as_ref().context("kubernetes mode")?.api;
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(secret) =
            api.get::<k8s_openapi::api::core::v1::Secret>("ambit-system", "ambit-ca")?
            && let Some(root) = secret.data.and_then(|d| d.get("ca.crt").cloned())
        {
            return Ok(root.0);
        }
        anyhow::ensure!(Instant::now() < deadline, "the CA created no Secret");
        std::thread::sleep(Duration::from_millis(50));
    }
}

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
