//! Types shared by ambit's eBPF programs and the agent.
//!
//! Every map key and value is `#[repr(C)]` with explicit padding fields so that the layout
//! is identical on both sides and no uninitialised bytes reach the kernel's hash.
#![no_std]
#![deny(unsafe_code)]

/// SO_MARK carried by every socket the agent opens inside a pod: the capture programs
/// leave such sockets alone so the agent never captures its own traffic.
pub const AGENT_MARK: u32 = 0x539;
/// skb mark of application replies that the tc reply program sends back in through lo, so a
/// policy-routing rule (fwmark -> table 133: local 0.0.0.0/0 dev lo) delivers them locally.
/// Distinct from [`AGENT_MARK`]: that rule must not apply to the agent's own outgoing
/// connections, whose sockets carry AGENT_MARK and must follow the normal routes.
pub const REPLY_MARK: u32 = 0x53a;
/// In-pod listener that receives captured outbound connections (127.0.0.1).
pub const OUTBOUND_CAPTURE_PORT: u16 = 15001;
/// In-pod listener for plaintext inbound connections.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// In-pod HBONE (HTTP/2 CONNECT over mTLS) listener.
pub const HBONE_PORT: u16 = 15008;

/// Names of the programs in the eBPF object, shared so that a rename breaks the build.
pub mod programs {
    pub const CONNECT4: &str = "ambit_connect4";
    /// cgroup/connect6: IPv4-mapped destinations captured, native IPv6 refused.
    pub const CONNECT6: &str = "ambit_connect6";
    pub const SOCK_OPS: &str = "ambit_sock_ops";
    /// cgroup/getpeername4: a captured socket's peer reads as its original destination.
    pub const GETPEERNAME4: &str = "ambit_getpeername4";
    pub const GETPEERNAME6: &str = "ambit_getpeername6";
    /// sk_lookup, one loaded instance per enrolled pod netns (see [`crate::globals`]).
    pub const SK_LOOKUP: &str = "ambit_sk_lookup";
    /// tc egress on a pod's interface: replies to the agent's transparent sockets go to lo.
    pub const TC_REPLY_TO_LO: &str = "ambit_tc_reply_to_lo";
    /// tc egress on a pod's lo: the agent's own (marked) packets re-enter at lo ingress.
    pub const TC_AGENT_LO: &str = "ambit_tc_agent_lo";
    /// sk_msg on the LOCAL_LEGS sockhash: bytes of a local leg go straight to the peer.
    pub const SK_MSG: &str = "ambit_sk_msg";
}

/// Names of the global variables the agent sets at load time.
pub mod globals {
    /// `u8`: aya-log's level filter inside the programs (1 error … 5 trace); set at load so
    /// that disabled levels cost nothing on the connect() path.
    pub const AYA_LOG_LEVEL: &str = "AYA_LOG_LEVEL";
}

/// Names of the maps in the eBPF object.
pub mod maps {
    /// aya-log's ring buffer: messages of the eBPF programs for the agent's log stream.
    pub const AYA_LOGS: &str = "AYA_LOGS";
    /// netns cookie -> [`crate::EnrolledPod`]; presence means "capture this pod".
    pub const ENROLLED: &str = "ENROLLED";
    /// socket cookie -> [`crate::OrigDst`], written at connect(), before the port is known.
    pub const PENDING: &str = "PENDING";
    /// [`crate::FlowKey`] -> [`crate::OrigDst`], readable by the agent after accept().
    pub const ORIG_DST: &str = "ORIG_DST";
    /// destination port -> 1: ports never captured (e.g. the kubelet's probes).
    pub const EXCLUDED_PORTS: &str = "EXCLUDED_PORTS";
    /// socket cookie -> [`crate::OrigDst`], written at connect() and kept (LRU) so that
    /// getpeername() of a captured socket reports the original destination.
    pub const PEER_ORIG_DST: &str = "PEER_ORIG_DST";
    /// SOCKHASH [`crate::ListenerKey`] -> the agent's in-pod inbound listeners.
    pub const INBOUND_LISTENERS: &str = "INBOUND_LISTENERS";
    /// SOCKHASH [`crate::SockKey`] -> the sockets of the local legs (app <-> agent inside
    /// one pod netns) whose bytes the sk_msg program moves to the peer's receive queue.
    pub const LOCAL_LEGS: &str = "LOCAL_LEGS";
    /// [`crate::SockKey`] -> 1 (LRU): the agent's upstream sockets to an app, so that the
    /// app's accepted socket (the swapped key) is known as their peer.
    pub const AGENT_UPSTREAMS: &str = "AGENT_UPSTREAMS";
    /// [`crate::SockKey`] -> 1 (plain hash, entry deleted when the socket closes): sockets
    /// that already sent bytes over TCP; they keep to TCP, since redirected bytes would
    /// overtake those still in flight. Not an LRU: an evicted entry would break that.
    pub const TCP_LEGS: &str = "TCP_LEGS";
    /// Array of one u32: [`crate::SOCKMAP_ON`] when the sk_msg program is attached.
    pub const SOCKMAP_SWITCH: &str = "SOCKMAP_SWITCH";
    /// Per-CPU u64 counters, indexed by [`crate::SockmapStat`].
    pub const SOCKMAP_STATS: &str = "SOCKMAP_STATS";
}

