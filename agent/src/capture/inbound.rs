//! The receiving side of capture, per enrolled pod:
//!
//! - [`Capture::attach_inbound`]: an sk_lookup program attached to the pod's netns steers
//!   TCP connections that arrive on a real interface to the agent's in-pod listeners
//!   (15008 → HBONE, anything else → plaintext 15006), which sit in the INBOUND_LISTENERS
//!   sockhash under (pod address, slot). A tc program on the pod's lo keeps the agent's own
//!   (marked) connections to the app from being steered back to the agent.
//! - [`Capture::preserve_source`]: the in-pod plumbing that lets the agent's upstream socket
//!   to the app carry the original client's address (tc egress program, policy rule and
//!   route, lo's accept_local), set over rtnetlink from a thread inside the pod's netns.
//!
//! Design: sk_lookup programs cannot call `bpf_get_netns_cookie`, so the program tells
//! pods apart by the address a connection arrives for: the sockhash is keyed by (pod IPv4
//! address, slot), each pod's addresses are its own on the node, and one program, loaded
//! once per agent like the tc programs, is linked into every pod's netns. (An instance per
//! pod with its cookie baked in would parse the kernel's BTF at each pod's enrollment: ~20
//! ms and ~20 MB of heap each, with aya's loader.) An address no enrolled
//! pod holds finds no listener and is dropped. A sockhash is simpler than a map of per-pod
//! sockmaps: one map to pin, one place to look when debugging, and the kernel drops
//! entries of closed sockets by itself.
//!
//! The per-pod links are pinned under `<pin_dir>/pods/<netns-cookie>/` so that they survive
//! an agent restart. While the agent is down its listeners are closed, the kernel removes
//! them from the sockhash, and the program refuses connections instead of passing them to
//! the app in plaintext (fail closed). A pod whose enrollment failed is kept the same way
//! until a retry enrolls it ([`Capture::hold_inbound_closed`]: steering, no listeners).

use std::net::{Ipv4Addr, TcpListener};
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};

use ambit_common::{ListenerKey, SLOT_HBONE, SLOT_PLAINTEXT, maps, programs};
use aya::programs::links::FdLink;
use aya::programs::tc::{self, SchedClassifierLink, TcAttachType};
use aya::programs::{SchedClassifier, SkLookup};
use tracing::{debug, info};

use super::rtnl::Rtnl;
use super::upgrade::{self, LinkOutcome};
use super::{Capture, CaptureError, Result, detach_links_in, program, removed_or_absent};
use crate::netns::NetNs;

/// Directory under the pin dir that holds one directory of links per pod netns cookie.
pub(super) const PODS_DIR: &str = "pods";
const SK_LOOKUP_PIN: &str = "sk_lookup";
const TC_LO_PIN: &str = "tc_lo_egress";
const TC_EGRESS_PIN: &str = "tc_egress";

/// What the agent changed in a pod's netns that is not a pinned link: the reply rule and
/// route (always ours: removed on detach) and lo's `accept_local`, restored to the value it
/// had before this agent process first set it.
///
/// Kept in memory only. After an agent restart the value from before is unknown (the
/// earlier run set it to 1): the restarted agent records the 1 it reads, so a later detach
/// leaves `accept_local` as it is. Pods released without ever being started by this
/// process (`forget_stale_enrollments`) keep their rule, route and sysctl: harmless without
/// the tc program, which alone marks packets for that rule.
#[derive(Debug)]
pub(super) struct PodNetnsChanges {
    path: PathBuf,
    accept_local_before: i32,
}

impl Capture {
    fn pod_dir(&self, netns_cookie: u64) -> PathBuf {
        self.pin_dir.join(PODS_DIR).join(netns_cookie.to_string())
    }

