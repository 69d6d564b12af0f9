//! `cargo xtask demo`: attaches ambit's capture programs in throw-away namespaces and shows
//! what they do to real connections. Everything it creates is removed when it ends.

use ambit_e2e::capture_check::{CaptureBed, Outcome};

fn main() -> anyhow::Result<()> {
    if !ambit_e2e::is_root() {
        anyhow::bail!("the demo creates network namespaces and loads eBPF: run it as root");
    }
    let mut bed = CaptureBed::new()?;
    let peer = bed.peer();
    println!(
        "testbed: pod netns (cookie {}) wired to a peer at {peer}",
        bed.pod_cookie
    );
    println!(
        "programs: cgroup/connect4 + sock_ops attached at the cgroup v2 root, pins in {}",
        bed.pins.path().display()
    );

    let show = |step: &str, outcome: Outcome| match outcome {
        Outcome::Direct(reply) => println!("  {step:<44} -> reached the peer directly ({reply:?})"),
        Outcome::Captured(orig) => println!(
            "  {step:<44} -> captured by the agent listener on 127.0.0.1:15001, original destination {}",
            orig.map_or("unknown".into(), |a| a.to_string())
        ),
        Outcome::Refused => println!("  {step:<44} -> refused (fail closed)"),
    };

    show(
        "pod not enrolled: connect to peer",
        bed.connect_from_pod(peer, false)?,
    );
    bed.enroll()?;
    show(
        "pod enrolled: connect to peer",
        bed.connect_from_pod(peer, false)?,
    );
    show(
        "pod enrolled, agent-marked socket (0x539)",
        bed.connect_from_pod(peer, true)?,
    );
    bed.crash_agent();
    show(
        "agent killed: connect to peer",
        bed.connect_from_pod(peer, false)?,
    );
    bed.restart_agent()?;
    show(
        "agent restarted (pins reused): connect",
        bed.connect_from_pod(peer, false)?,
    );
    bed.unenroll()?;
    show(
        "pod unenrolled: connect to peer",
        bed.connect_from_pod(peer, false)?,
    );
    bed.uninstall()?;
    println!("uninstalled; namespaces and pins are removed on exit");
    Ok(())
}
