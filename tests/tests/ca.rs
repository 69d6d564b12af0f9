//! Privileged: the CA service (`ambit ca`) with node authorization, on the two-node testbed
//! in Kubernetes mode. The CA validates tokens with TokenReviews and reads pods from the
//! project's fake API server; the agents take their workload certificates from it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ambit_e2e::apiserver::{ApiServer, Kind, Verb};
use ambit_e2e::ca::{CaProcess, ca_root, register_node_agents};
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
    /// The agents' --ca-trust-file, laid out and updated as the kubelet does a ConfigMap.
    trust_volume: ConfigMapVolume,
    port: u16,
    metrics: SocketAddr,
}

/// A ConfigMap volume as the kubelet lays it out: `root.pem -> ..data/root.pem`,
/// `..data -> ..<generation>`; an update writes a new generation and renames a new `..data`
/// symlink over the old one.
struct ConfigMapVolume {
    dir: PathBuf,
    generation: u32,
}

impl ConfigMapVolume {
    fn new(dir: PathBuf, content: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        let mut volume = Self { dir, generation: 0 };
        volume.update(content)?;
        std::os::unix::fs::symlink("..data/root.pem", volume.file())?;
        Ok(volume)
    }

    fn file(&self) -> PathBuf {
        self.dir.join("root.pem")
    }

    fn update(&mut self, content: &str) -> anyhow::Result<()> {
        self.generation += 1;
        let generation = format!(
            "..2026_12_01_00_00_{:02}.{}",
            self.generation, self.generation
        );
        std::fs::create_dir(self.dir.join(&generation))?;
        std::fs::write(self.dir.join(&generation).join("root.pem"), content)?;
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&generation, &tmp)?;
        std::fs::rename(&tmp, self.dir.join("..data"))?;
        Ok(())
    }

    /// Copies what the CA published into the volume, as the kubelet's sync would.
    fn sync_from(&mut self, api: &ApiServer) -> anyhow::Result<String> {
        let pem = published_pem(api)?;
        self.update(&pem)?;
        Ok(pem)
    }
}

fn published_pem(api: &ApiServer) -> anyhow::Result<String> {
    api.get::<k8s_openapi::api::core::v1::ConfigMap>("ambit-system", "ambit-root")?
        .context("ConfigMap ambit-root")?
        .data
        .and_then(|d| d.get("root.pem").cloned())
        .context("key root.pem")
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
    let ca = CaProcess::start_anywhere(&kubeconfig)?;
    // Restarts come back on the same addresses, as a CA behind a Service does.
    let (port, metrics) = (ca.addr().port(), ca.metrics_addr());
    let api = &bed.kube.as_ref().context("kubernetes mode")?.api;
    assert_eq!(
        api.list_json(Kind::Secret).len(),
        1,
        "the CA bootstrapped its root into one Secret"
    );
    // No manual step: the agents trust what the CA published.
    ca.wait_for_log("published the root")?;
    assert_eq!(
        der_roots(&published_pem(api)?)?,
        der_roots(&String::from_utf8(ca_root(&bed)?)?)?
    );
    let trust_volume = ConfigMapVolume::new(bed.dir.join("ambit-root"), &published_pem(api)?)?;
    let trust_file = trust_volume.file();
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
        trust_volume,
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
        ..
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
    // One transfer that lives through every renewal, next to the new connections.
    let mut long = bed.pod("client").connect(server)?;
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' {
        std::io::Read::read_exact(&mut long, &mut byte)?;
    }
    let until = Instant::now() + Duration::from_secs(120);
    let mut connections = 0;
    while Instant::now() < until {
        if connections % 50 == 0 {
            let chunk = format!("chunk {connections:06}");
            std::io::Write::write_all(&mut long, chunk.as_bytes())?;
            let mut echoed = vec![0u8; chunk.len()];
            std::io::Read::read_exact(&mut long, &mut echoed)?;
            assert_eq!(echoed, chunk.as_bytes(), "the long transfer goes on");
        }
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
        renewals(0)? >= 6.0,
        "the client's certificate renewed every 15 s"
    );
    assert!(
        renewals(1)? >= 6.0,
        "the server's certificate renewed every 15 s"
    );
    eprintln!(
        "{connections} connections, all through renewals; CA log lines: {}",
        ca.logs().len()
    );
    Ok(())
}