    /// Steers inbound TCP of the pod (netns `pod`, cookie `netns_cookie`, IPv4 addresses
    /// `addrs`) to the agent's listeners, which the caller opened inside that netns. Keeps a
    /// pinned link left by an earlier run, switched to this agent's program; replaces
    /// listeners registered before (e.g. by a crashed agent).
    pub fn attach_inbound(
        &mut self,
        pod: &NetNs,
        netns_cookie: u64,
        addrs: &[Ipv4Addr],
        hbone: &TcpListener,
        plaintext: &TcpListener,
    ) -> Result<()> {
        let pod_dir = self.pod_dir(netns_cookie);
        create_dir(&pod_dir)?;
        // Order: everything sk_lookup relies on first, so that a failure part-way never
        // leaves the pod steered into a loop, and steering starts with listeners in place.
        // 1. The agent's own (marked) connections to the app must not be steered back to
        //    the agent: re-inject them at lo ingress (see `ambit_tc_agent_lo`).
        let pin = pod_dir.join(TC_LO_PIN);
        let netns_path = pod.path();
        let tc_lo: &mut SchedClassifier = program(&mut self.ebpf, programs::TC_AGENT_LO)?;
        let (accept_local_before, outcome) = run_in_pod(pod, || {
            let mut rtnl = Rtnl::open(netns_path)?;
            let (_, before) = accept_local_on_lo(&mut rtnl)?;
            let outcome = attach_tc_egress(tc_lo, &pin, "lo", programs::TC_AGENT_LO)?;
            Ok((before, outcome))
        })?;
        self.links_stats.record(&outcome);
        self.remember_changes(netns_cookie, pod.path(), accept_local_before);
        // A pod enrolled again (e.g. with a new address) keeps no entry of its old one.
        self.remove_listeners(netns_cookie)?;
        for &addr in addrs {
            for (slot, listener) in [(SLOT_PLAINTEXT, plaintext), (SLOT_HBONE, hbone)] {
                self.listeners
                    .insert(listener_key(addr, slot), listener.as_fd(), 0)
                    .map_err(|source| CaptureError::Map {
                        name: maps::INBOUND_LISTENERS,
                        source,
                    })?;
            }
            // The address is this pod's now: a pod that held it before (its sandbox gone,
            // the address reused) no longer removes these entries when it leaves.
            self.listener_addrs.insert(addr, netns_cookie);
        }
        // 2. Listeners registered; 3. steering starts here.
        self.attach_sk_lookup(pod, netns_cookie)?;
        info!(netns_cookie, netns = %pod.path().display(), ?addrs, "inbound capture attached");
        Ok(())
    }

    /// Keeps a pod whose enrollment failed refusing inbound connections until it is
    /// enrolled (fail closed): the sk_lookup program is linked into its netns (or kept) with
    /// no listener registered for it, so the program drops every TCP connection arriving on
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

    /// Links the agent's sk_lookup program into the pod's netns, pinned in the pod's
    /// directory. A link pinned there already (by an earlier agent, or this one) is kept and
    /// switched to this agent's program, in place: the pod's inbound is steered throughout.
    fn attach_sk_lookup(&mut self, pod: &NetNs, netns_cookie: u64) -> Result<()> {
        let pin = self.pod_dir(netns_cookie).join(SK_LOOKUP_PIN);
        let name = programs::SK_LOOKUP;
        let prog: &mut SkLookup = program(&mut self.ebpf, name)?;
        let err = |source| CaptureError::Program { name, source };
        let prog_id = prog.info().map_err(err)?.id();
        let outcome = upgrade::link_program(
            &pin,
            prog,
            prog_id,
            |prog| {
                let id = prog.attach(pod).map_err(err)?;
                Ok(FdLink::from(prog.take_link(id).map_err(err)?))
            },
            |prog, _link, old_prog_id| {
                let fd = prog.fd().map_err(err)?;
                upgrade::update_pinned_link(&pin, fd.as_fd(), old_prog_id)
            },
        )?;
        self.links_stats.record(&outcome);
        Ok(())
    }

