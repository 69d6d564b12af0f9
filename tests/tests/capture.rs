//! Privileged: proves the build chain end to end — the agent's loader attaches ambit's own
//! eBPF programs and they change what a real connect() in a real netns does.

use ambit_e2e::capture_check::{CaptureBed, Outcome, PEER_GREETING};

fn direct() -> Outcome {
    Outcome::Direct(PEER_GREETING.to_string())
}

#[test]
fn enrolled_pod_connect_is_redirected_with_original_destination() -> anyhow::Result<()> {
    let mut bed = CaptureBed::new()?;
    let peer = bed.peer();

    assert_eq!(
        bed.connect_from_pod(peer, false)?,
        direct(),
        "not enrolled yet"
    );

    bed.enroll()?;
    assert_eq!(
        bed.connect_from_pod(peer, false)?,
        Outcome::Captured(Some(peer))
    );
    assert_eq!(
        bed.connect_from_pod(peer, true)?,
        direct(),
        "the agent's own marked sockets must bypass capture"
    );

    bed.unenroll()?;
    assert_eq!(
        bed.connect_from_pod(peer, false)?,
        direct(),
        "unenrolled pod is plain again"
    );
    Ok(())
}

#[test]
fn agent_down_fails_closed_and_restart_reuses_pins() -> anyhow::Result<()> {
    let mut bed = CaptureBed::new()?;
    let peer = bed.peer();
    bed.enroll()?;

    bed.crash_agent();
    assert_eq!(
        bed.connect_from_pod(peer, false)?,
        Outcome::Refused,
        "with the agent gone, an enrolled pod must not reach the peer in plaintext"
    );

    bed.restart_agent()?;
    let cookie = bed.pod_cookie;
    let capture = bed.capture.as_ref().expect("agent restarted");
    assert!(
        capture.enrolled().contains(&cookie),
        "enrollment survives in the pinned map"
    );
    assert_eq!(
        bed.connect_from_pod(peer, false)?,
        Outcome::Captured(Some(peer))
    );
    Ok(())
}

#[test]
fn uninstall_detaches_programs_and_removes_pins() -> anyhow::Result<()> {
    let mut bed = CaptureBed::new()?;
    let peer = bed.peer();
    bed.enroll()?;
    assert_eq!(
        bed.connect_from_pod(peer, false)?,
        Outcome::Captured(Some(peer))
    );

    bed.uninstall()?;
    assert!(!bed.pins.path().exists(), "pins removed");
    assert_eq!(
        bed.connect_from_pod(peer, false)?,
        direct(),
        "after uninstall the still-listed pod is no longer captured"
    );
    Ok(())
}

#[test]
fn captured_socket_getpeername_reports_original_destination() -> anyhow::Result<()> {
    let mut bed = CaptureBed::new()?;
    let peer = bed.peer();
    bed.enroll()?;
    assert_eq!(
        bed.peer_name_seen_by_pod_app(peer)?,
        peer,
        "the app must see its original peer, not the agent's 127.0.0.1:15001"
    );
    Ok(())
}

#[test]
fn dual_stack_sockets_are_captured_and_native_ipv6_is_refused() -> anyhow::Result<()> {
    let mut bed = CaptureBed::new()?;
    let peer = bed.peer();
    let std::net::IpAddr::V4(peer_v4) = peer.ip() else {
        anyhow::bail!("the capture bed's peer is IPv4");
    };
    let mapped = std::net::SocketAddr::from((peer_v4.to_ipv6_mapped(), peer.port()));
    let native =
        std::net::SocketAddr::from(("fd00::2".parse::<std::net::Ipv6Addr>()?, peer.port()));
    assert_eq!(
        bed.connect_from_pod(mapped, false)?,
        direct(),
        "not enrolled: an IPv4-mapped connect reaches the peer"
    );
    assert!(
        !matches!(bed.connect_from_pod(native, false), Ok(Outcome::Denied)),
        "not enrolled: native IPv6 is not refused by ambit (it fails on routing alone)"
    );

    bed.enroll()?;
    assert_eq!(
        bed.connect_from_pod(mapped, false)?,
        Outcome::Captured(Some(peer)),
        "an AF_INET6 socket to ::ffff:<peer> must not slip past the capture"
    );
    assert_eq!(
        bed.connect_from_pod(native, false)?,
        Outcome::Denied,
        "native IPv6 from an enrolled pod is refused (the mesh carries IPv4 only)"
    );
    assert_eq!(
        bed.connect_from_pod(mapped, true)?,
        direct(),
        "the agent's own marked sockets still bypass capture"
    );
    Ok(())
}
