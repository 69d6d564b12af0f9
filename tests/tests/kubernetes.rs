//! Privileged: agents in Kubernetes mode (`ambit run --kubernetes`) against the project's
//! own list/watch API server, on the two-node testbed whose pods look like the kubelet's
//! (a sandbox process in a kubepods cgroup). Opt-in by namespace label, live; pod opt-out;
//! policies from the API server; API server trouble changes nothing; agent restart; the
//! status annotation; the CNI plugin closing the start-up race.

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ambit_e2e::apiserver::Kind;
use ambit_e2e::testbed::{APP_PORT, MESH_NS, PLAIN_NS, PodSpec, Testbed};
use ambit_e2e::unique_name;

const LOG_WAIT: Duration = Duration::from_secs(10);

fn bed(pods: &[PodSpec], mesh_enabled: bool, policies: &str) -> anyhow::Result<Testbed> {
    let mut bed = Testbed::build(2, pods, Vec::new())?;
    bed.mesh_enabled = mesh_enabled;
    bed.policies = policies.to_owned();
    bed.enable_kubernetes()?;
    bed.start_agents()?;
    Ok(bed)
}

fn kube(bed: &Testbed) -> &ambit_e2e::kubebed::KubeBed {
    bed.kube.as_ref().expect("kubernetes mode")
}

/// Sends a unique marker from `from` to `to` while capturing node 1's wire; returns whether
/// the marker crossed the wire in plaintext, after checking the request worked and the
/// capture saw the traffic.
fn marker_on_wire(bed: &Testbed, from: &str, to: SocketAddr) -> anyhow::Result<bool> {
    let marker = unique_name("AMBIT-K8S-MARKER-");
    let (reply, wire) = bed.capture_wire(0, || bed.pod(from).request(to, marker.as_bytes()))?;
    assert!(reply.ends_with(&marker), "the request worked: {reply}");
    assert!(!wire.summary.is_empty(), "the capture saw the traffic");
    let plaintext = wire
        .raw
        .windows(marker.len())
        .any(|w| w == marker.as_bytes());
    if !plaintext {
        assert!(
            wire.hbone_bytes > marker.len() as u64,
            "no plaintext, and the capture saw the tunnel carry the request: {}",
            wire.summary
        );
    }
    Ok(plaintext)
}

/// The request ended with a connection reset (not a timeout, not an empty reply).
fn assert_reset(result: anyhow::Result<String>) {
    match result {
        Ok(reply) => panic!("expected a reset, got a reply: {reply:?}"),
        Err(e) => {
            let io = e
                .downcast_ref::<std::io::Error>()
                .unwrap_or_else(|| panic!("expected an I/O error, got {e:#}"));
            assert_eq!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset,
                "expected a reset, got {io}"
            );
        }
    }
}