    /// Removes the pod's entries from the listener sockhash: those of the addresses this
    /// agent registered for it and that no other pod has taken since (absent ones are
    /// fine). After a restart the earlier agent's entries are gone with its sockets.
    fn remove_listeners(&mut self, netns_cookie: u64) -> Result<()> {
        let addrs: Vec<Ipv4Addr> = self
            .listener_addrs
            .iter()
            .filter(|(_, owner)| **owner == netns_cookie)
            .map(|(addr, _)| *addr)
            .collect();
        for addr in addrs {
            for slot in [SLOT_PLAINTEXT, SLOT_HBONE] {
                removed_or_absent(
                    maps::INBOUND_LISTENERS,
                    self.listeners.remove(&listener_key(addr, slot)),
                )?;
            }
            self.listener_addrs.remove(&addr);
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
    /// and the pod's listener entries, then undoes what this agent changed inside the pod's
    /// netns (reply rule and route removed, lo's `accept_local` restored; see
    /// [`PodNetnsChanges`]). Plain networking is back once this returns. Absent state, and a
    /// netns that is gone (pod deleted), are not errors.
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
        self.restore_pod_netns(netns_cookie)
    }

    /// Records the `accept_local` value found in the pod before the agent first set it.
    fn remember_changes(&mut self, netns_cookie: u64, path: &Path, accept_local_before: i32) {
        self.pod_netns
            .entry(netns_cookie)
            .or_insert_with(|| PodNetnsChanges {
                path: path.to_path_buf(),
                accept_local_before,
            });
    }

    fn restore_pod_netns(&mut self, netns_cookie: u64) -> Result<()> {
        let Some(changes) = self.pod_netns.remove(&netns_cookie) else {
            return Ok(());
        };
        let pod_netns_err = |source| CaptureError::PodNetns {
            path: changes.path.clone(),
            source,
        };
        let pod = match NetNs::open(&changes.path) {
            Ok(pod) => pod,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                debug!(netns_cookie, "pod netns gone; nothing to restore");
                return Ok(());
            }
            Err(e) => return Err(pod_netns_err(e)),
        };
        // A /proc/<pid>/ns/net path may name another netns by now (the pid reused).
        if pod.cookie().map_err(pod_netns_err)? != netns_cookie {
            debug!(netns_cookie, "pod netns path reused; nothing to restore");
            return Ok(());
        }
        let before = changes.accept_local_before;
        run_in_pod(&pod, || {
            let mut rtnl = Rtnl::open(&changes.path)?;
            rtnl.delete_reply_rules()?;
            rtnl.delete_reply_route()?;
            let lo = rtnl.loopback()?;
            if lo.accept_local != before {
                rtnl.set_accept_local(lo.index, before)?;
            }
            Ok(())
        })?;
        debug!(netns_cookie, "pod netns routing restored");
        Ok(())
    }

