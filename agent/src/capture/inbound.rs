//! The receiving side of capture, per enrolled pod:
//!
//! - [`Capture::attach_inbound`]: an sk_lookup program attached to the pod's netns steers
//!   TCP connections that arrive on a real interface to the agent's in-pod listeners
//!   (15008 → HBONE, anything else → plaintext 15006), which sit in the INBOUND_LISTENERS
//!   sockhash under (netns cookie, slot). A tc program on the pod's lo keeps the agent's own
//!   (marked) connections to the app from being steered back to the agent.
//! - [`Capture::preserve_source`]: the in-pod plumbing that lets the agent's upstream socket
//!   to the app carry the original client's address (tc egress program, policy route,
//!   sysctl).
//!
//! Design: sk_lookup programs cannot call `bpf_get_netns_cookie`, so one shared program
//! cannot tell pods apart. Each pod gets its own loaded instance of the same program with
//! the pod's cookie baked in as a global (`POD_NETNS_COOKIE`), all instances sharing the
//! one pinned sockhash. A sockhash keyed by (cookie, slot) is simpler than a map of
//! per-pod sockmaps: one map to pin, one place to look when debugging, and the kernel
//! drops entries of closed sockets by itself.
//!
//! The per-pod links are pinned under `<pin_dir>/pods/<netns-cookie>/` so that they survive
//! an agent restart. While the agent is down its listeners are closed, the kernel removes
//! them from the sockhash, and the program refuses connections instead of passing them to
//! the app in plaintext (fail closed). A pod whose enrollment failed is kept the same way
//! until a retry enrolls it ([`Capture::hold_inbound_closed`]: steering, no listeners).

use std::net::TcpListener;
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use ambit_common::{ListenerKey, REPLY_MARK, SLOT_HBONE, SLOT_PLAINTEXT, globals, maps, programs};
use aya::maps::MapError;
use aya::programs::links::FdLink;
use aya::programs::tc::{self, TcAttachType};
use aya::programs::{SchedClassifier, SkLookup};
use tracing::{debug, info};

use super::{
    Capture, CaptureError, EBPF_OBJECT, Result, detach_links_in, pinned_loader, program,
    reuse_or_attach,
};
use crate::netns::NetNs;

/// Directory under the pin dir that holds one directory of links per pod netns cookie.
pub(super) const PODS_DIR: &str = "pods";
const SK_LOOKUP_PIN: &str = "sk_lookup";
const TC_LO_PIN: &str = "tc_lo_egress";
const TC_EGRESS_PIN: &str = "tc_egress";
/// Policy routing table that delivers marked replies locally (see [`Capture::preserve_source`]).
const LOCAL_REPLY_TABLE: &str = "133";

impl Capture {
    fn pod_dir(&self, netns_cookie: u64) -> PathBuf {
        self.pin_dir.join(PODS_DIR).join(netns_cookie.to_string())
    }

    /// Steers inbound TCP of the pod (netns `pod`, cookie `netns_cookie`) to the agent's
    /// listeners, which the caller opened inside that netns. Reuses a pinned link left by an
    /// earlier run; replaces listeners registered before (e.g. by a crashed agent).
    pub fn attach_inbound(
        &mut self,
        pod: &NetNs,
        netns_cookie: u64,
        hbone: &TcpListener,
        plaintext: &TcpListener,
    ) -> Result<()> {
        let pod_dir = self.pod_dir(netns_cookie);
        create_dir(&pod_dir)?;
        let maps_dir = self.pin_dir.join("maps");
        let log_level = self.ebpf_log_level;
        // Order: everything sk_lookup relies on first, so that a failure part-way never
        // leaves the pod steered into a loop, and steering starts with listeners in place.
        // 1. The agent's own (marked) connections to the app must not be steered back to
        //    the agent: re-inject them at lo ingress (see `ambit_tc_agent_lo`).
        let pin = pod_dir.join(TC_LO_PIN);
        let lo_maps_dir = maps_dir.clone();
        run_in_pod(pod, move || {
            accept_local_on_lo()?;
            attach_tc_egress(&lo_maps_dir, &pin, "lo", programs::TC_AGENT_LO, log_level)
        })?;
        for (slot, listener) in [(SLOT_PLAINTEXT, plaintext), (SLOT_HBONE, hbone)] {
            let key = ListenerKey {
                netns_cookie,
                slot,
                reserved: 0,
            };
            self.listeners
                .insert(key, listener.as_fd(), 0)
                .map_err(|source| CaptureError::Map {
                    name: maps::INBOUND_LISTENERS,
                    source,
                })?;
        }
        // 2. Listeners registered; 3. steering starts here.
        self.attach_sk_lookup(pod, netns_cookie)?;
        info!(netns_cookie, netns = %pod.path().display(), "inbound capture attached");
        Ok(())
    }

