//! Privileged: metrics, admin API, logs and CLI of real agents in the two-node testbed.
//! Both agents report the same connection (reporter=source on the client's node,
//! destination on the server's); handshake failures are counted by reason; the admin
//! endpoints and the CLI built on them show the running agent; the log level changes at
//! runtime; /quitquitquit drains; the alert rules only use metrics the agent exports.

use std::io::{Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ambit_agent::identity::{LocalCa, SpiffeId, TrustBundle};
use ambit_e2e::testbed::{APP_PORT, MESH_NS, PLAIN_NS, PodSpec, Service, Testbed, agent_binary};

const WAIT: Duration = Duration::from_secs(10);
const VIP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 96, 0, 10);

fn mesh(agent_args: &[&str]) -> anyhow::Result<Testbed> {
    let pods = [
        PodSpec::new("client", MESH_NS, 0),
        PodSpec::new("server-a", MESH_NS, 0),
        PodSpec::new("server-b", MESH_NS, 1),
        PodSpec::new("plain-client", PLAIN_NS, 0),
    ];
    let services = vec![Service {
        name: "echo",
        vip: VIP,
        port: 80,
        selector_app: "server-b",
    }];
    let mut bed = Testbed::build(2, &pods, services)?;
    bed.agent_args = agent_args.iter().map(ToString::to_string).collect();
    bed.start_agents()?;
    Ok(bed)
}

