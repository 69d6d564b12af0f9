//! Privileged: the two-node testbed with one agent per node in local mode. Pods talk over
//! HBONE with the right identities; the wire carries only TLS; the agent failing keeps
//! enrolled pods closed; config changes enroll and unenroll pods live.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ambit_e2e::testbed::{APP_PORT, MESH_NS, PLAIN_NS, PodSpec, Service, Testbed};
use ambit_e2e::unique_name;
use anyhow::Context as _;

const LOG_WAIT: Duration = Duration::from_secs(10);
const VIP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 96, 0, 10);

fn mesh() -> anyhow::Result<Testbed> {
    let pods = [
        PodSpec::new("client", MESH_NS, 0),
        PodSpec::new("server-a", MESH_NS, 0),
        PodSpec::new("server-b", MESH_NS, 1),
        PodSpec::new("plain-client", PLAIN_NS, 0),
        PodSpec::new("plain-server", PLAIN_NS, 1),
    ];
    let services = vec![Service {
        name: "echo",
        vip: VIP,
        port: 80,
        selector_app: "server-b",
    }];
    let mut bed = Testbed::build(2, &pods, services)?;
    bed.start_agents()?;
    Ok(bed)
}

/// The first line the pod app sends: `<name> peer=<peer> local=<local>`.
fn greeting(reply: &str) -> &str {
    reply.lines().next().unwrap_or_default()
}

#[test]
fn pods_reach_each_other_over_hbone_with_identities_on_both_ends() -> anyhow::Result<()> {
    let bed = mesh()?;
    let client = bed.pod("client");

    // Same node.
    let a = bed.pod("server-a");
    let reply = client.request(a.addr(APP_PORT), b"hello a")?;
    assert!(greeting(&reply).starts_with("server-a "), "{reply}");
    assert!(
        greeting(&reply).contains(&format!("peer={}:", client.ip)),
        "the app sees the real client address, not the agent's: {reply}"
    );
    assert!(reply.ends_with("hello a"), "payload echoed: {reply}");
    assert!(
        greeting(&reply).contains(&format!("local={}", a.addr(APP_PORT))),
        "the app sees the original destination: {reply}"
    );
    let src = client.identity();
    let dst_a = a.identity();
    bed.agent(0).wait_for_log(
        &[
            "inbound connection closed",
            &format!("source={src}"),
            &format!("destination={dst_a}"),
        ],
        LOG_WAIT,
    )?;
    bed.agent(0).wait_for_log(
        &[
            "outbound connection closed",
            &format!("destination={dst_a}"),
            "mutual_tls",
        ],
        LOG_WAIT,
    )?;

    // Across nodes: the receiving agent is node2's.
    let b = bed.pod("server-b");
    let reply = client.request(b.addr(APP_PORT), b"hello b")?;
    assert!(greeting(&reply).starts_with("server-b "), "{reply}");
    assert!(reply.ends_with("hello b"));
    let dst_b = b.identity();
    bed.agent(1).wait_for_log(
        &[
            "inbound connection closed",
            &format!("source={src}"),
            &format!("destination={dst_b}"),
        ],
        LOG_WAIT,
    )?;

    // Through the service VIP, which only node-local routing in the agent knows.
    let reply = client.request(SocketAddr::from((VIP, 80)), b"hello vip")?;
    assert!(
        greeting(&reply).starts_with("server-b "),
        "VIP served by its endpoint: {reply}"
    );
    assert!(
        greeting(&reply).contains(&format!("local={}", b.addr(APP_PORT))),
        "VIP:80 became endpoint:targetPort: {reply}"
    );
    Ok(())
}

