//! `cargo xtask demo`: the main job on the embedded default. Builds a two-node testbed in
//! network namespaces, starts one ambit agent per node in local mode, makes an allowed call
//! across nodes over mTLS, shows the identities both agents saw and what a capture on the
//! wire between the nodes sees, then tears everything down.

use std::time::{Duration, Instant};

use ambit_e2e::testbed::{APP_PORT, MESH_NS, PLAIN_NS, PodSpec, Testbed};
use ambit_e2e::unique_name;

fn main() -> anyhow::Result<()> {
    if !ambit_e2e::is_root() {
        anyhow::bail!(
            "the demo creates network namespaces and loads eBPF programs: run it as root"
        );
    }
    let started = Instant::now();
    let pods = [
        PodSpec::new("frontend", MESH_NS, 0),
        PodSpec::new("checkout", MESH_NS, 1),
        PodSpec::new("legacy", PLAIN_NS, 1),
    ];
    let mut bed = Testbed::build(2, &pods, Vec::new())?;
    println!(
        "== testbed: 2 nodes on a bridge, 3 pods (namespace `{MESH_NS}` opted in with ambit.dev/mesh=enabled)"
    );
    for pod in &bed.pods {
        let node = &bed.nodes[pod.spec.node].name;
        println!(
            "   {:<9} {:<15} on {node}  namespace {}",
            pod.spec.name,
            pod.ip.to_string(),
            pod.spec.namespace
        );
    }
    bed.start_agents()?;
    println!(
        "== agents running: `ambit run --node node1|node2 --config {}`",
        bed.config.display()
    );

    let frontend = bed.pod("frontend");
    let checkout = bed.pod("checkout");
    let marker = unique_name("card-number-4111-");
    println!("\n== frontend -> checkout:{APP_PORT} (across nodes), payload {marker:?}");
    let (reply, wire) = bed.capture_wire(0, || {
        frontend.request(checkout.addr(APP_PORT), marker.as_bytes())
    })?;
    println!("   reply: {:?}", reply.lines().next().unwrap_or_default());
    let wait = Duration::from_secs(5);
    let out = bed.agent(0).wait_for_log(
        &[
            "outbound connection closed",
            &format!("destination={}", checkout.identity()),
        ],
        wait,
    )?;
    let inb = bed.agent(1).wait_for_log(
        &[
            "inbound connection closed",
            &format!("source={}", frontend.identity()),
        ],
        wait,
    )?;
    println!("   node1 agent: {}", excerpt(&out));
    println!("   node2 agent: {}", excerpt(&inb));

    println!(
        "\n== what a capture on the wire between the nodes saw ({} packets, {} TLS payload bytes on 15008):",
        wire.summary.lines().count(),
        wire.hbone_bytes
    );
    for line in wire.summary.lines().take(6) {
        println!("   {line}");
    }
    let leaked = wire.contains(marker.as_bytes());
    let only_hbone = wire.summary.lines().all(|l| l.contains(".15008"));
    println!("   only port 15008 (HBONE): {only_hbone}; plaintext payload on the wire: {leaked}");

    let legacy = bed.pod("legacy");
    let plain_marker = unique_name("plain-");
    let (_, wire) = bed.capture_wire(0, || {
        frontend.request(legacy.addr(APP_PORT), plain_marker.as_bytes())
    })?;
    let seen = wire.contains(plain_marker.as_bytes());
    println!(
        "\n== frontend -> legacy (namespace not in the mesh): passthrough, payload visible on the wire: {seen}"
    );

    println!("\n== node1 agent state (log excerpt):");
    for line in bed
        .agent(0)
        .logs()
        .iter()
        .filter(|l| l.contains("pod enrolled") || l.contains("ready"))
    {
        println!("   {}", excerpt(line));
    }
    println!("\n== node2 agent metrics (excerpt of its /metrics):");
    let metrics = bed.agent(1).metrics()?;
    for line in metrics.lines().filter(|l| {
        l.starts_with("istio_tcp_connections_opened_total{")
            || l.starts_with("ambit_enrolled_pods ")
            || l.starts_with("ambit_authorization_decisions_total{")
    }) {
        println!("   {line}");
    }
    drop(bed);
    println!(
        "\n== torn down: namespaces, agents, pins and files removed ({:.1?} in all)",
        started.elapsed()
    );
    Ok(())
}

/// A log line from the message on, without timestamp and level.
fn excerpt(line: &str) -> &str {
    line.find(": ").map_or(line, |i| &line[i + 2..])
}
