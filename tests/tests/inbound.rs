//! Privileged: the receiving side of capture. sk_lookup steers connections arriving at an
//! enrolled pod to the agent's in-pod listeners, fails closed while the agent is down, and
//! source preservation lets the app see the real client: its rule, route and sysctl are set
//! over netlink (also when /proc/sys is read-only) and undone when the pod leaves.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::time::Duration;

use ambit_common::HBONE_PORT;
use ambit_e2e::inbound_check::{
    APP_PORT, CLIENT_IP, InboundBed, POD_IP, ReplyRouting, accept_within,
};
use ambit_e2e::testbed::{APP_PORT as TESTBED_APP_PORT, MESH_NS, PodSpec, Testbed};
use anyhow::Context as _;

const WAIT: Duration = Duration::from_millis(500);
/// Long enough to be sure nothing arrives where nothing should.
const SHORT: Duration = Duration::from_millis(100);
const LOCAL_APP_PORT: u16 = 9001;
/// For the agent's log lines (enrollment of a few pods).
const WAIT_LOG: Duration = Duration::from_secs(10);

#[test]
fn plaintext_and_hbone_are_steered_with_original_addresses() -> anyhow::Result<()> {
    let mut bed = InboundBed::new()?;
    bed.start_agent()?;
    let app = bed.app_addr();

    let client = bed.connect_from_client(app)?;
    let agent = bed.agent.as_ref().context("agent listeners")?;
    let (accepted, peer) =
        accept_within(&agent.plaintext, WAIT)?.context("not steered to the 15006 listener")?;
    assert_eq!(
        accepted.local_addr()?,
        app,
        "getsockname: original destination"
    );
    assert_eq!(peer, client.local_addr()?, "getpeername: the real client");
    assert_eq!(peer.ip(), IpAddr::V4(CLIENT_IP));
    assert!(
        accept_within(&bed.app, SHORT)?.is_none(),
        "the app must not see a steered connection"
    );

    let hbone_dst = SocketAddr::from((POD_IP, HBONE_PORT));
    let client = bed.connect_from_client(hbone_dst)?;
    let (accepted, peer) =
        accept_within(&agent.hbone, WAIT)?.context("not steered to the HBONE listener")?;
    assert_eq!(accepted.local_addr()?, hbone_dst);
    assert_eq!(peer, client.local_addr()?);
    assert!(accept_within(&agent.plaintext, SHORT)?.is_none());
    Ok(())
}

#[test]
fn loopback_and_the_agents_own_connections_are_not_steered() -> anyhow::Result<()> {
    let mut bed = InboundBed::new()?;
    bed.start_agent()?;
    let local_app = bed.pod_ns.run(|| {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, LOCAL_APP_PORT))?;
        l.set_nonblocking(true)?;
        Ok(l)
    })?;
    let _client = bed.connect_in_pod(SocketAddr::from((Ipv4Addr::LOCALHOST, LOCAL_APP_PORT)))?;
    assert!(
        accept_within(&local_app, WAIT)?.is_some(),
        "a connection to 127.0.0.1 inside the pod reaches its listener"
    );

    // The agent (marked socket) forwarding to the app on pod-ip:9000.
    let upstream = bed.dial_app_as(None, bed.app_addr())?;
    let (_, seen_by_app) = accept_within(&bed.app, WAIT)?
        .context("the agent's own connection to the app was not delivered to the app")?;
    assert_eq!(seen_by_app, upstream.local_addr()?);

    let agent = bed.agent.as_ref().context("agent listeners")?;
    assert!(accept_within(&agent.plaintext, SHORT)?.is_none());
    Ok(())
}