    /// Makes source-address preservation toward the app work in this pod (idempotent).
    ///
    /// The agent's upstream socket to the app is opened in the pod with IP_TRANSPARENT and
    /// SO_MARK [`AGENT_MARK`] and bound to the original client's address; the app's replies
    /// are addressed to that client and would leave through `ifname`. Inside the pod, over
    /// rtnetlink from a thread in its netns (no iproute2, no /proc/sys write: /proc/sys is
    /// read-only in an unprivileged container):
    /// - lo's `accept_local` = 1 accepts their local source address on lo;
    /// - rule `fwmark 0x53a` ([`REPLY_MARK`]) `lookup 133 pref 32765` and route
    ///   `local 0.0.0.0/0 dev lo table 133` deliver them locally;
    /// - then a tc egress program on `ifname` sends packets that belong to such a local
    ///   socket back in through lo, marked [`REPLY_MARK`].
    ///
    /// [`AGENT_MARK`]: ambit_common::AGENT_MARK
    /// [`REPLY_MARK`]: ambit_common::REPLY_MARK
    pub fn preserve_source(&mut self, pod: &NetNs, ifname: &str) -> Result<()> {
        let netns_cookie = pod.cookie().map_err(|source| CaptureError::PodNetns {
            path: pod.path().to_path_buf(),
            source,
        })?;
        let pod_dir = self.pod_dir(netns_cookie);
        create_dir(&pod_dir)?;
        let pin = pod_dir.join(TC_EGRESS_PIN);
        let netns_path = pod.path();
        let tc_reply: &mut SchedClassifier = program(&mut self.ebpf, programs::TC_REPLY_TO_LO)?;
        let (accept_local_before, outcome) = run_in_pod(pod, || {
            let mut rtnl = Rtnl::open(netns_path)?;
            let (lo_index, before) = accept_local_on_lo(&mut rtnl)?;
            rtnl.add_reply_rule()?;
            rtnl.replace_reply_route(lo_index)?;
            let outcome = attach_tc_egress(tc_reply, &pin, ifname, programs::TC_REPLY_TO_LO)?;
            Ok((before, outcome))
        })?;
        self.links_stats.record(&outcome);
        self.remember_changes(netns_cookie, pod.path(), accept_local_before);
        info!(netns_cookie, ifname, "source preservation set up");
        Ok(())
    }
}

/// Runs `f` on a thread inside the pod's netns.
/// The sockhash key of a pod address's listener: the address in network byte order, as
/// sk_lookup's `local_ip4` holds it.
fn listener_key(addr: Ipv4Addr, slot: u32) -> ListenerKey {
    ListenerKey {
        addr: u32::from_ne_bytes(addr.octets()),
        slot,
    }
}

fn run_in_pod<T: Send>(pod: &NetNs, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    pod.run(move || Ok(f()))
        .map_err(|source| CaptureError::PodNetns {
            path: pod.path().to_path_buf(),
            source,
        })?
}

/// Packets re-injected at lo ingress carry a local source address (the pod's own, or the
/// client's through the local policy route); without `accept_local` lo drops them silently.
/// Sets it to 1 in the socket's netns; returns lo's index and the value it had.
fn accept_local_on_lo(rtnl: &mut Rtnl) -> Result<(u32, i32)> {
    let lo = rtnl.loopback()?;
    if lo.accept_local != 1 {
        rtnl.set_accept_local(lo.index, 1)?;
    }
    Ok((lo.index, lo.accept_local))
}

/// Attaches the loaded tc program `prog` (named `name`) at egress of `ifname` in the
/// calling thread's netns and pins the link at `pin`; a link pinned there already is kept
/// and switched to `prog` in place (aya's `attach_to_link`, BPF_LINK_UPDATE on TCX links).
fn attach_tc_egress(
    prog: &mut SchedClassifier,
    pin: &Path,
    ifname: &str,
    name: &'static str,
) -> Result<LinkOutcome> {
    let err = |source| CaptureError::Program { name, source };
    let prog_id = prog.info().map_err(err)?.id();
    upgrade::link_program(
        pin,
        prog,
        prog_id,
        |prog| {
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
            let id = prog.attach(ifname, TcAttachType::Egress).map_err(err)?;
            let link = prog.take_link(id).map_err(err)?;
            FdLink::try_from(link).map_err(|source| CaptureError::Link { name, source })
        },
        |prog, link, _old_prog_id| {
            let link = SchedClassifierLink::try_from(link)
                .map_err(|source| CaptureError::Link { name, source })?;
            let id = prog.attach_to_link(link).map_err(err)?;
            // aya keeps the updated link in the program's own set; take it back and close
            // this fd, or the link would outlive its pin and `detach_inbound`.
            drop(prog.take_link(id).map_err(err)?);
            Ok(())
        },
    )
}

fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| CaptureError::Bpffs {
        path: dir.to_path_buf(),
        source,
    })
}