    /// Keeps a pod whose enrollment failed refusing inbound connections until it is
    /// enrolled (fail closed): its sk_lookup program is attached (or kept) with no listener
    /// registered under its cookie, so the program drops every TCP connection arriving on
    /// the pod's interfaces (the client gets a reset) instead of letting it reach the app
    /// in plaintext. A later [`Capture::attach_inbound`] registers listeners and reuses the
    /// link; [`Capture::detach_inbound`] undoes it.
    pub fn hold_inbound_closed(&mut self, pod: &NetNs, netns_cookie: u64) -> Result<()> {
        create_dir(&self.pod_dir(netns_cookie))?;
        self.remove_listeners(netns_cookie)?;
        self.attach_sk_lookup(pod, netns_cookie)?;
        info!(netns_cookie, netns = %pod.path().display(), "inbound held closed");
        Ok(())
    }

    /// The pod's sk_lookup instance (its cookie baked in), pinned in the pod's directory;
    /// a link pinned there already is kept.
    fn attach_sk_lookup(&self, pod: &NetNs, netns_cookie: u64) -> Result<()> {
        let maps_dir = self.pin_dir.join("maps");
        let log_level = self.ebpf_log_level;
        reuse_or_attach(&self.pod_dir(netns_cookie).join(SK_LOOKUP_PIN), || {
            let name = programs::SK_LOOKUP;
            let mut ebpf = pinned_loader(&maps_dir, &log_level)
                .override_global(globals::POD_NETNS_COOKIE, &netns_cookie, true)
                .load(EBPF_OBJECT)?;
            let prog: &mut SkLookup = program(&mut ebpf, name)?;
            let err = |source| CaptureError::Program { name, source };
            prog.load().map_err(err)?;
            let id = prog.attach(pod).map_err(err)?;
            // The pinned link keeps the program (and its cookie global) alive once `ebpf`
            // is dropped.
            Ok(FdLink::from(prog.take_link(id).map_err(err)?))
        })?;
        Ok(())
    }