#[test]
fn excluded_ports_are_not_steered() -> anyhow::Result<()> {
    let mut bed = InboundBed::with_excluded_ports(&[APP_PORT])?;
    bed.start_agent()?;
    let client = bed.connect_from_client(bed.app_addr())?;
    let (_, peer) = accept_within(&bed.app, WAIT)?.context("excluded port must reach the app")?;
    assert_eq!(peer, client.local_addr()?);
    let agent = bed.agent.as_ref().context("agent listeners")?;
    assert!(accept_within(&agent.plaintext, SHORT)?.is_none());
    Ok(())
}

#[test]
fn agent_down_fails_closed_restart_resumes_and_detach_restores_plain() -> anyhow::Result<()> {
    let mut bed = InboundBed::new()?;
    bed.start_agent()?;
    let app = bed.app_addr();

    bed.crash_agent();
    let link_pin = bed.link_pin("sk_lookup");
    assert!(link_pin.exists(), "the per-pod link stays pinned");
    match bed.connect_from_client(app) {
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}"),
        Ok(_) => panic!("agent down: a plaintext connection reached the enrolled pod"),
    }
    assert!(
        accept_within(&bed.app, SHORT)?.is_none(),
        "the app listening on pod-ip:9000 must not get it"
    );

    bed.restart_agent()?;
    let _client = bed.connect_from_client(app)?;
    let agent = bed.agent.as_ref().context("agent listeners")?;
    assert!(
        accept_within(&agent.plaintext, WAIT)?.is_some(),
        "a restarted agent reuses the pinned link and is steered to again"
    );

    // Another holder of the link's fd (an old agent mid-update, bpftool) must not keep the
    // pod captured after detach.
    let _held_link = ambit_agent::sys::bpf_obj_get(&link_pin)?;
    bed.detach_inbound()?;
    assert!(!link_pin.exists(), "detach removes the pod's pins");
    let _client = bed.connect_from_client(app)?;
    assert!(
        accept_within(&bed.app, WAIT)?.is_some(),
        "after detach the app is reached directly"
    );
    Ok(())
}

#[test]
fn uninstall_removes_per_pod_links() -> anyhow::Result<()> {
    let mut bed = InboundBed::new()?;
    bed.start_agent()?;
    bed.crash_agent();
    let link_pin = bed.link_pin("sk_lookup");
    // Still held elsewhere (a crashed agent's child, bpftool): uninstall detaches anyway.
    let _held_link = ambit_agent::sys::bpf_obj_get(&link_pin)?;
    ambit_agent::capture::remove_pins(bed.pins.path())?;
    assert!(!bed.pins.path().exists(), "pins removed");
    let _client = bed.connect_from_client(bed.app_addr())?;
    assert!(
        accept_within(&bed.app, WAIT)?.is_some(),
        "with the pins removed the pod is plain again"
    );
    Ok(())
}

#[test]
fn source_address_is_preserved_toward_the_app() -> anyhow::Result<()> {
    let mut bed = InboundBed::new()?;
    bed.start_agent()?;
    bed.preserve_source()?;
    bed.preserve_source()
        .context("preserve_source must be idempotent")?;
    let app = bed.app_addr();

    let mut client = bed.connect_from_client(app)?;
    let agent = bed.agent.as_ref().context("agent listeners")?;
    let (mut downstream, client_addr) =
        accept_within(&agent.plaintext, WAIT)?.context("not steered")?;
    let orig_dst = downstream.local_addr()?;

    let mut upstream = bed.dial_app_as(Some(client_addr.ip()), orig_dst)?;
    upstream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let (mut app_side, seen_by_app) =
        accept_within(&bed.app, WAIT)?.context("app got no connection")?;
    assert_eq!(
        seen_by_app.ip(),
        IpAddr::V4(CLIENT_IP),
        "the app sees the real client"
    );

    // client -> agent -> app
    client.write_all(b"ping")?;
    let mut buf = [0u8; 4];
    downstream.read_exact(&mut buf)?;
    upstream.write_all(&buf)?;
    app_side.read_exact(&mut buf)?;
    assert_eq!(&buf, b"ping");
    // app -> agent -> client: the reply routing through lo works
    app_side.write_all(b"pong")?;
    upstream.read_exact(&mut buf)?;
    downstream.write_all(&buf)?;
    client.read_exact(&mut buf)?;
    assert_eq!(&buf, b"pong");
    Ok(())
}