#[test]
fn wire_between_nodes_carries_only_tls_and_plain_pods_stay_plain() -> anyhow::Result<()> {
    let bed = mesh()?;
    let marker = unique_name("AMBIT-SECRET-MARKER-");
    let b = bed.pod("server-b");
    let (reply, wire) = bed.capture_wire(0, || {
        bed.pod("client")
            .request(b.addr(APP_PORT), marker.as_bytes())
    })?;
    assert!(
        reply.ends_with(&marker),
        "the request itself worked: {reply}"
    );
    assert!(
        wire.hbone_bytes > marker.len() as u64,
        "the capture saw the TLS traffic: {} packets, {} bytes",
        wire.hbone_packets,
        wire.hbone_bytes
    );
    assert!(
        !wire.contains(marker.as_bytes()),
        "the plaintext marker must never be on the wire"
    );
    for line in wire.summary.lines() {
        assert!(
            line.contains(".15008"),
            "only HBONE crosses the wire, saw: {line}"
        );
    }

    // Pods outside the mesh are untouched: their bytes cross in the clear.
    let plain_marker = unique_name("AMBIT-PLAIN-MARKER-");
    let plain_server = bed.pod("plain-server");
    let (reply, wire) = bed.capture_wire(0, || {
        bed.pod("plain-client")
            .request(plain_server.addr(APP_PORT), plain_marker.as_bytes())
    })?;
    assert!(reply.ends_with(&plain_marker));
    assert!(
        wire.contains(plain_marker.as_bytes()),
        "a non-enrolled pod's traffic is not captured"
    );
    Ok(())
}

#[test]
fn killed_agent_fails_closed_and_restart_restores_traffic() -> anyhow::Result<()> {
    let mut bed = mesh()?;
    let b_addr = bed.pod("server-b").addr(APP_PORT);
    bed.pod("client").request(b_addr, b"warm up")?;

    bed.kill_agent(0);
    let marker = unique_name("AMBIT-DOWN-MARKER-");
    // With the agent down no TLS crosses either: a plain pod's request in the same window
    // shows the capture was recording payloads.
    let control = unique_name("AMBIT-CONTROL-");
    let plain_addr = bed.pod("plain-server").addr(APP_PORT);
    let (result, wire) = bed.capture_wire(0, || {
        let result = bed.pod("client").request(b_addr, marker.as_bytes());
        bed.pod("plain-client")
            .request(plain_addr, control.as_bytes())?;
        Ok(result)
    })?;
    assert!(
        result.is_err(),
        "with its agent dead an enrolled pod cannot connect: {result:?}"
    );
    assert!(
        wire.contains(control.as_bytes()),
        "the capture was recording payloads"
    );
    assert!(
        !wire.contains(marker.as_bytes()),
        "nothing leaks in plaintext while the agent is down"
    );

    // Restarted with one worker thread (the others keep the default, 2 on a machine with
    // two CPUs or more): the whole data path must work on one.
    bed.agent_args = vec!["--worker-threads".into(), "1".into()];
    bed.start_agent(0)?;
    let reply = bed.pod("client").request(b_addr, b"back")?;
    assert!(
        reply.ends_with("back"),
        "traffic works again without touching the pod: {reply}"
    );
    let json = |i: usize, path: &str| -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_str(&bed.agent(i).admin_get(path)?)?)
    };
    let workers = |i: usize| -> anyhow::Result<u64> {
        let status = json(i, "/status")?;
        status["worker_threads"]
            .as_u64()
            .ok_or_else(|| anyhow::anyhow!("no worker_threads in /status: {status}"))
    };
    assert_eq!(
        workers(0)?,
        1,
        "the agent runs the data-path threads asked for"
    );
    let default = json(1, "/config_dump")?["config"]["workerThreads"].as_u64();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    assert_eq!(default, Some(cpus.min(2)), "default: 2, or 1 with one CPU");
    assert_eq!(
        Some(workers(1)?),
        default,
        "the agent runs the default number of data-path threads"
    );
    Ok(())
}

#[test]
fn namespace_label_change_unenrolls_and_reenrolls_pods_live() -> anyhow::Result<()> {
    let mut bed = mesh()?;
    let b_addr = bed.pod("server-b").addr(APP_PORT);

    bed.mesh_enabled = false;
    bed.write_config()?;
    bed.agent(0)
        .wait_for_log(&["pod unenrolled", "mesh/client"], LOG_WAIT)?;
    bed.agent(1)
        .wait_for_log(&["pod unenrolled", "mesh/server-b"], LOG_WAIT)?;
    let marker = unique_name("AMBIT-UNENROLLED-");
    let (reply, wire) =
        bed.capture_wire(0, || bed.pod("client").request(b_addr, marker.as_bytes()))?;
    assert!(
        reply.ends_with(&marker),
        "plain networking works after unenrollment: {reply}"
    );
    assert!(wire.contains(marker.as_bytes()), "and it is plain");

    bed.mesh_enabled = true;
    bed.write_config()?;
    // Enrolled at start and again now that the label is back.
    bed.agent(0)
        .wait_for_logs(&["pod enrolled", "mesh/client"], 2, LOG_WAIT)?;
    bed.agent(1)
        .wait_for_logs(&["pod enrolled", "mesh/server-b"], 2, LOG_WAIT)?;
    let marker = unique_name("AMBIT-REENROLLED-");
    let (reply, wire) =
        bed.capture_wire(0, || bed.pod("client").request(b_addr, marker.as_bytes()))?;
    assert!(reply.ends_with(&marker));
    assert!(
        wire.hbone_bytes > marker.len() as u64,
        "the capture saw the TLS traffic: {} packets, {} bytes",
        wire.hbone_packets,
        wire.hbone_bytes
    );
    assert!(!wire.contains(marker.as_bytes()), "encrypted again");
    Ok(())
}