    /// Removes the pod's entries from the listener sockhash (absent ones are fine).
    fn remove_listeners(&mut self, netns_cookie: u64) -> Result<()> {
        for slot in [SLOT_PLAINTEXT, SLOT_HBONE] {
            let key = ListenerKey {
                netns_cookie,
                slot,
                reserved: 0,
            };
            match self.listeners.remove(&key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                // aya reports an absent key on delete as the syscall's ENOENT.
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(source) => {
                    return Err(CaptureError::Map {
                        name: maps::INBOUND_LISTENERS,
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    /// Netns cookies of the pods whose inbound steering is pinned (possibly by an earlier run).
    pub fn inbound_pods(&self) -> Vec<u64> {
        std::fs::read_dir(self.pin_dir.join(PODS_DIR))
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Stops steering the pod's inbound connections: detaches its per-pod links (sk_lookup,
    /// the tc program on lo and the one of [`Capture::preserve_source`]), removes their pins
    /// and the pod's listener entries. Plain networking is back once this returns. Absent state is
    /// not an error.
    pub fn detach_inbound(&mut self, netns_cookie: u64) -> Result<()> {
        let pod_dir = self.pod_dir(netns_cookie);
        detach_links_in(&pod_dir)?;
        self.remove_listeners(netns_cookie)?;
        match std::fs::remove_dir_all(&pod_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(CaptureError::Unpin {
                    path: pod_dir,
                    source,
                });
            }
        }
        debug!(netns_cookie, "inbound capture detached");
        Ok(())
    }

    /// Makes source-address preservation toward the app work in this pod (idempotent).
    ///
    /// The agent's upstream socket to the app is opened in the pod with IP_TRANSPARENT and
    /// SO_MARK [`AGENT_MARK`] and bound to the original client's address; the app's replies
    /// are addressed to that client and would leave through `ifname`. Inside the pod:
    /// - a tc egress program on `ifname` sends packets that belong to such a local socket
    ///   back in through lo (marked);
    /// - `ip rule fwmark 0x53a` ([`REPLY_MARK`], set by that program) `lookup 133` +
    ///   `local 0.0.0.0/0 dev lo table 133` deliver them
    ///   locally;
    /// - `net.ipv4.conf.lo.accept_local=1` accepts their local source address on lo.
    pub fn preserve_source(&mut self, pod: &NetNs, ifname: &str) -> Result<()> {
        let netns_cookie = pod.cookie().map_err(|source| CaptureError::PodNetns {
            path: pod.path().to_path_buf(),
            source,
        })?;
        let pod_dir = self.pod_dir(netns_cookie);
        create_dir(&pod_dir)?;
        let maps_dir = self.pin_dir.join("maps");
        let log_level = self.ebpf_log_level;
        let pin = pod_dir.join(TC_EGRESS_PIN);
        let ifname_owned = ifname.to_string();
        run_in_pod(pod, move || {
            accept_local_on_lo()?;
            attach_tc_egress(
                &maps_dir,
                &pin,
                &ifname_owned,
                programs::TC_REPLY_TO_LO,
                log_level,
            )
        })?;

        // No rtnetlink crate is in the workspace yet, so rules and routes go through
        // iproute2 (installed by `cargo xtask setup`) under nsenter. `ip netns exec` would
        // not do: it remounts /sys and hides the bpffs pins from what it runs (not needed by
        // ip, but nsenter also takes /proc/<pid>/ns/net paths).
        let mark = format!("{REPLY_MARK:#x}");
        run_in_netns(
            pod.path(),
            &["rule", "add", "fwmark", &mark, "lookup", LOCAL_REPLY_TABLE],
            true,
        )?;
        run_in_netns(
            pod.path(),
            &[
                "route",
                "replace",
                "local",
                "0.0.0.0/0",
                "dev",
                "lo",
                "table",
                LOCAL_REPLY_TABLE,
            ],
            false,
        )?;
        info!(netns_cookie, ifname, "source preservation set up");
        Ok(())
    }
}

/// Runs `f` on a thread inside the pod's netns.
fn run_in_pod(pod: &NetNs, f: impl FnOnce() -> Result<()> + Send + 'static) -> Result<()> {
    pod.run(move || Ok(f()))
        .map_err(|source| CaptureError::PodNetns {
            path: pod.path().to_path_buf(),
            source,
        })?
}

/// Packets re-injected at lo ingress carry a local source address (the pod's own, or the
/// client's through the local policy route); without `accept_local` lo drops them silently.
/// Must run inside the pod netns: /proc/sys/net follows the netns of the calling thread.
fn accept_local_on_lo() -> Result<()> {
    let sysctl = Path::new("/proc/sys/net/ipv4/conf/lo/accept_local");
    std::fs::write(sysctl, "1").map_err(|source| CaptureError::PodNetns {
        path: sysctl.to_path_buf(),
        source,
    })
}

/// Attaches tc egress program `name` to `ifname` of the calling thread's netns and pins the
/// link at `pin`, or keeps the link already pinned there.
fn attach_tc_egress(
    maps_dir: &Path,
    pin: &Path,
    ifname: &str,
    name: &'static str,
    log_level: u8,
) -> Result<()> {
    reuse_or_attach(pin, || {
        // The clsact qdisc is what legacy (netlink) tc attachment needs; with TCX links
        // (kernel >= 6.6, what aya uses here) it is harmless. EEXIST: already there.
        if let Err(e) = tc::qdisc_add_clsact(ifname) {
            let exists = matches!(&e, tc::TcError::NetlinkError(n) if n.raw_os_error() == Some(libc::EEXIST));
            if !exists {
                return Err(CaptureError::Program {
                    name,
                    source: e.into(),
                });
            }
        }
        let mut ebpf = pinned_loader(maps_dir, &log_level).load(EBPF_OBJECT)?;
        let prog: &mut SchedClassifier = program(&mut ebpf, name)?;
        let err = |source| CaptureError::Program { name, source };
        prog.load().map_err(err)?;
        let id = prog.attach(ifname, TcAttachType::Egress).map_err(err)?;
        let link = prog.take_link(id).map_err(err)?;
        FdLink::try_from(link).map_err(|source| CaptureError::Link { name, source })
    })?;
    Ok(())
}

/// `nsenter --net=<netns> ip <args>`; with `exists_ok`, "File exists" counts as success.
fn run_in_netns(netns: &Path, args: &[&str], exists_ok: bool) -> Result<()> {
    let mut net = std::ffi::OsString::from("--net=");
    net.push(netns);
    let command = format!("nsenter --net={} ip {}", netns.display(), args.join(" "));
    let out = Command::new("nsenter")
        .arg(net)
        .arg("ip")
        .args(args)
        .output()
        .map_err(|e| CaptureError::Command {
            command: command.clone(),
            message: e.to_string(),
        })?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() || (exists_ok && stderr.contains("File exists")) {
        return Ok(());
    }
    Err(CaptureError::Command {
        command,
        message: stderr.trim().to_string(),
    })
}

fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| CaptureError::Bpffs {
        path: dir.to_path_buf(),
        source,
    })
}