#[test]
fn source_preservation_routing_is_added_once_and_undone_on_detach() -> anyhow::Result<()> {
    let mut bed = InboundBed::new()?;
    let ns = bed.pod_netns().context("pod netns")?;
    let before = ReplyRouting::of(ns)?;
    assert_eq!(before.accept_local(), "0", "a fresh netns");
    assert!(before.rules.is_empty() && before.routes.is_empty());

    bed.start_agent()?;
    bed.preserve_source()?;
    // Again, as a restarted agent does: still one rule.
    bed.preserve_source()?;
    let ns = bed.pod_netns().context("pod netns")?;
    let during = ReplyRouting::of(ns)?;
    during.assert_set_up();
    let mut expected = before.lo_sysctls.clone();
    expected.insert("accept_local".into(), "1".into());
    assert_eq!(
        during.lo_sysctls, expected,
        "only accept_local changed among lo's IPv4 settings"
    );

    // Both tc programs are attached, and stay detached even though another holder (an old
    // agent mid-update, bpftool) keeps an fd of each link through the detach.
    let pod_if = bed.pod_if.clone();
    let mut held_links = Vec::new();
    for (ifname, pin) in [(pod_if.as_str(), "tc_egress"), ("lo", "tc_lo_egress")] {
        assert_eq!(
            bed.tcx_egress_programs(ifname)?.len(),
            1,
            "one tc program on {ifname}'s egress"
        );
        held_links.push(ambit_agent::sys::bpf_obj_get(&bed.link_pin(pin))?);
    }

    bed.detach_inbound()?;
    let after = ReplyRouting::of(bed.pod_netns().context("pod netns")?)?;
    assert_eq!(after, before, "rule, route and every lo setting as before");
    for ifname in [pod_if.as_str(), "lo"] {
        assert_eq!(
            bed.tcx_egress_programs(ifname)?,
            Vec::<u32>::new(),
            "no tc program left on {ifname}'s egress"
        );
    }
    drop(held_links);
    Ok(())
}

#[test]
fn detach_restores_an_accept_local_that_was_already_on() -> anyhow::Result<()> {
    let mut bed = InboundBed::new()?;
    let ns = bed.pod_netns().context("pod netns")?;
    ambit_e2e::testbed::sysctl(ns, "net/ipv4/conf/lo/accept_local", "1")?;
    bed.start_agent()?;
    bed.preserve_source()?;
    bed.detach_inbound()?;
    let after = ReplyRouting::of(bed.pod_netns().context("pod netns")?)?;
    assert_eq!(after.accept_local(), "1", "the pod's own setting is kept");
    assert!(after.rules.is_empty(), "{:?}", after.rules);
    assert!(after.routes.is_empty(), "{:?}", after.routes);
    Ok(())
}

#[test]
fn detach_of_a_pod_whose_netns_is_gone_succeeds() -> anyhow::Result<()> {
    let mut bed = InboundBed::new()?;
    bed.start_agent()?;
    bed.preserve_source()?;
    bed.delete_pod_netns();
    bed.detach_inbound()
        .context("a deleted pod's netns is not an error")?;
    let pod_dir = bed.pins.path().join(format!("pods/{}", bed.pod_cookie));
    assert!(!pod_dir.exists(), "its pins are removed all the same");
    Ok(())
}

/// One node, a client and a server pod in the mesh namespace.
fn one_node_mesh(read_only_proc_sys: bool) -> anyhow::Result<Testbed> {
    let pods = [
        PodSpec::new("client", MESH_NS, 0),
        PodSpec::new("server", MESH_NS, 0),
    ];
    let mut bed = Testbed::build(1, &pods, Vec::new())?;
    bed.agent_read_only_proc_sys = read_only_proc_sys;
    Ok(bed)
}

