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
