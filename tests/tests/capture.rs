//! Privileged: proves the build chain end to end — the agent's loader attaches ambit's own
//! eBPF programs and they change what a real connect() in a real netns does.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use ambit_agent::capture::{LinkStats, pinned_link_programs};
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
        capture.maps_recreated(),
        &[] as &[&str],
        "the same agent finds every pinned map as it creates them (the log ring's own size included)"
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

    // An fd of the connect4 link held elsewhere (an old agent, bpftool) must not keep
    // capture on after uninstall.
    let _held_link = ambit_agent::sys::bpf_obj_get(
        &bed.pins
            .path()
            .join("links")
            .join(ambit_common::programs::CONNECT4),
    )?;
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

/// The pinned link programs of `bed`, by pin.
fn link_programs(bed: &CaptureBed) -> anyhow::Result<BTreeMap<PathBuf, u32>> {
    Ok(pinned_link_programs(bed.pins.path())?
        .into_iter()
        .map(|l| (l.pin, l.prog_id))
        .collect())
}

#[test]
fn restarted_agent_switches_every_pinned_link_to_its_own_programs() -> anyhow::Result<()> {
    let mut bed = CaptureBed::new()?;
    let peer = bed.peer();
    bed.enroll()?;
    assert_eq!(
        bed.connect_from_pod(peer, false)?,
        Outcome::Captured(Some(peer))
    );
    let before = link_programs(&bed)?;
    assert_eq!(before.len(), 5, "the five cgroup links: {before:?}");

    // As a DaemonSet roll does: the old agent is gone, the new one starts over its pins.
    bed.crash_agent();
    bed.restart_agent()?;
    let capture = bed.capture.as_ref().expect("agent restarted");
    assert_eq!(
        capture.link_stats(),
        LinkStats {
            replaced: 5,
            failed: 0
        }
    );
    let loaded: BTreeSet<u32> = capture
        .program_ids()
        .into_iter()
        .map(|(_, id)| id)
        .collect();
    let after = link_programs(&bed)?;
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>(),
        "the same links, kept"
    );
    for (pin, prog_id) in &after {
        assert_ne!(
            prog_id,
            &before[pin],
            "{} still runs the old program",
            pin.display()
        );
        assert!(
            loaded.contains(prog_id),
            "{} runs program {prog_id}, not one the new agent loaded ({loaded:?})",
            pin.display()
        );
    }
    assert_eq!(
        bed.connect_from_pod(peer, false)?,
        Outcome::Captured(Some(peer)),
        "captured by the switched programs, original destination recovered"
    );
    Ok(())
}

/// Replaces the pin of map `name` in `bed` with a hash map of another definition (u64 keys,
/// u32 values, 16 entries), as an agent version with another layout would have left it.
fn pin_other_definition(bed: &CaptureBed, name: &str) -> anyhow::Result<PathBuf> {
    let pin = bed.pins.path().join("maps").join(name);
    std::fs::remove_file(&pin)?;
    let map: aya::maps::HashMap<aya::maps::MapData, u64, u32> = aya::maps::HashMap::create(16, 0)?;
    map.pin(&pin)?;
    Ok(pin)
}

#[test]
fn changed_enrollment_map_is_refused_and_pods_stay_closed() -> anyhow::Result<()> {
    let mut bed = CaptureBed::new()?;
    let peer = bed.peer();
    bed.enroll()?;
    bed.crash_agent();
    let links = link_programs(&bed)?;
    let pin = pin_other_definition(&bed, ambit_common::maps::ENROLLED)?;

    let err = bed
        .restart_agent()
        .expect_err("an ENROLLED of another definition must not be reused or recreated");
    assert_eq!(
        err.to_string(),
        format!(
            "pinned map ENROLLED at {} does not match this agent's definition (value size: \
             pinned 4, expected 8; max entries: pinned 16, expected 16384); it carries \
             enrollment across restarts, so it is not recreated: pods stay held by the earlier \
             programs. Migrate it, or run `ambit uninstall` (pods lose capture) and start again",
            pin.display()
        )
    );
    assert_eq!(
        link_programs(&bed)?,
        links,
        "the earlier programs are left in place"
    );
    assert_eq!(
        bed.connect_from_pod(peer, false)?,
        Outcome::Refused,
        "the enrolled pod stays closed: no plaintext to the peer"
    );
    Ok(())
}

#[test]
fn changed_connection_map_is_recreated_and_a_missing_map_created() -> anyhow::Result<()> {
    let mut bed = CaptureBed::new()?;
    let peer = bed.peer();
    bed.enroll()?;
    bed.crash_agent();
    let orig_dst = pin_other_definition(&bed, ambit_common::maps::ORIG_DST)?;
    // A map the earlier version did not have.
    let tcp_legs = bed
        .pins
        .path()
        .join("maps")
        .join(ambit_common::maps::TCP_LEGS);
    std::fs::remove_file(&tcp_legs)?;

    bed.restart_agent()?;
    let capture = bed.capture.as_ref().expect("agent restarted");
    assert_eq!(capture.maps_recreated(), [ambit_common::maps::ORIG_DST]);
    assert!(
        capture.enrolled().contains(&bed.pod_cookie),
        "enrollment kept"
    );
    let info = aya::maps::MapInfo::from_pin(&orig_dst)?;
    assert_eq!(
        (
            info.map_type()?,
            info.key_size(),
            info.value_size(),
            info.max_entries()
        ),
        (aya::maps::MapType::LruHash, 16, 24, 65_536),
        "ORIG_DST pinned again with this agent's definition"
    );
    assert!(tcp_legs.exists(), "the missing map was created and pinned");
    assert_eq!(
        bed.connect_from_pod(peer, false)?,
        Outcome::Captured(Some(peer)),
        "the switched programs and the agent meet in the new ORIG_DST"
    );
    Ok(())
}