/// The server pod sees the client pod's address (source preservation works).
fn assert_server_sees_client(bed: &Testbed) -> anyhow::Result<()> {
    let client = bed.pod("client");
    let reply = client.request(bed.pod("server").addr(TESTBED_APP_PORT), b"who")?;
    let greeting = reply.lines().next().unwrap_or_default();
    assert!(
        greeting.starts_with("server ") && greeting.contains(&format!("peer={}:", client.ip)),
        "the app sees the client pod's address: {reply}"
    );
    assert!(reply.ends_with("who"), "payload echoed: {reply}");
    Ok(())
}

#[test]
fn agent_sets_up_pod_routing_and_removes_it_when_the_pod_leaves_the_mesh() -> anyhow::Result<()> {
    let mut bed = one_node_mesh(false)?;
    let before = ReplyRouting::of(&bed.pod("server").ns)?;
    assert_eq!(before.accept_local(), "0");
    bed.start_agents()?;
    for name in ["client", "server"] {
        bed.agent(0)
            .wait_for_log(&["pod enrolled", &format!("{MESH_NS}/{name}")], WAIT_LOG)?;
        let during = ReplyRouting::of(&bed.pod(name).ns)?;
        during.assert_set_up();
        let mut expected = before.lo_sysctls.clone();
        expected.insert("accept_local".into(), "1".into());
        assert_eq!(
            during.lo_sysctls, expected,
            "{name}: only accept_local changed"
        );
    }
    assert_server_sees_client(&bed)?;

    bed.mesh_enabled = false;
    bed.write_config()?;
    for name in ["client", "server"] {
        bed.agent(0)
            .wait_for_log(&["pod unenrolled", &format!("{MESH_NS}/{name}")], WAIT_LOG)?;
        let after = ReplyRouting::of(&bed.pod(name).ns)?;
        assert_eq!(
            after, before,
            "{name}: rule, route and lo settings as before"
        );
    }
    Ok(())
}

#[test]
fn agent_with_read_only_proc_sys_enrolls_pods_and_keeps_the_source_address() -> anyhow::Result<()> {
    let mut bed = one_node_mesh(true)?;
    bed.start_agents()?;
    let mountinfo = std::fs::read_to_string(format!("/proc/{}/mountinfo", bed.agent(0).pid()))?;
    let proc_sys = mountinfo
        .lines()
        .rfind(|l| l.split(' ').nth(4) == Some("/proc/sys"))
        .context("the agent's mount namespace has a /proc/sys mount")?;
    assert!(
        proc_sys
            .split(' ')
            .nth(5)
            .is_some_and(|opts| opts.split(',').any(|o| o == "ro")),
        "/proc/sys is read-only for the agent: {proc_sys}"
    );
    bed.agent(0).wait_for_log(&["ready enrolled=2"], WAIT_LOG)?;
    for name in ["client", "server"] {
        ReplyRouting::of(&bed.pod(name).ns)?.assert_set_up();
    }
    assert_server_sees_client(&bed)?;
    Ok(())
}

/// The pod's pinned links (sk_lookup and the tc programs) and the programs they run.
fn pod_link_programs(bed: &InboundBed) -> anyhow::Result<BTreeMap<PathBuf, u32>> {
    let pod_dir = bed.pins.path().join(format!("pods/{}", bed.pod_cookie));
    Ok(ambit_agent::capture::pinned_link_programs(bed.pins.path())?
        .into_iter()
        .filter(|l| l.pin.starts_with(&pod_dir))
        .map(|l| (l.pin, l.prog_id))
        .collect())
}