/// The serial of the certificate agent `agent` holds for `identity`, if it holds one.
fn certificate_serial(
    bed: &Testbed,
    agent: usize,
    identity: &str,
) -> anyhow::Result<Option<String>> {
    let certs: serde_json::Value = serde_json::from_str(&bed.agent(agent).admin_get("/certs")?)?;
    Ok(certs["certificates"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["identity"] == identity)
        .and_then(|c| c["serial"].as_str())
        .map(str::to_owned))
}

/// Two pods of one service account on a node share its certificate. One of them leaving
/// the mesh must not take the certificate from the other: its next connection would wait
/// for a new one from the CA.
#[test]
fn a_pod_leaving_keeps_the_certificate_its_service_account_shares() -> anyhow::Result<()> {
    let pods = [
        PodSpec::new("client", MESH_NS, 0),
        PodSpec::new("client-2", MESH_NS, 0).with_service_account("client"),
        PodSpec::new("server", MESH_NS, 1),
    ];
    let mut bed = Testbed::build(2, &pods, Vec::new())?;
    bed.start_agents()?;
    let server = bed.pod("server").addr(APP_PORT);
    let identity = bed.pod("client").identity();
    assert_eq!(bed.pod("client-2").identity(), identity);
    let reply = bed.pod("client-2").request(server, b"first")?;
    assert!(reply.ends_with("first"), "{reply}");
    let serial = certificate_serial(&bed, 0, &identity)?
        .context("no certificate for the service account after a connection")?;

    let leaving = bed
        .pods
        .iter_mut()
        .find(|p| p.spec.name == "client-2")
        .context("client-2")?;
    leaving.spec.labels.push(("ambit.dev/mesh", "disabled"));
    bed.write_config()?;
    bed.agent(0)
        .wait_for_log(&["pod unenrolled", "mesh/client-2"], LOG_WAIT)?;
    let reply = bed.pod("client").request(server, b"second")?;
    assert!(reply.ends_with("second"), "{reply}");
    assert_eq!(
        certificate_serial(&bed, 0, &identity)?,
        Some(serial),
        "the remaining pod's certificate was forgotten and issued again"
    );
    let client_left = bed.agent(0).logs().iter().any(|l| {
        l.contains("pod unenrolled") && l.split_whitespace().any(|w| w == "pod=mesh/client")
    });
    assert!(
        !client_left,
        "the other pod of the service account was unenrolled too"
    );
    Ok(())
}

#[test]
fn pod_dropped_from_the_mesh_while_its_agent_was_down_is_released_on_restart() -> anyhow::Result<()>
{
    let mut bed = mesh()?;
    let b_addr = bed.pod("server-b").addr(APP_PORT);
    bed.kill_agent(1);
    let b = bed
        .pods
        .iter_mut()
        .find(|p| p.spec.name == "server-b")
        .expect("server-b");
    b.spec.labels.push(("ambit.dev/mesh", "disabled"));
    bed.write_config()?;
    assert!(
        bed.pod("plain-client")
            .request(b_addr, b"while down")
            .is_err(),
        "still closed while no agent runs"
    );
    bed.start_agent(1)?;
    bed.agent(1)
        .wait_for_log(&["releasing a pod no longer in the mesh"], LOG_WAIT)?;
    let reply = bed.pod("plain-client").request(b_addr, b"plain again")?;
    assert!(
        reply.ends_with("plain again"),
        "the opted-out pod has plain networking: {reply}"
    );
    Ok(())
}