/// The `cacerts` Secret (Istio's layout) the CA prefers over its own: sign with
/// `cert_pem`/`key_pem`, hand out `roots_pem` as the trust bundle.
fn set_cacerts(
    api: &ApiServer,
    cert_pem: &str,
    key_pem: &str,
    roots_pem: &str,
) -> anyhow::Result<()> {
    use k8s_openapi::ByteString;
    let data = [
        ("ca-cert.pem", cert_pem),
        ("ca-key.pem", key_pem),
        ("cert-chain.pem", cert_pem),
        ("root-cert.pem", roots_pem),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), ByteString(v.as_bytes().to_vec())))
    .collect();
    let secret = k8s_openapi::api::core::v1::Secret {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some("cacerts".to_owned()),
            namespace: Some("ambit-system".to_owned()),
            ..Default::default()
        },
        data: Some(data),
        ..Default::default()
    };
    if api
        .get::<k8s_openapi::api::core::v1::Secret>("ambit-system", "cacerts")?
        .is_some()
    {
        api.delete::<k8s_openapi::api::core::v1::Secret>("ambit-system", "cacerts")?;
    }
    api.create(&secret)?;
    Ok(())
}

#[test]
fn root_rotation_with_overlap_fails_no_connection() -> anyhow::Result<()> {
    // The agents' trust in the CA's serving certificate follows the ConfigMap the CA
    // publishes, mirrored into their volume as the kubelet does: no restart, no manual step.
    let (_, new_root, new_key) = ambit_agent::identity::LocalCa::generate_root_pem()?;
    let CaBed {
        bed,
        ca,
        kubeconfig,
        mut trust_volume,
        port,
        metrics,
        ..
    } = ca_bed(&["--cert-ttl-secs", "16", "--no-pool"])?;
    let mut ca = ca.context("CA running")?;
    let api = &bed.kube.as_ref().context("kubernetes mode")?.api;
    let own = api
        .get::<k8s_openapi::api::core::v1::Secret>("ambit-system", "ambit-ca")?
        .and_then(|s| s.data)
        .context("the CA's own Secret")?;
    let text = |k: &str| -> anyhow::Result<String> {
        Ok(String::from_utf8(own.get(k).context("key")?.0.clone())?)
    };
    let (old_root, old_key) = (text("ca.crt")?, text("ca.key")?);
    let server = bed.pod("server").addr(APP_PORT);
    let mut sent = 0;
    // Connections every 100 ms for `secs`: each one a full handshake against the
    // certificates and bundles in force at that moment.
    let mut traffic = |secs: u64| -> anyhow::Result<()> {
        let until = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < until {
            let payload = format!("rotation {sent}");
            let reply = bed.pod("client").request(server, payload.as_bytes())?;
            assert!(reply.ends_with(&payload), "connection {sent}: {reply}");
            sent += 1;
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    };
    traffic(2)?;
    // Overlap, step 1: still signing with the old root, both roots handed out; one
    // certificate lifetime so every agent's bundle holds both.
    set_cacerts(api, &old_root, &old_key, &format!("{old_root}{new_root}"))?;
    drop(ca);
    ca = CaProcess::start(&kubeconfig, port, metrics)?;
    ca.wait_for_log("published the root")?;
    let published = trust_volume.sync_from(api)?;
    assert_eq!(
        der_roots(&published)?,
        der_roots(&format!("{old_root}{new_root}"))?
    );
    for agent in 0..2 {
        bed.agent(agent)
            .wait_for_log(&["the CA trust file changed", "roots=2"], WAIT)?;
    }
    traffic(18)?;
    // Step 2: signing with the new root, both still trusted.
    set_cacerts(api, &new_root, &new_key, &format!("{new_root}{old_root}"))?;
    drop(ca);
    ca = CaProcess::start(&kubeconfig, port, metrics)?;
    traffic(18)?;
    // Step 3: the old root removed once no certificate from it is left.
    set_cacerts(api, &new_root, &new_key, &new_root)?;
    drop(ca);
    ca = CaProcess::start(&kubeconfig, port, metrics)?;
    ca.wait_for_log("published the root")?;
    assert_eq!(
        der_roots(&trust_volume.sync_from(api)?)?,
        der_roots(&new_root)?
    );
    for agent in 0..2 {
        bed.agent(agent)
            .wait_for_log(&["the CA trust file changed", "roots=1"], WAIT)?;
    }
    traffic(18)?;
    // The last CA took its key from the rotated Secret, and both agents renewed through
    // every step (16 s certificates, renewed at half-life: 6 renewals or more each).
    let loaded = ca.wait_for_log("CA key loaded")?;
    // Istio calls a user-provided `cacerts` key "plugged in".
    assert!(loaded.contains("source=PluggedIn"), "{loaded}");
    for agent in 0..2 {
        let text = bed.agent(agent).metrics()?;
        let renewals: f64 = text
            .lines()
            .find(|l| l.starts_with("ambit_certificate_renewals_total"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        assert!(renewals >= 5.0, "agent {agent} renewed {renewals} times");
    }
    eprintln!("{sent} connections through the whole rotation, none failed");
    drop(ca);
    Ok(())
}

/// The roots in ConfigMap `ambit-root` (key `root.pem`), as DER.
fn published_roots(api: &ApiServer) -> anyhow::Result<Vec<Vec<u8>>> {
    der_roots(&published_pem(api)?)
}

fn der_roots(pem: &str) -> anyhow::Result<Vec<Vec<u8>>> {
    Ok(
        ambit_agent::identity::TrustBundle::from_pem(pem.as_bytes())?
            .roots
            .into_iter()
            .map(|r| r.to_vec())
            .collect(),
    )
}

/// Starts `ambit ca` and waits until it has published its root; returns the outcome word.
fn start_publishing_ca(kubeconfig: &std::path::Path) -> anyhow::Result<(CaProcess, &'static str)> {
    let ca = CaProcess::start_anywhere(kubeconfig)?;
    let line = ca.wait_for_log("published the root")?;
    let outcome = ["created", "updated", "unchanged"]
        .into_iter()
        .find(|o| line.contains(o))
        .with_context(|| format!("no outcome in {line:?}"))?;
    Ok((ca, outcome))
}

/// No root needed: two `ambit ca` processes against the fake API server.
#[test]
fn the_ca_publishes_its_root_and_replicas_do_not_fight() -> anyhow::Result<()> {
    let api = ApiServer::start();
    let dir = std::env::temp_dir().join(ambit_e2e::unique_name("ca-publish-"));
    std::fs::create_dir_all(&dir)?;
    let kubeconfig = dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)?;
    let result = (|| -> anyhow::Result<()> {
        // Two replicas starting together: one root, one ConfigMap, written once.
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| start_publishing_ca(&kubeconfig));
            let b = s.spawn(|| start_publishing_ca(&kubeconfig));
            (a.join(), b.join())
        });
        let (mut a, a_outcome) = a.map_err(|_| anyhow::anyhow!("replica a panicked"))??;
        let (mut b, b_outcome) = b.map_err(|_| anyhow::anyhow!("replica b panicked"))??;
        let mut outcomes = [a_outcome, b_outcome];
        outcomes.sort_unstable();
        assert_eq!(outcomes, ["created", "unchanged"]);
        assert_eq!(api.request_count("configmaps", Verb::Update), 0);
        let own = api
            .get::<k8s_openapi::api::core::v1::Secret>("ambit-system", "ambit-ca")?
            .and_then(|s| s.data)
            .context("the CA's Secret")?;
        let old_pem = String::from_utf8(own.get("ca.crt").context("ca.crt")?.0.clone())?;
        let old_key = String::from_utf8(own.get("ca.key").context("ca.key")?.0.clone())?;
        assert_eq!(published_roots(&api)?, der_roots(&old_pem)?);

        // Rotation step 1: both roots handed out. The replica restarted first publishes
        // them; the other one, restarted after it, finds them there and writes nothing.
        let (_, new_pem, new_key) = ambit_agent::identity::LocalCa::generate_root_pem()?;
        set_cacerts(&api, &old_pem, &old_key, &format!("{old_pem}{new_pem}"))?;
        drop(a);
        let (restarted, outcome) = start_publishing_ca(&kubeconfig)?;
        a = restarted;
        assert_eq!(outcome, "updated");
        assert_eq!(
            published_roots(&api)?,
            der_roots(&format!("{old_pem}{new_pem}"))?
        );
        drop(b);
        let (restarted, outcome) = start_publishing_ca(&kubeconfig)?;
        b = restarted;
        assert_eq!(outcome, "unchanged");
        assert_eq!(api.request_count("configmaps", Verb::Update), 1);

        // Step 3: only the new root (step 2 hands out the same pair).
        set_cacerts(&api, &new_pem, &new_key, &new_pem)?;
        drop(b);
        let (b, outcome) = start_publishing_ca(&kubeconfig)?;
        assert_eq!(outcome, "updated");
        assert_eq!(published_roots(&api)?, der_roots(&new_pem)?);
        // The replica still running with the old pair does not write it back.
        a.wait_for_log("CA serving")?;
        assert_eq!(api.request_count("configmaps", Verb::Update), 2);
        assert!(
            !a.logs()
                .iter()
                .chain(b.logs().iter())
                .any(|l| l.contains("publishing the root failed")),
            "no failed publication"
        );
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}
