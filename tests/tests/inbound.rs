//! Privileged: the receiving side of capture. sk_lookup steers connections arriving at an
//! enrolled pod to the agent's in-pod listeners, fails closed while the agent is down, and
//! source preservation lets the app see the real client.

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::time::Duration;

use ambit_common::HBONE_PORT;
use ambit_e2e::inbound_check::{APP_PORT, CLIENT_IP, InboundBed, POD_IP, accept_within};
use anyhow::Context as _;

const WAIT: Duration = Duration::from_millis(500);
/// Long enough to be sure nothing arrives where nothing should.
const SHORT: Duration = Duration::from_millis(100);
const LOCAL_APP_PORT: u16 = 9001;

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
    let link_pin = bed
        .pins
        .path()
        .join(format!("pods/{}/sk_lookup", bed.pod_cookie));
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