#[test]
fn restarted_agent_switches_the_pods_links_to_its_own_programs() -> anyhow::Result<()> {
    let mut bed = InboundBed::new()?;
    bed.start_agent()?;
    bed.preserve_source()?;
    let app = bed.app_addr();
    let before = pod_link_programs(&bed)?;
    assert_eq!(
        before.len(),
        3,
        "sk_lookup, tc on lo, tc on the interface: {before:?}"
    );

    bed.crash_agent();
    bed.restart_agent()?;
    bed.preserve_source()?;
    let capture = bed.capture()?;
    assert_eq!(
        capture.link_stats(),
        ambit_agent::capture::LinkStats {
            replaced: 5 + 3,
            failed: 0
        },
        "the five cgroup links and the pod's three"
    );
    let loaded: BTreeMap<String, u32> = capture.program_ids().into_iter().collect();
    let after = pod_link_programs(&bed)?;
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>()
    );
    for (pin, prog_id) in &after {
        assert_ne!(
            prog_id,
            &before[pin],
            "{} still runs the old program",
            pin.display()
        );
        let expected = match pin.file_name().and_then(|n| n.to_str()) {
            Some("tc_lo_egress") => ambit_common::programs::TC_AGENT_LO,
            Some("tc_egress") => ambit_common::programs::TC_REPLY_TO_LO,
            Some("sk_lookup") => ambit_common::programs::SK_LOOKUP,
            other => anyhow::bail!("unexpected pod link {other:?}"),
        };
        assert_eq!(*prog_id, loaded[expected], "{}", pin.display());
    }

    let _client = bed.connect_from_client(app)?;
    let agent = bed.agent.as_ref().context("agent listeners")?;
    assert!(
        accept_within(&agent.plaintext, WAIT)?.is_some(),
        "steered to the agent by the switched program"
    );
    assert!(
        accept_within(&bed.app, SHORT)?.is_none(),
        "the app must not get it in plaintext"
    );
    Ok(())
}

/// Listener entries are keyed by the pod's address. When a pod's address is taken over by
/// another sandbox before the first one is released (the same IP handed out again), the
/// first pod leaving must not remove the newcomer's entries: the newcomer's inbound would
/// then be dropped.
#[test]
fn a_pod_leaving_keeps_the_listeners_of_the_pod_that_took_its_address() -> anyhow::Result<()> {
    let mut bed = InboundBed::new()?;
    bed.start_agent()?;
    let app = bed.app_addr();
    // The newcomer: another netns registering the same address (with these listeners).
    let newcomer = ambit_e2e::Netns::create("inew")?;
    let newcomer_ns = newcomer.open()?;
    let newcomer_cookie = newcomer_ns.cookie()?;
    {
        let InboundBed { capture, agent, .. } = &mut bed;
        let capture = capture.as_mut().context("capture")?;
        let agent = agent.as_ref().context("agent listeners")?;
        capture.attach_inbound(
            &newcomer_ns,
            newcomer_cookie,
            &[POD_IP],
            &agent.hbone,
            &agent.plaintext,
        )?;
    }

    // The first pod leaves; steering its netns again without listeners of its own shows
    // what the address's entries are now.
    bed.detach_inbound()?;
    let cookie = bed.pod_cookie;
    let InboundBed {
        capture, pod_ns, ..
    } = &mut bed;
    capture
        .as_mut()
        .context("capture")?
        .hold_inbound_closed(pod_ns, cookie)?;
    let _client = bed.connect_from_client(app)?;
    let agent = bed.agent.as_ref().context("agent listeners")?;
    assert!(
        accept_within(&agent.plaintext, WAIT)?.is_some(),
        "the newcomer's listener entries went with the pod that left"
    );

    // The newcomer leaving removes them: the held-closed pod now refuses.
    bed.capture()?.detach_inbound(newcomer_cookie)?;
    match bed.connect_from_client(app) {
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}"),
        Ok(_) => panic!("a held-closed pod with no listeners let a connection through"),
    }
    assert!(accept_within(&bed.app, SHORT)?.is_none());
    bed.detach_inbound()?;
    Ok(())
}
