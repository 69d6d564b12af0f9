//! The testbed: network namespaces that play nodes and pods, built with iproute2, each with
//! a guard that removes it even when a test panics. Names are unique per process and call so
//! tests can run in parallel.
#![forbid(unsafe_code)]

pub mod apiserver;
pub mod bench;
pub mod ca;
pub mod capture_check;
pub mod faults;
pub mod inbound_check;
pub mod kubebed;
pub mod refusal;
pub mod sweep;
pub mod testbed;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context as _, bail};

/// A name no other test or process on this machine is using: `<prefix><pid>x<n>`, kept short
/// because interface names are limited to 15 bytes. The first name a process asks for
/// removes what test processes that were killed left behind ([`sweep`]).
pub fn unique_name(prefix: &str) -> String {
    sweep::once();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}x{n}", std::process::id() % 100_000)
}

/// Closes a listening socket for every holder of its fd, as a crashed process's exit does.
/// Dropping ours is not enough in a test process: a child that another test thread is
/// spawning holds copies of every fd between its fork and its exec, and a listener still
/// open there stays in the agent's sockhash, accepts, and keeps its port.
pub fn close_listener_everywhere(listener: std::net::TcpListener) {
    // shutdown() moves a listener to CLOSE (unhashed, out of any sockmap) whoever holds it.
    socket2::SockRef::from(&listener)
        .shutdown(std::net::Shutdown::Both)
        .expect("shut down a listening socket");
}

/// Runs `ip` with the given arguments; the error carries ip's stderr.
pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    ip_output(args).map(drop)
}

/// Runs `ip` with the given arguments and returns what it printed.
pub fn ip_output(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2); `cargo xtask setup` installs it")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A named network namespace under /run/netns, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace with a unique name and brings its loopback up.
    pub fn create(prefix: &str) -> anyhow::Result<Self> {
        let name = unique_name(prefix);
        ip(&["netns", "add", &name])?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Runs `ip -n <ns> …`.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// A handle the agent's code can enter.
    pub fn open(&self) -> anyhow::Result<ambit_agent::netns::NetNs> {
        Ok(ambit_agent::netns::NetNs::open(self.path())?)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("testbed cleanup: {e}");
        }
    }
}

/// Joins two namespaces with a veth pair and gives each end an address (`a.b.c.d/len`).
/// Returns the interface names (in `a`, in `b`).
pub fn wire(a: &Netns, a_addr: &str, b: &Netns, b_addr: &str) -> anyhow::Result<(String, String)> {
    let a_if = unique_name("va");
    let b_if = unique_name("vb");
    ip(&[
        "link",
        "add",
        &a_if,
        "netns",
        a.name(),
        "type",
        "veth",
        "peer",
        "name",
        &b_if,
        "netns",
        b.name(),
    ])?;
    for (ns, ifname, addr) in [(a, &a_if, a_addr), (b, &b_if, b_addr)] {
        ns.ip(&["addr", "add", addr, "dev", ifname])?;
        ns.ip(&["link", "set", ifname, "up"])?;
    }
    Ok((a_if, b_if))
}

/// A bpffs directory for one test's pins, removed on drop (removing link pins detaches the
/// programs once no fd holds them).
#[derive(Debug)]
pub struct PinDir {
    path: PathBuf,
}

impl PinDir {
    pub fn unique() -> Self {
        Self {
            path: Path::new("/sys/fs/bpf").join(unique_name("ambit-test-")),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Err(e) = ambit_agent::capture::remove_pins(&self.path) {
            eprintln!("testbed cleanup: {e}");
        }
    }
}

/// True when running as root (the privileged tests need CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}