#[test]
fn ebpf_program_messages_reach_the_agent_log_with_their_level() -> anyhow::Result<()> {
    let pods = [
        PodSpec::new("client", MESH_NS, 0),
        PodSpec::new("server-b", MESH_NS, 1),
    ];
    let mut bed = Testbed::build(2, &pods, Vec::new())?;
    bed.agent_args = vec!["--ebpf-log-level".into(), "debug".into()];
    bed.start_agents()?;
    // The agent's own filter must let debug through too.
    bed.agent(0).admin_post("/logging?level=debug")?;
    let b = bed.pod("server-b");
    bed.pod("client").request(b.addr(APP_PORT), b"logged")?;
    let line = bed.agent(0).wait_for_log(
        &[
            "DEBUG",
            "redirected to the agent",
            &format!("{}:{APP_PORT}", b.ip),
        ],
        LOG_WAIT,
    )?;
    assert!(line.contains("capture: connect from netns"), "{line}");
    Ok(())
}

/// The links pinned under node `i`'s pin dir and the programs they run.
fn link_programs(bed: &Testbed, i: usize) -> anyhow::Result<BTreeMap<PathBuf, u32>> {
    Ok(
        ambit_agent::capture::pinned_link_programs(bed.nodes[i].pins.path())?
            .into_iter()
            .map(|l| (l.pin, l.prog_id))
            .collect(),
    )
}

#[test]
fn upgraded_agent_switches_every_pinned_link_and_pods_stay_in_the_mesh() -> anyhow::Result<()> {
    let mut bed = mesh()?;
    let b_addr = bed.pod("server-b").addr(APP_PORT);
    let before_marker = unique_name("AMBIT-BEFORE-UPGRADE-");
    let (reply, wire) = bed.capture_wire(0, || {
        bed.pod("client").request(b_addr, before_marker.as_bytes())
    })?;
    assert!(reply.ends_with(&before_marker), "{reply}");
    assert!(wire.hbone_bytes > before_marker.len() as u64);
    assert!(!wire.contains(before_marker.as_bytes()));

    let before = link_programs(&bed, 0)?;
    let pod_links = before
        .keys()
        .filter(|p| p.to_string_lossy().contains("/pods/"))
        .count();
    assert!(
        before.len() >= 5 && pod_links >= 2,
        "cgroup links and the enrolled pods' links: {before:?}"
    );

    // A DaemonSet roll: the old agent goes, the new one starts over its pins.
    bed.kill_agent(0);
    bed.start_agent(0)?;
    bed.agent(0)
        .wait_for_logs(&["pinned link switched"], before.len(), LOG_WAIT)?;
    let after = link_programs(&bed, 0)?;
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>(),
        "the same links, kept (never detached)"
    );
    let logs = bed.agent(0).logs();
    for (pin, prog_id) in &after {
        let old = before[pin];
        assert_ne!(
            *prog_id,
            old,
            "{} still runs the old program",
            pin.display()
        );
        // The new agent reports the swap of exactly this link to exactly this program.
        assert!(
            logs.iter().any(|l| l.contains("pinned link switched")
                && l.contains(&format!("pin={} ", pin.display()))
                && l.contains(&format!("old_prog_id={old} "))
                && l.contains(&format!("new_prog_id={prog_id}"))),
            "no switch {old} -> {prog_id} of {} in the new agent's log",
            pin.display()
        );
    }
    assert!(
        !logs
            .iter()
            .any(|l| l.contains("keeps the earlier agent's program")),
        "no failed switch"
    );
    let metrics = bed.agent(0).metrics()?;
    for line in [
        format!("ambit_ebpf_links_replaced_total {}", after.len()),
        "ambit_ebpf_link_replace_failures_total 0".to_owned(),
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} in the new agent's metrics:\n{metrics}"
        );
    }

    let after_marker = unique_name("AMBIT-AFTER-UPGRADE-");
    let (reply, wire) = bed.capture_wire(0, || {
        bed.pod("client").request(b_addr, after_marker.as_bytes())
    })?;
    assert!(
        reply.ends_with(&after_marker),
        "the mesh works after the switch: {reply}"
    );
    assert!(
        wire.hbone_bytes > after_marker.len() as u64,
        "the capture saw the TLS traffic: {} bytes",
        wire.hbone_bytes
    );
    assert!(
        !wire.contains(after_marker.as_bytes()),
        "still encrypted: no plaintext escape after the switch"
    );
    Ok(())
}