fn status_annotations(bed: &Testbed, pod: &str) -> Vec<Option<String>> {
    kube(bed)
        .api
        .patches()
        .into_iter()
        .filter(|p| p.name == pod)
        .map(|p| {
            p.body["metadata"]["annotations"]["ambit.dev/status"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

#[test]
fn namespace_label_enrolls_and_unenrolls_pods_live() -> anyhow::Result<()> {
    let pods = [
        PodSpec::new("client", MESH_NS, 0),
        PodSpec::new("server", MESH_NS, 1),
    ];
    let bed = bed(&pods, false, "")?;
    let server = bed.pod("server").addr(APP_PORT);
    assert!(
        marker_on_wire(&bed, "client", server)?,
        "without the label the namespace is not in the mesh"
    );

    let labelled = Instant::now();
    kube(&bed).label_namespace(MESH_NS, Some("enabled"))?;
    bed.agent(0)
        .wait_for_log(&["pod enrolled", "mesh/client"], LOG_WAIT)?;
    bed.agent(1)
        .wait_for_log(&["pod enrolled", "mesh/server"], LOG_WAIT)?;
    eprintln!(
        "namespace label → both pods enrolled in {:?}",
        labelled.elapsed()
    );
    assert!(
        !marker_on_wire(&bed, "client", server)?,
        "once labelled, only TLS crosses the wire"
    );
    bed.agent(1).wait_for_log(
        &[
            "inbound connection closed",
            "spiffe://cluster.local/ns/mesh/sa/client",
        ],
        LOG_WAIT,
    )?;
    // The outcome is on the pod for `kubectl get pod -o yaml`.
    let deadline = Instant::now() + LOG_WAIT;
    while !status_annotations(&bed, "client").contains(&Some("enrolled".to_owned())) {
        assert!(Instant::now() < deadline, "no status annotation written");
        std::thread::sleep(Duration::from_millis(50));
    }

    kube(&bed).label_namespace(MESH_NS, None)?;
    bed.agent(0)
        .wait_for_log(&["pod unenrolled", "mesh/client"], LOG_WAIT)?;
    bed.agent(1)
        .wait_for_log(&["pod unenrolled", "mesh/server"], LOG_WAIT)?;
    assert!(
        marker_on_wire(&bed, "client", server)?,
        "label removed: plain traffic again"
    );
    let deadline = Instant::now() + LOG_WAIT;
    while status_annotations(&bed, "client").last() != Some(&None) {
        assert!(Instant::now() < deadline, "status annotation not removed");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

#[test]
fn a_pod_opts_out_with_its_label_and_back_in() -> anyhow::Result<()> {
    let pods = [
        PodSpec::new("client", MESH_NS, 0),
        PodSpec::new("server", MESH_NS, 1),
    ];
    let bed = bed(&pods, true, "")?;
    let server = bed.pod("server").addr(APP_PORT);
    assert!(!marker_on_wire(&bed, "client", server)?);
    let api = &kube(&bed).api;
    api.patch_labels(
        Kind::Pod,
        MESH_NS,
        "client",
        &[("ambit.dev/mesh", Some("disabled"))],
    )?;
    bed.agent(0)
        .wait_for_log(&["pod unenrolled", "mesh/client"], LOG_WAIT)?;
    // The client is out; the server is still in the mesh and receives it as plaintext.
    let reply = bed.pod("client").request(server, b"plain")?;
    assert!(reply.ends_with("plain"), "{reply}");
    api.patch_labels(Kind::Pod, MESH_NS, "client", &[("ambit.dev/mesh", None)])?;
    bed.agent(0)
        .wait_for_logs(&["pod enrolled", "mesh/client"], 2, LOG_WAIT)?;
    assert!(!marker_on_wire(&bed, "client", server)?);
    Ok(())
}

const STRICT_AND_DENY: &str = "
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: mesh}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-intruder, namespace: mesh}
spec:
  selector: {matchLabels: {app: server}}
  action: DENY
  rules:
    - from:
        - source: {principals: [cluster.local/ns/mesh/sa/intruder]}
";

#[test]
fn policies_come_from_the_api_server_and_change_live() -> anyhow::Result<()> {
    let pods = [
        PodSpec::new("client", MESH_NS, 0),
        PodSpec::new("intruder", MESH_NS, 0),
        PodSpec::new("legacy", PLAIN_NS, 0),
        PodSpec::new("server", MESH_NS, 1),
    ];
    let bed = bed(&pods, true, STRICT_AND_DENY)?;
    let server = bed.pod("server").addr(APP_PORT);
    let reply = bed.pod("client").request(server, b"hello")?;
    assert!(reply.ends_with("hello"), "{reply}");
    assert_reset(bed.pod("intruder").request(server, b"denied"));
    bed.agent(1)
        .wait_for_log(&["denied", "deny-intruder"], LOG_WAIT)?;
    assert_reset(bed.pod("legacy").request(server, b"plaintext"));
    bed.agent(1)
        .wait_for_log(&["denied", "mtls_required"], LOG_WAIT)?;

    // Policies removed in the API server: both are let in.
    kube(&bed).set_policies("")?;
    let deadline = Instant::now() + LOG_WAIT;
    loop {
        let dump: serde_json::Value =
            serde_json::from_str(&bed.agent(1).admin_get("/config_dump")?)?;
        if dump["policies"]["items"]
            .as_array()
            .is_some_and(Vec::is_empty)
        {
            break;
        }
        assert!(Instant::now() < deadline, "policies never removed: {dump}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let reply = bed.pod("intruder").request(server, b"now allowed")?;
    assert!(reply.ends_with("now allowed"), "{reply}");
    let reply = bed.pod("legacy").request(server, b"plain allowed")?;
    assert!(reply.ends_with("plain allowed"), "{reply}");
    Ok(())
}

#[test]
fn api_server_trouble_unenrolls_nothing_and_drops_no_connection() -> anyhow::Result<()> {
    let pods = [
        PodSpec::new("client", MESH_NS, 0),
        PodSpec::new("server", MESH_NS, 1),
    ];
    let mut bed = bed(&pods, true, "")?;
    let server = bed.pod("server").addr(APP_PORT);
    // A long-lived connection through the mesh, open across the trouble.
    let mut conn = bed.pod("client").connect(server)?;
    // The whole greeting line, however it arrives, so the echo read later is only the echo.
    let mut byte = [0u8; 1];
    let mut greeting = Vec::new();
    while byte[0] != b'\n' {
        conn.read_exact(&mut byte)?;
        greeting.push(byte[0]);
    }
    assert!(greeting.starts_with(b"server "), "server greeted");
    let lists_before = kube(&bed)
        .api
        .request_count("pods", ambit_e2e::apiserver::Verb::List);

    // The API server goes away; while it is down a pod changes and history is compacted,
    // so the agents' watches come back to `410 Gone` and must relist.
    let kb = bed.kube.as_mut().expect("kubernetes mode");
    kb.api.end_watches();
    kb.api.stop();
    kb.api
        .patch_labels(Kind::Pod, MESH_NS, "server", &[("touched", Some("yes"))])?;
    kb.api.compact();
    std::thread::sleep(Duration::from_secs(2));
    kb.api.restart()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while kube(&bed)
        .api
        .request_count("pods", ambit_e2e::apiserver::Verb::List)
        <= lists_before
    {
        assert!(Instant::now() < deadline, "the agents never relisted pods");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The change made while the API server was away is applied after the relist.
    bed.agent(1)
        .wait_for_log(&["configuration applied"], LOG_WAIT)?;

    conn.write_all(b"still here")?;
    let mut echoed = [0u8; 10];
    conn.read_exact(&mut echoed)?;
    assert_eq!(&echoed, b"still here", "the connection survived");
    for i in 0..2 {
        assert!(
            !bed.agent(i)
                .logs()
                .iter()
                .any(|l| l.contains("pod unenrolled")),
            "agent {i} unenrolled a pod because of API server trouble"
        );
    }
    Ok(())
}

#[test]
fn a_restarted_agent_enrolls_the_same_pods_again() -> anyhow::Result<()> {
    let pods = [
        PodSpec::new("client", MESH_NS, 0),
        PodSpec::new("server", MESH_NS, 1),
    ];
    let mut bed = bed(&pods, true, "")?;
    let server = bed.pod("server").addr(APP_PORT);
    assert!(!marker_on_wire(&bed, "client", server)?);
    bed.kill_agent(0);
    bed.start_agent(0)?;
    bed.agent(0)
        .wait_for_log(&["pod enrolled", "mesh/client"], LOG_WAIT)?;
    assert!(!marker_on_wire(&bed, "client", server)?);
    Ok(())
}

/// Runs the `ambit-cni` binary as a container runtime would.
fn cni(
    command: &str,
    socket: &Path,
    namespaces_file: &Path,
    netns: &Path,
    namespace: &str,
    name: &str,
    ip: std::net::Ipv4Addr,
) -> anyhow::Result<(bool, String)> {
    let config = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "ambit-cni",
        "agentSocket": socket,
        "namespacesFile": namespaces_file,
        "prevResult": {
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": netns}],
            "ips": [{"address": format!("{ip}/32"), "interface": 0}],
        },
    });
    let mut child = Command::new(ambit_e2e::testbed::cni_binary()?)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", unique_name("sandbox"))
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env(
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name}"),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(config.to_string().as_bytes())?;
    let output = child.wait_with_output()?;
    Ok((
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    ))
}

#[test]
fn the_cni_plugin_enrolls_a_new_pod_before_it_starts_and_fails_closed() -> anyhow::Result<()> {
    let pods = [
        PodSpec::new("server", MESH_NS, 1),
        PodSpec::new("newcomer", MESH_NS, 0),
        PodSpec::new("bystander", PLAIN_NS, 0),
    ];
    let mut bed = Testbed::build(2, &pods, Vec::new())?;
    bed.enable_kubernetes_except(&["newcomer", "bystander"])?;
    bed.start_agents()?;
    let node = bed.nodes[0].name.clone();
    let socket = bed.dir.join(format!("{node}-cni.sock"));
    let namespaces_file = bed.dir.join(format!("{node}-mesh-namespaces"));
    let (newcomer_netns, newcomer_ip) = (bed.pod("newcomer").ns.path(), bed.pod("newcomer").ip);
    // The pod exists in the API server before its sandbox is set up, without an IP yet.
    kube(&bed).api.create(
        &ambit_e2e::apiserver::pod(MESH_NS, "newcomer")
            .uid(&ambit_e2e::kubebed::new_uid())
            .node(&node)
            .service_account("newcomer")
            .label("app", "newcomer")
            .phase("Pending")
            .build(),
    )?;
    let enrolled = || -> anyhow::Result<serde_json::Value> {
        let status: serde_json::Value = serde_json::from_str(&bed.agent(0).admin_get("/status")?)?;
        Ok(status["enrolled_pods"].clone())
    };
    assert_eq!(enrolled()?, 0, "no pod of node 0 is enrolled before ADD");
    let (ok, stdout) = cni(
        "ADD",
        &socket,
        &namespaces_file,
        &newcomer_netns,
        MESH_NS,
        "newcomer",
        newcomer_ip,
    )?;
    assert!(ok, "ADD succeeded: {stdout}");
    assert!(
        stdout.contains("\"ips\""),
        "prevResult passed through: {stdout}"
    );
    // Enrolled before ADD returned: the pod's netns is in ENROLLED already (the log line is
    // written by the agent's log thread, which may come later).
    assert_eq!(enrolled()?, 1, "the pod was enrolled before ADD returned");
    bed.agent(0)
        .wait_for_log(&["pod enrolled", "mesh/newcomer"], LOG_WAIT)?;
    let server = bed.pod("server").addr(APP_PORT);
    assert!(
        !marker_on_wire(&bed, "newcomer", server)?,
        "the new pod's first connection is already mTLS"
    );

    // With the agent down, an opted-in pod cannot start; another namespace's can.
    bed.kill_agent(0);
    let bystander = bed.pod("bystander");
    let (ok, stdout) = cni(
        "ADD",
        &socket,
        &namespaces_file,
        &newcomer_netns,
        MESH_NS,
        "newcomer",
        newcomer_ip,
    )?;
    assert!(
        !ok,
        "ADD must fail for an opted-in pod without an agent: {stdout}"
    );
    assert!(stdout.contains("\"code\""), "a CNI error: {stdout}");
    let (ok, stdout) = cni(
        "ADD",
        &socket,
        &namespaces_file,
        &bystander.ns.path(),
        PLAIN_NS,
        "bystander",
        bystander.ip,
    )?;
    assert!(
        ok,
        "a pod outside the mesh starts without an agent: {stdout}"
    );
    Ok(())
}