/// Value of `SOCKMAP_SWITCH[0]` that lets sock_ops put local legs into LOCAL_LEGS.
pub const SOCKMAP_ON: u32 = 1;

/// Indexes of the SOCKMAP_STATS counters.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SockmapStat {
    /// Bytes handed to a peer's receive queue by the sk_msg program.
    RedirectedBytes = 0,
    /// Local-leg sockets that found no peer at their first send and stayed on TCP.
    TcpFallbacks = 1,
}

/// Number of SOCKMAP_STATS slots.
pub const SOCKMAP_STATS_LEN: u32 = 2;

/// Slot of the plaintext inbound listener (port [`INBOUND_PLAINTEXT_PORT`]) in
/// [`ListenerKey::slot`].
pub const SLOT_PLAINTEXT: u32 = 0;
/// Slot of the HBONE listener (port [`HBONE_PORT`]).
pub const SLOT_HBONE: u32 = 1;

/// The loopback interface's index: 1 in every network namespace (the kernel creates lo
/// first in each one).
pub const LOOPBACK_IFINDEX: u32 = 1;

/// Key of the INBOUND_LISTENERS sockhash: which pod, by the IPv4 address a connection
/// arrives for, and which listener. sk_lookup programs cannot call `bpf_get_netns_cookie`,
/// but the destination address tells the node's pods apart (each has its own), so one
/// program serves every pod.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    /// The pod's IPv4 address in network byte order, as sk_lookup's `local_ip4` has it.
    pub addr: u32,
    /// [`SLOT_PLAINTEXT`] or [`SLOT_HBONE`].
    pub slot: u32,
}

/// Address family tags used in [`OrigDst::family`].
pub const FAMILY_V4: u32 = 4;
pub const FAMILY_V6: u32 = 6;

/// Value of the ENROLLED map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EnrolledPod {
    /// Bit flags, see the `ENROLL_*` constants; `u32` rather than `bool` for a stable layout.
    pub flags: u32,
    pub reserved: u32,
}

/// Capture outbound TCP of this pod.
pub const ENROLL_OUTBOUND: u32 = 1;

/// Key under which the agent finds the original destination of a captured connection:
/// the client's netns and the client's source port (the peer port of the accepted socket).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub netns_cookie: u64,
    /// Client source port, host byte order.
    pub port: u32,
    pub reserved: u32,
}

/// One end of a TCP connection inside one netns: the LOCAL_LEGS key. The peer of a socket
/// is found under the swapped key (same netns, local and remote exchanged).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub netns_cookie: u64,
    /// Addresses in network byte order.
    pub local_ip4: u32,
    pub remote_ip4: u32,
    /// Ports in host byte order.
    pub local_port: u32,
    pub remote_port: u32,
}

impl SockKey {
    /// The key of the other end of the same connection.
    pub fn peer(&self) -> Self {
        Self {
            netns_cookie: self.netns_cookie,
            local_ip4: self.remote_ip4,
            remote_ip4: self.local_ip4,
            local_port: self.remote_port,
            remote_port: self.local_port,
        }
    }
}

/// Where a captured connection was going before the connect() was rewritten.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigDst {
    /// Address in network byte order; IPv4 uses `addr[0]` only.
    pub addr: [u32; 4],
    /// Port, host byte order.
    pub port: u32,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u32,
}

// The layouts the kernel hashes: no implicit padding anywhere.
const _: () = {
    assert!(core::mem::size_of::<EnrolledPod>() == 8);
    assert!(core::mem::size_of::<FlowKey>() == 16);
    assert!(core::mem::size_of::<ListenerKey>() == 8);
    assert!(core::mem::size_of::<OrigDst>() == 24);
    assert!(core::mem::size_of::<SockKey>() == 24);
};

#[cfg(feature = "user")]
#[allow(unsafe_code)]
mod user {
    use super::*;
    // SAFETY: aya::Pod promises plain-old-data; every
    // type here is repr(C), Copy, and has no implicit padding (explicit `reserved` fields).
    unsafe impl aya::Pod for EnrolledPod {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for OrigDst {}
    unsafe impl aya::Pod for ListenerKey {}
    unsafe impl aya::Pod for SockKey {}
}