/// Sum of the samples of `name` whose labels contain every one of `labels`
/// (`key="value"`); `None` when no sample matches.
fn sample(scrape: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let values: Vec<f64> = scrape
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// Scrapes until `check` holds (metrics lag the data by a copy-loop iteration at most).
fn wait_metric(
    scrape: impl Fn() -> anyhow::Result<String>,
    what: &str,
    check: impl Fn(&str) -> bool,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = scrape()?;
        if check(&text) {
            return Ok(text);
        }
        if Instant::now() > deadline {
            anyhow::bail!("{what} never true; last scrape:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reads until the greeting line and `n` echoed bytes have arrived.
fn read_echo(s: &mut TcpStream, n: usize) -> anyhow::Result<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(nl) = got.iter().position(|&b| b == b'\n')
            && got.len() - nl > n
        {
            return Ok(got);
        }
        let k = s.read(&mut buf)?;
        anyhow::ensure!(k > 0, "connection closed early: {got:?}");
        got.extend_from_slice(&buf[..k]);
    }
}

#[test]
fn both_agents_count_the_connection_with_their_reporter_and_live_bytes() -> anyhow::Result<()> {
    let bed = mesh(&[])?;
    let client = bed.pod("client");
    let server = bed.pod("server-b");
    let (a0, a1) = (bed.agent(0), bed.agent(1));
    let to_server = [
        "destination_workload=\"server-b\"",
        "destination_workload_namespace=\"mesh\"",
    ];

    // An open connection: bytes show before it closes.
    let mut s = client.connect(server.addr(APP_PORT))?;
    s.write_all(&[b'x'; 1000])?;
    read_echo(&mut s, 1000)?;
    let src = ["reporter=\"source\"", to_server[0], to_server[1]];
    // The echo can reach the client before the agent's copy has counted the write that
    // carried it, so both directions are waited for, not read from the first scrape.
    let live = wait_metric(
        || a0.metrics(),
        "client agent counts request and response bytes of the open connection",
        |t| {
            sample(t, "istio_tcp_received_bytes_total", &src).unwrap_or(0.0) >= 1000.0
                && sample(t, "istio_tcp_sent_bytes_total", &src).unwrap_or(0.0) >= 1000.0
        },
    )?;
    assert_eq!(
        sample(&live, "istio_tcp_connections_opened_total", &src),
        Some(1.0)
    );
    assert_eq!(
        sample(&live, "istio_tcp_connections_closed_total", &src),
        None,
        "{live}"
    );
    let dst = [
        "reporter=\"destination\"",
        "source_workload=\"client\"",
        "source_principal=\"spiffe://cluster.local/ns/mesh/sa/client\"",
        to_server[0],
    ];
    wait_metric(
        || a1.metrics(),
        "server agent counts request bytes of the open connection",
        |t| sample(t, "istio_tcp_received_bytes_total", &dst).unwrap_or(0.0) >= 1000.0,
    )?;

    s.shutdown(Shutdown::Write)?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)?;
    let closed_on = |agent: &ambit_e2e::testbed::Agent, labels: &[&str]| {
        wait_metric(
            || agent.metrics(),
            "connection counted as closed",
            |t| sample(t, "istio_tcp_connections_closed_total", labels) == Some(1.0),
        )
    };
    let text0 = closed_on(a0, &src)?;
    let text1 = closed_on(a1, &dst)?;
    for (text, reporter) in [(&text0, "source"), (&text1, "destination")] {
        let line = text
            .lines()
            .find(|l| {
                l.starts_with("istio_tcp_connections_closed_total{")
                    && l.contains(&format!("reporter=\"{reporter}\""))
            })
            .unwrap_or_default();
        for label in [
            "source_workload=\"client\"",
            "source_workload_namespace=\"mesh\"",
            "source_app=\"client\"",
            "source_version=\"unknown\"",
            "destination_workload=\"server-b\"",
            "destination_principal=\"spiffe://cluster.local/ns/mesh/sa/server-b\"",
            "destination_app=\"server-b\"",
            "request_protocol=\"tcp\"",
            "response_flags=\"-\"",
            "connection_security_policy=\"mutual_tls\"",
        ] {
            assert!(line.contains(label), "{reporter}: {label} in {line}");
        }
        // Bounded cardinality: no pod IPs or ports in any label.
        for l in text.lines().filter(|l| l.starts_with("istio_tcp_")) {
            assert!(!l.contains("10.11."), "raw IP in a label: {l}");
        }
    }
    // The server's agent decided (no policies: allowed) and logged the decision.
    assert!(
        sample(
            &text1,
            "ambit_authorization_decisions_total",
            &[
                "action=\"allow\"",
                "reason=\"no_policies\"",
                "policy=\"none\""
            ]
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{text1}"
    );
    let log = a1.wait_for_log(
        &[
            "inbound connection closed",
            "source_workload=mesh/client",
            "authz=ALLOW",
        ],
        WAIT,
    )?;
    assert!(log.contains("bytes_from_client=1000"), "{log}");
    a0.wait_for_log(
        &[
            "outbound connection closed",
            "destination_workload=mesh/server-b",
            "bytes_from_client=1000",
            "duration_ms=",
        ],
        WAIT,
    )?;

    // Through the service VIP the client's agent knows the service.
    client.request(SocketAddr::from((VIP, 80)), b"via vip")?;
    wait_metric(
        || a0.metrics(),
        "destination_service set for a VIP",
        |t| {
            sample(
                t,
                "istio_tcp_connections_closed_total",
                &["destination_service=\"echo.mesh.svc.cluster.local\""],
            ) == Some(1.0)
        },
    )?;
    Ok(())
}

#[test]
fn a_client_certificate_from_another_ca_counts_as_a_handshake_failure() -> anyhow::Result<()> {
    let bed = mesh(&[])?;
    let server = bed.pod("server-b");
    let foreign = LocalCa::generate()?;
    let id: SpiffeId = "spiffe://cluster.local/ns/mesh/sa/intruder".parse()?;
    let now = SystemTime::now();
    let cert = foreign.issue_with_validity(
        &id,
        now - Duration::from_secs(60),
        now + Duration::from_secs(3600),
    )?;
    // The client trusts the mesh (so it is the server that refuses), but presents a
    // certificate the mesh's CA never signed.
    let bundle = TrustBundle::from_pem(&std::fs::read(bed.ca_cert_path())?)?;
    let expected: SpiffeId = server.identity().parse()?;
    let config = ambit_agent::tunnel::client_config(&cert, &bundle, &expected)?;
    let tcp = bed.pod("plain-client").connect(server.addr(15008))?;
    let name = rustls_pki_types::ServerName::IpAddress(std::net::IpAddr::V4(server.ip).into());
    let conn = rustls::ClientConnection::new(Arc::new(config), name)?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let _ = tls.write_all(b"hello");
    let mut buf = [0u8; 16];
    let read = tls.read(&mut buf);
    assert!(
        !matches!(read, Ok(n) if n > 0),
        "the server must not talk to a foreign client"
    );
    let text = wait_metric(
        || bed.agent(1).metrics(),
        "handshake failure counted",
        |t| {
            sample(
                t,
                "ambit_tls_handshake_failures_total",
                &["reason=\"unknown_ca\""],
            ) == Some(1.0)
        },
    )?;
    assert!(
        sample(&text, "istio_tcp_connections_opened_total", &[]).is_none(),
        "a failed handshake is no connection: {text}"
    );
    bed.agent(1).wait_for_log(
        &["inbound HBONE handshake failed", "reason=unknown_ca"],
        WAIT,
    )?;
    Ok(())
}

fn ambit(args: &[&str]) -> anyhow::Result<(bool, String, String)> {
    let out = Command::new(agent_binary()?).args(args).output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[test]
fn admin_endpoints_and_the_cli_show_the_running_agent() -> anyhow::Result<()> {
    let bed = mesh(&[])?;
    let agent = bed.agent(0);
    let client_id = bed.pod("client").identity();

    let ready = ambit_agent::observability::client::get(agent.readiness_addr, "/healthz/ready")?;
    assert_eq!(ready.trim(), "ready");
    // The testbed reads the agent's log through a pipe, as a container runtime does.
    let logs = agent.logs();
    assert!(!logs.is_empty(), "the agent logged nothing");
    if let Some(line) = logs.iter().find(|l| l.contains('\u{1b}')) {
        panic!("terminal escape codes in a piped log: {line:?}");
    }

    let dump: serde_json::Value = serde_json::from_str(&agent.admin_get("/config_dump")?)?;
    assert_eq!(dump["node"], "node1");
    let names: Vec<&str> = dump["workloads"]
        .as_array()
        .map(|w| w.iter().filter_map(|w| w["name"].as_str()).collect())
        .unwrap_or_default();
    for name in ["client", "server-a", "server-b", "plain-client"] {
        assert!(names.contains(&name), "{name} in {names:?}");
    }
    assert_eq!(dump["services"][0]["name"], "echo");
    assert!(dump["policies"]["items"].is_array());
    assert!(dump["policies"]["warnings"].is_array());
    assert_eq!(
        dump["config"]["adminAddr"], "127.0.0.1:0",
        "the effective flags (the port is the flag's value)"
    );
    let certs = dump["certificates"].to_string();
    assert!(certs.contains(&client_id), "{certs}");

    let certs = agent.admin_get("/certs")?;
    assert!(certs.contains(&client_id), "{certs}");
    assert!(certs.contains("BEGIN CERTIFICATE"), "{certs}");
    assert!(!certs.contains("PRIVATE KEY"), "keys never leave the agent");

    let admin = agent.admin_addr.to_string();
    let (ok, out, err) = ambit(&["status", "--admin-addr", &admin])?;
    assert!(ok, "{out}{err}");
    assert!(out.contains("ready:             yes"), "{out}");
    assert!(out.contains("enrolled pods:     2"), "{out}");
    assert!(
        out.contains("ambit_connect4") && out.contains("ambit_sock_ops"),
        "{out}"
    );

    let (ok, out, err) = ambit(&["config-dump", "--admin-addr", &admin])?;
    assert!(ok, "{err}");
    let dump: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(dump["node"], "node1");

    let (ok, out, err) = ambit(&["certs", "--admin-addr", &admin])?;
    assert!(ok, "{err}");
    assert!(out.contains(&client_id) && out.contains("serial:"), "{out}");
    assert!(!out.contains("BEGIN CERTIFICATE"), "{out}");
    let (_, out, _) = ambit(&["certs", "--pem", "--admin-addr", &admin])?;
    assert!(out.contains("BEGIN CERTIFICATE"), "{out}");

    let (ok, out, _) = ambit(&["version", "--admin-addr", &admin])?;
    assert!(ok);
    let version = env!("CARGO_PKG_VERSION");
    assert!(out.contains(&format!("ambit {version}")), "{out}");
    assert!(
        out.contains(&format!("agent at {admin}: {version}")),
        "{out}"
    );

    // Nobody listens on the discard port: the error says what to check.
    let (ok, _, err) = ambit(&["status", "--admin-addr", "127.0.0.1:9"])?;
    assert!(!ok);
    assert!(err.contains("Is the agent running"), "{err}");
    assert!(err.contains("--admin-addr"), "{err}");
    for cmd in ["status", "config-dump", "certs", "version", "run"] {
        let (ok, out, _) = ambit(&[cmd, "--help"])?;
        assert!(ok && out.contains("Usage"), "{cmd} --help: {out}");
    }
    Ok(())
}

#[test]
fn json_logs_and_the_log_level_changes_at_runtime() -> anyhow::Result<()> {
    let bed = mesh(&["--log-format", "json"])?;
    let agent = bed.agent(0);
    assert!(agent.admin_get("/logging")?.contains("info"));
    agent.admin_get("/status")?;
    assert!(
        !agent.logs().iter().any(|l| l.contains("admin request")),
        "debug lines are off at info"
    );
    let answer = agent.admin_post("/logging?level=debug")?;
    assert!(answer.contains("log level: debug"), "{answer}");
    agent.admin_get("/status")?;
    agent.wait_for_log(&["\"message\":\"admin request\"", "/status"], WAIT)?;
    let bad = agent.admin_post("/logging?level=no%20such%3D%3Dlevel");
    assert!(bad.is_err(), "an invalid filter is refused");
    agent.admin_post("/logging?level=info")?;

    let reply = bed
        .pod("client")
        .request(bed.pod("server-a").addr(APP_PORT), b"json please")?;
    assert!(reply.ends_with("json please"));
    let line = agent.wait_for_log(&["inbound connection closed"], WAIT)?;
    let v: serde_json::Value = serde_json::from_str(&line)?;
    let f = &v["fields"];
    assert_eq!(f["source"], bed.pod("client").identity(), "{line}");
    assert_eq!(f["source_workload"], "mesh/client", "{line}");
    assert_eq!(f["destination_workload"], "mesh/server-a", "{line}");
    assert_eq!(f["security"], "mutual_tls", "{line}");
    assert_eq!(f["bytes_from_client"], 11, "{line}");
    assert!(
        f["authz"].as_str().unwrap_or_default().starts_with("ALLOW"),
        "{line}"
    );
    for l in agent.logs() {
        serde_json::from_str::<serde_json::Value>(&l)
            .map_err(|e| anyhow::anyhow!("not JSON ({e}): {l}"))?;
        assert!(!l.contains("PRIVATE KEY"), "{l}");
    }
    Ok(())
}

#[test]
fn quitquitquit_drains_without_cutting_a_transfer_then_forces_at_the_deadline() -> anyhow::Result<()>
{
    let mut bed = mesh(&["--drain-deadline-ms", "3000"])?;

    // A transfer through node2's agent that is still going when the drain starts.
    let mut s = bed
        .pod("client")
        .connect(bed.pod("server-b").addr(APP_PORT))?;
    s.write_all(b"first half ")?;
    read_echo(&mut s, 11)?;
    assert_eq!(bed.agent(1).admin_post("/quitquitquit")?.trim(), "draining");
    bed.agent(1)
        .wait_for_log(&["draining", "open_connections=1"], WAIT)?;
    std::thread::sleep(Duration::from_millis(500));
    s.write_all(b"second half")?;
    s.shutdown(Shutdown::Write)?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    // The greeting and the first half were read above.
    assert_eq!(reply, "second half", "the rest of the echo arrived whole");
    let agent = bed.agents[1].as_mut().expect("agent 1");
    let status = agent.wait_exit(WAIT)?;
    assert!(
        status.is_some_and(|s| s.success()),
        "exits cleanly: {status:?}"
    );
    agent.wait_for_log(&["drained"], WAIT)?;

    // With node2's agent gone the tunnel cannot come up: the client's agent records the
    // connection closed with Envoy's upstream-failure flag.
    // The client's agent cannot finish the connection, so the client sees a reset; the
    // wait covers the agent's 10 s connect timeout, so a hang fails as a timeout.
    let refused = ambit_e2e::refusal::exchange(
        bed.pod("client"),
        bed.pod("server-b").addr(APP_PORT),
        b"anyone?",
        Duration::from_secs(15),
    )?;
    ambit_e2e::refusal::assert_reset(&refused, "no tunnel to a drained node");
    wait_metric(
        || bed.agent(0).metrics(),
        "upstream failure flagged",
        |t| {
            sample(
                t,
                "istio_tcp_connections_closed_total",
                &["response_flags=\"UF\"", "destination_workload=\"server-b\""],
            ) == Some(1.0)
        },
    )?;

    // An idle connection that never ends is closed at the deadline.
    let mut idle = bed
        .pod("client")
        .connect(bed.pod("server-a").addr(APP_PORT))?;
    read_echo(&mut idle, 0)?;
    let started = Instant::now();
    bed.agent(0).admin_post("/quitquitquit")?;
    let agent = bed.agents[0].as_mut().expect("agent 0");
    let status = agent.wait_exit(WAIT)?;
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(2500) && took < Duration::from_secs(8),
        "waited for the deadline: {took:?}"
    );
    agent.wait_for_log(&["drain deadline reached"], WAIT)?;
    Ok(())
}

/// Metric names in PromQL: identifiers starting with our prefixes.
fn metric_names(text: &str) -> Vec<String> {
    let mut names: Vec<String> = text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("istio_") || w.starts_with("ambit_"))
        .map(ToOwned::to_owned)
        .collect();
    names.sort();
    names.dedup();
    names
}

#[test]
fn monitoring_manifests_use_only_exported_metrics() -> anyhow::Result<()> {
    let bed = mesh(&[])?;
    // Traffic first, so label-carrying families have samples.
    bed.pod("client")
        .request(bed.pod("server-a").addr(APP_PORT), b"x")?;
    let scrape = wait_metric(
        || bed.agent(0).metrics(),
        "connection recorded",
        |t| sample(t, "istio_tcp_connections_closed_total", &[]).is_some(),
    )?;
    let exported = |name: &str| {
        let family = name.strip_suffix("_total").unwrap_or(name);
        scrape.lines().any(|l| {
            l.starts_with(&format!("{name}{{"))
                || l.starts_with(&format!("{name} "))
                || l == format!("# TYPE {family} counter")
                || l.starts_with(&format!("# TYPE {name} "))
        })
    };
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/monitoring");
    let mut checked = 0;
    for file in ["prometheusrule.yaml", "grafana-dashboard.json"] {
        let text = std::fs::read_to_string(dir.join(file))?;
        let names = metric_names(&text);
        assert!(names.len() >= 5, "{file}: {names:?}");
        for name in names {
            assert!(
                exported(&name),
                "{file} uses {name}, which the agent does not export"
            );
            checked += 1;
        }
    }
    assert!(checked > 10);
    Ok(())
}
