//! ambit's kernel side: capture hooks for the TCP traffic of enrolled pods.
//!
//! Each program entry point is thin and wraps a `try_*` function. Map layouts come from
//! `ambit-common` so that the agent and these programs cannot disagree.
#![no_std]
#![no_main]

use ambit_common::{
    AGENT_MARK, ENROLL_OUTBOUND, EnrolledPod, FAMILY_V4, FlowKey, HBONE_PORT, LOOPBACK_IFINDEX,
    ListenerKey, OUTBOUND_CAPTURE_PORT, OrigDst, REPLY_MARK, SLOT_HBONE, SLOT_PLAINTEXT,
    SOCKMAP_ON, SOCKMAP_STATS_LEN, SockKey, SockmapStat,
};
use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_F_CURRENT_NETNS, BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, TC_ACT_OK, bpf_sock, bpf_sock_tuple,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 as SockTupleV4,
        sk_action::{SK_DROP, SK_PASS},
    },
    helpers::{
        bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_redirect, bpf_sk_fullsock, bpf_sk_release,
        bpf_skc_lookup_tcp,
    },
    macros::{cgroup_sock_addr, classifier, map, sk_lookup, sk_msg, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, SockHash},
    programs::{SkLookupContext, SkMsgContext, SockAddrContext, SockOpsContext, TcContext},
};
use aya_log_ebpf::{debug, warn};

const SOCK_STREAM: u32 = 1;
const AF_INET: u32 = 2;
const IPPROTO_TCP: u32 = 6;
const ETH_P_IP: u16 = 0x0800;
const ETH_HLEN: usize = 14;
/// 127.0.0.1 in network byte order as the kernel stores it in `user_ip4`.
const LOOPBACK_V4_BE: u32 = u32::from_ne_bytes([127, 0, 0, 1]);

/// Verdicts of cgroup sock_addr programs.
const ALLOW: i32 = 1;
const REJECT: i32 = 0;
const AF_INET6: u32 = 10;
/// `0000:ffff` as the third network-order word of an IPv4-mapped IPv6 address.
const V4_MAPPED_PREFIX_BE: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
/// `::1` as network-order words.
const LOOPBACK_V6_BE: [u32; 4] = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];

#[map(name = "ENROLLED")]
static ENROLLED: HashMap<u64, EnrolledPod> = HashMap::with_max_entries(16_384, 0);

#[map(name = "PENDING")]
static PENDING: LruHashMap<u64, OrigDst> = LruHashMap::with_max_entries(65_536, 0);

#[map(name = "ORIG_DST")]
static ORIG_DST: LruHashMap<FlowKey, OrigDst> = LruHashMap::with_max_entries(65_536, 0);

#[map(name = "EXCLUDED_PORTS")]
static EXCLUDED_PORTS: HashMap<u32, u32> = HashMap::with_max_entries(64, 0);

#[map(name = "PEER_ORIG_DST")]
static PEER_ORIG_DST: LruHashMap<u64, OrigDst> = LruHashMap::with_max_entries(65_536, 0);

#[map(name = "INBOUND_LISTENERS")]
static INBOUND_LISTENERS: SockHash<ListenerKey> = SockHash::with_max_entries(16_384, 0);

#[map(name = "LOCAL_LEGS")]
static LOCAL_LEGS: SockHash<SockKey> = SockHash::with_max_entries(65_536, 0);

#[map(name = "AGENT_UPSTREAMS")]
static AGENT_UPSTREAMS: LruHashMap<SockKey, u32> = LruHashMap::with_max_entries(65_536, 0);

/// A plain hash, not an LRU: an evicted entry would let a socket that already sent over TCP
/// be redirected later and overtake its own bytes. Entries go when their socket closes
/// (`leg_closed`); only sockets in LOCAL_LEGS (at most as many) ever get one.
#[map(name = "TCP_LEGS")]
static TCP_LEGS: HashMap<SockKey, u32> = HashMap::with_max_entries(65_536, 0);

#[map(name = "SOCKMAP_SWITCH")]
static SOCKMAP_SWITCH: Array<u32> = Array::with_max_entries(1, 0);

#[map(name = "SOCKMAP_STATS")]
static SOCKMAP_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(SOCKMAP_STATS_LEN, 0);

/// connect() of an IPv4 TCP socket in any netns: if the netns is an enrolled pod and the
/// socket is not the agent's own, remember where it was going and send it to the agent's
/// in-pod listener on 127.0.0.1:15001 instead.
#[cgroup_sock_addr(connect4)]
pub fn ambit_connect4(ctx: SockAddrContext) -> i32 {
    // Errors inside the hook must never block a connect(): the decision to capture is made
    // only on a full, successful read of the context.
    let _ = try_connect4(&ctx);
    ALLOW
}

fn try_connect4(ctx: &SockAddrContext) -> Result<(), i64> {
    // SAFETY: the verifier guarantees `sock_addr` points to a valid context for this hook.
    let sa = unsafe { &*ctx.sock_addr };
    if sa.user_family != AF_INET {
        return Ok(());
    }
    let Some(netns_cookie) = capturable(ctx) else {
        return Ok(());
    };
    if capture_v4(ctx, netns_cookie, sa.user_ip4, sa.user_port) {
        // SAFETY: the context fields user_ip4/user_port are writable in connect4 programs.
        unsafe {
            (*ctx.sock_addr).user_ip4 = LOOPBACK_V4_BE;
            (*ctx.sock_addr).user_port = u32::from(OUTBOUND_CAPTURE_PORT.to_be());
        }
    }
    Ok(())
}

/// connect() of an IPv6 TCP socket. Dual-stack applications reach IPv4 services through
/// IPv4-mapped addresses (`::ffff:a.b.c.d`): those are captured exactly like connect4 does
/// (to `::ffff:127.0.0.1:15001`). Native IPv6 destinations other than loopback are refused
/// for enrolled pods: the mesh does not carry IPv6 yet, and letting them out would be
/// plaintext behind the policy's back (fail closed).
#[cgroup_sock_addr(connect6)]
pub fn ambit_connect6(ctx: SockAddrContext) -> i32 {
    try_connect6(&ctx).unwrap_or(ALLOW)
}

fn try_connect6(ctx: &SockAddrContext) -> Result<i32, i64> {
    // SAFETY: the verifier guarantees `sock_addr` points to a valid context for this hook.
    let sa = unsafe { &*ctx.sock_addr };
    if sa.user_family != AF_INET6 {
        return Ok(ALLOW);
    }
    let Some(netns_cookie) = capturable(ctx) else {
        return Ok(ALLOW);
    };
    let ip6 = sa.user_ip6;
    if ip6[0] == 0 && ip6[1] == 0 && ip6[2] == V4_MAPPED_PREFIX_BE {
        if capture_v4(ctx, netns_cookie, ip6[3], sa.user_port) {
            // SAFETY: user_ip6/user_port are writable in connect6 programs.
            unsafe {
                (*ctx.sock_addr).user_ip6 = [0, 0, V4_MAPPED_PREFIX_BE, LOOPBACK_V4_BE];
                (*ctx.sock_addr).user_port = u32::from(OUTBOUND_CAPTURE_PORT.to_be());
            }
        }
        return Ok(ALLOW);
    }
    if ip6 == LOOPBACK_V6_BE {
        return Ok(ALLOW);
    }
    warn!(
        ctx,
        "capture: native IPv6 connect from enrolled netns {} refused (the mesh carries IPv4 only)",
        netns_cookie
    );
    Ok(REJECT)
}

/// The netns cookie when this connect() belongs to an enrolled pod and is a TCP socket not
/// marked as the agent's own; `None` when it must be left alone.
fn capturable(ctx: &SockAddrContext) -> Option<u64> {
    // SAFETY: the verifier guarantees `sock_addr` points to a valid context for this hook.
    let sa = unsafe { &*ctx.sock_addr };
    if sa.type_ != SOCK_STREAM {
        return None;
    }
    // SAFETY: bpf_get_netns_cookie accepts the program's context pointer.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup; the value is copied out immediately.
    let pod = unsafe { ENROLLED.get(netns_cookie) }.copied()?;
    if pod.flags & ENROLL_OUTBOUND == 0 {
        return None;
    }
    // SAFETY: `sk` is always set for connect hooks; reading `mark` of a bpf_sock is allowed.
    let sk: *mut bpf_sock = unsafe { sa.__bindgen_anon_1.sk };
    if sk.is_null() || unsafe { (*sk).mark } == AGENT_MARK {
        return None;
    }
    Some(netns_cookie)
}

/// Files the original IPv4 destination (`dst_ip`, `user_port`: network order) of a
/// capturable socket and says whether the caller must redirect it. Loopback destinations
/// and excluded ports are not captured.
fn capture_v4(ctx: &SockAddrContext, netns_cookie: u64, dst_ip: u32, user_port: u32) -> bool {
    // The first octet sits in the lowest byte of the network-order word on a little-endian
    // target; all of 127.0.0.0/8 stays local.
    if dst_ip.to_ne_bytes()[0] == 127 {
        return false;
    }
    let dst_port = u16::from_be(user_port as u16);
    // SAFETY: read-only lookup.
    if unsafe { EXCLUDED_PORTS.get(u32::from(dst_port)) }.is_some() {
        return false;
    }
    let orig = OrigDst {
        addr: [dst_ip, 0, 0, 0],
        port: u32::from(dst_port),
        family: FAMILY_V4,
    };
    // SAFETY: bpf_get_socket_cookie accepts the program's context pointer.
    let socket_cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // Fail closed: even if the record cannot be filed, the connection is still redirected
    // (the agent then finds no original destination and closes it) rather than let through
    // to its destination in plaintext.
    if PENDING.insert(socket_cookie, orig, 0).is_err() {
        warn!(
            ctx,
            "capture: PENDING map refused a record (netns {}); the agent will close the connection",
            netns_cookie
        );
    }
    // Only getpeername() cosmetics depend on this entry: a failed insert must not stop the
    // capture.
    let _ = PEER_ORIG_DST.insert(socket_cookie, orig, 0);
    debug!(
        ctx,
        "capture: connect from netns {} to {:i}:{} redirected to the agent",
        netns_cookie,
        u32::from_be(dst_ip),
        dst_port
    );
    true
}

/// Once the kernel has picked the client's source port (TCP_CONNECT_CB runs just before the
/// SYN), move the pending record to a key the agent can build from the accepted socket.
#[sock_ops]
pub fn ambit_sock_ops(ctx: SockOpsContext) -> u32 {
    let _ = try_sock_ops(&ctx);
    // sock_ops return values are ignored for TCP_CONNECT_CB; 1 means "handled".
    1
}

fn try_sock_ops(ctx: &SockOpsContext) -> Result<(), i64> {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => file_orig_dst(ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            local_leg_established(ctx, true);
            Ok(())
        }
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            local_leg_established(ctx, false);
            Ok(())
        }
        // Only sockets filed in LOCAL_LEGS ask for state callbacks.
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            leg_closed(ctx);
            Ok(())
        }
        _ => Ok(()),
    }
}

fn file_orig_dst(ctx: &SockOpsContext) -> Result<(), i64> {
    // SAFETY: bpf_get_socket_cookie accepts a sock_ops context.
    let socket_cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup, copied out at once.
    let Some(orig) = (unsafe { PENDING.get(socket_cookie) }).copied() else {
        return Ok(());
    };
    // SAFETY: bpf_get_netns_cookie accepts a sock_ops context.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let key = FlowKey {
        netns_cookie,
        port: ctx.local_port(),
        reserved: 0,
    };
    if ORIG_DST.insert(key, orig, 0).is_err() {
        warn!(
            ctx,
            "capture: ORIG_DST map refused a record (netns {}); the agent will close the connection",
            netns_cookie
        );
    }
    PENDING.remove(socket_cookie)?;
    Ok(())
}

/// A port of `bpf_sock_ops` / `sk_msg_md` in host order. The kernel hands the local port in
/// host order and the remote port in network order in the upper 16 bits of the word on
/// little-endian hosts; taking both halves copes with either placement.
#[inline(always)]
fn remote_port_host(raw: u32) -> u32 {
    u32::from(u16::from_be(((raw >> 16) | raw) as u16))
}

/// At ESTABLISHED, files the socket in LOCAL_LEGS when it is one end of a local leg of an
/// enrolled pod, and only then (each socket in the sockhash switches to the kernel's
/// sk_msg send path, which costs on TCP that leaves the node):
/// - active: the app's captured socket to 127.0.0.1:15001, or the agent's marked upstream
///   socket (any port but HBONE's: those leave for other agents);
/// - passive: the agent's accepted socket on 127.0.0.1:15001, or an app's accepted socket
///   whose peer is an agent upstream socket (AGENT_UPSTREAMS holds the swapped key).
///
/// The sk_msg program only ever redirects to the socket under the swapped key, i.e. the
/// same connection's other end, so no byte can reach a socket TCP would not have taken it
/// to; in particular none can skip the agent.
fn local_leg_established(ctx: &SockOpsContext, active: bool) {
    if ctx.family() != AF_INET {
        return;
    }
    if SOCKMAP_SWITCH.get(0).copied() != Some(SOCKMAP_ON) {
        return;
    }
    // SAFETY: bpf_get_netns_cookie accepts a sock_ops context.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup.
    if unsafe { ENROLLED.get(netns_cookie) }.is_none() {
        return;
    }
    let key = SockKey {
        netns_cookie,
        local_ip4: ctx.local_ip4(),
        remote_ip4: ctx.remote_ip4(),
        local_port: ctx.local_port(),
        remote_port: remote_port_host(ctx.remote_port()),
    };
    let capture_port = u32::from(OUTBOUND_CAPTURE_PORT);
    let leg = if active {
        if key.remote_ip4 == LOOPBACK_V4_BE && key.remote_port == capture_port {
            true
        } else if key.remote_port != u32::from(HBONE_PORT) && agent_marked(ctx) {
            // Best effort: without this entry the app's end stays on TCP, which is correct.
            let _ = AGENT_UPSTREAMS.insert(key, 1, 0);
            true
        } else {
            false
        }
    } else {
        (key.local_ip4 == LOOPBACK_V4_BE && key.local_port == capture_port)
            // SAFETY: read-only lookup.
            || unsafe { AGENT_UPSTREAMS.get(key.peer()) }.is_some()
    };
    if !leg {
        return;
    }
    // A socket with the same 4-tuple that kept to TCP earlier must not hold this one back.
    let _ = TCP_LEGS.remove(key);
    // Its TCP_LEGS entry, if it ever gets one, goes when it closes (`leg_closed`). Without
    // that callback an entry could outlive the socket: such a socket stays off the shortcut.
    let flags = ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG;
    if ctx.set_cb_flags(flags as i32).is_err() {
        return;
    }
    // SAFETY: `ops` is the program's own context, valid for the whole call.
    let ops = unsafe { &mut *ctx.ops };
    if let Err(e) = LOCAL_LEGS.update(key, ops, 0) {
        // The connection works over TCP as before; only the shortcut is lost.
        debug!(
            ctx,
            "sockmap: LOCAL_LEGS refused a socket ({}); it stays on TCP", e
        );
    }
}

/// A local-leg socket closed: forget that it kept to TCP, so TCP_LEGS holds live sockets
/// only (a plain hash never evicts).
fn leg_closed(ctx: &SockOpsContext) {
    if ctx.family() != AF_INET {
        return;
    }
    // SAFETY: bpf_get_netns_cookie accepts a sock_ops context.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let key = SockKey {
        netns_cookie,
        local_ip4: ctx.local_ip4(),
        remote_ip4: ctx.remote_ip4(),
        local_port: ctx.local_port(),
        remote_port: remote_port_host(ctx.remote_port()),
    };
    let _ = TCP_LEGS.remove(key);
}

/// Whether the sock_ops socket carries the agent's mark.
fn agent_marked(ctx: &SockOpsContext) -> bool {
    // SAFETY: `sk` of a sock_ops context is a bpf_sock pointer or null; checked below.
    let sk: *mut bpf_sock = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    // SAFETY: non-null `sk` is readable; `mark` is a bpf_sock field.
    !sk.is_null() && unsafe { (*sk).mark } == AGENT_MARK
}

/// sendmsg() of a socket in LOCAL_LEGS: the bytes go straight onto the receive queue of the
/// connection's other end (the swapped key), skipping the loopback TCP/IP stack. A socket
/// whose peer is not (yet) there sends over TCP, and keeps doing so: redirected bytes land
/// on the peer's sockmap queue, which is read before its TCP queue, so mixing the two
/// would reorder the stream.
#[sk_msg]
pub fn ambit_sk_msg(ctx: SkMsgContext) -> u32 {
    // SAFETY: the verifier guarantees `msg` points to a valid sk_msg_md.
    let md = unsafe { &*ctx.msg };
    if md.family != AF_INET {
        return SK_PASS;
    }
    // SAFETY: bpf_get_netns_cookie accepts an sk_msg context.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.msg.cast()) };
    let key = SockKey {
        netns_cookie,
        local_ip4: md.local_ip4,
        remote_ip4: md.remote_ip4,
        local_port: md.local_port,
        remote_port: remote_port_host(md.remote_port),
    };
    // SAFETY: read-only lookup.
    if unsafe { TCP_LEGS.get(key) }.is_some() {
        return SK_PASS;
    }
    let size = u64::from(md.size);
    if LOCAL_LEGS.redirect_msg(&ctx, key.peer(), u64::from(BPF_F_INGRESS)) == i64::from(SK_PASS) {
        count(SockmapStat::RedirectedBytes, size);
    } else {
        // Never short of room: only sockets in LOCAL_LEGS get an entry, each removed when
        // its socket closes, and both maps hold as many.
        let _ = TCP_LEGS.insert(key, 1, 0);
        count(SockmapStat::TcpFallbacks, 1);
    }
    // With a redirect set, SK_PASS means "deliver to the peer"; without, "send over TCP".
    SK_PASS
}

fn count(stat: SockmapStat, n: u64) {
    if let Some(slot) = SOCKMAP_STATS.get_ptr_mut(stat as u32) {
        // SAFETY: a per-CPU slot, written only by this CPU while the program runs.
        unsafe { *slot += n };
    }
}

/// getpeername() of a socket captured by connect4 reports its original destination rather
/// than the agent's 127.0.0.1:15001.
#[cgroup_sock_addr(getpeername4)]
pub fn ambit_getpeername4(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = captured_peer(&ctx) {
        // SAFETY: user_ip4/user_port are writable in getpeername4 programs.
        unsafe {
            (*ctx.sock_addr).user_ip4 = orig.addr[0];
            (*ctx.sock_addr).user_port = u32::from((orig.port as u16).to_be());
        }
    }
    ALLOW
}

/// getpeername() of a dual-stack socket captured by connect6 (IPv4-mapped destination)
/// reports `::ffff:<original destination>`.
#[cgroup_sock_addr(getpeername6)]
pub fn ambit_getpeername6(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = captured_peer(&ctx) {
        // SAFETY: user_ip6/user_port are writable in getpeername6 programs.
        unsafe {
            (*ctx.sock_addr).user_ip6 = [0, 0, V4_MAPPED_PREFIX_BE, orig.addr[0]];
            (*ctx.sock_addr).user_port = u32::from((orig.port as u16).to_be());
        }
    }
    ALLOW
}

/// The original IPv4 destination of a socket the capture redirected, if it is one.
fn captured_peer(ctx: &SockAddrContext) -> Option<OrigDst> {
    // SAFETY: bpf_get_socket_cookie accepts the program's context pointer.
    let socket_cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup, copied out at once.
    let orig = unsafe { PEER_ORIG_DST.get(socket_cookie) }.copied()?;
    (orig.family == FAMILY_V4).then_some(orig)
}

/// Runs in an enrolled pod's netns when no established socket matches an incoming TCP
/// packet: connections that arrived on a real interface go to the agent's in-pod listeners
/// (15008 to the HBONE listener, any other port to the plaintext one). With the agent's
/// listeners gone the connection is refused rather than handed to the app (fail closed).
#[sk_lookup]
pub fn ambit_sk_lookup(ctx: SkLookupContext) -> u32 {
    try_sk_lookup(&ctx).unwrap_or(SK_DROP)
}

fn try_sk_lookup(ctx: &SkLookupContext) -> Result<u32, i64> {
    // SAFETY: the verifier guarantees `lookup` points to a valid context for this hook.
    let lookup = unsafe { &*ctx.lookup };
    // Loopback stays in the pod (the agent's own upstream connections to the app arrive
    // there).
    if lookup.protocol != IPPROTO_TCP || lookup.ingress_ifindex == LOOPBACK_IFINDEX {
        return Ok(SK_PASS);
    }
    // The mesh carries IPv4 only: native IPv6 to an enrolled pod would reach the app with
    // neither identity nor policy, so it is refused (fail closed), like connect6 does.
    if lookup.family != AF_INET {
        return Ok(SK_DROP);
    }
    let port = lookup.local_port;
    // SAFETY: read-only lookup.
    if unsafe { EXCLUDED_PORTS.get(port) }.is_some() {
        return Ok(SK_PASS);
    }
    let slot = if port == u32::from(HBONE_PORT) {
        SLOT_HBONE
    } else {
        SLOT_PLAINTEXT
    };
    // The pod is the one the connection is addressed to; an address no enrolled pod holds
    // finds no listener and is dropped like the rest.
    let key = ListenerKey {
        addr: lookup.local_ip4,
        slot,
    };
    // No listener (agent down) or assignment refused: drop, never fall through to the app.
    match INBOUND_LISTENERS.redirect_sk_lookup(ctx, key, 0) {
        Ok(()) => Ok(SK_PASS),
        Err(_) => Ok(SK_DROP),
    }
}

/// tc egress on a pod's interface: a reply addressed to a socket the agent opened
/// transparently (SO_MARK AGENT_MARK, bound to the original client's address) belongs to
/// that local socket, not to the wire. Send it back in through lo; the pod's policy route for
/// the mark makes the kernel deliver it locally.
#[classifier]
pub fn ambit_tc_reply_to_lo(ctx: TcContext) -> i32 {
    try_tc_reply_to_lo(&ctx).unwrap_or(TC_ACT_OK)
}

fn try_tc_reply_to_lo(ctx: &TcContext) -> Result<i32, i64> {
    let ethertype: u16 = ctx.load(12)?;
    if u16::from_be(ethertype) != ETH_P_IP {
        return Ok(TC_ACT_OK);
    }
    let version_ihl: u8 = ctx.load(ETH_HLEN)?;
    let protocol: u8 = ctx.load(ETH_HLEN + 9)?;
    if u32::from(protocol) != IPPROTO_TCP {
        return Ok(TC_ACT_OK);
    }
    let ihl = usize::from(version_ihl & 0x0f) * 4;
    let l4 = ETH_HLEN + ihl;
    // HBONE is never an app's reply to one of the agent's transparent sockets, so it skips
    // the socket lookup below, which for nearly every packet misses through the listener
    // path (running this netns's sk_lookup program too). From local port 15008: the
    // agent's server side (its accepted sockets carry no mark); no app connection through
    // the agent uses that port, as the inbound side refuses a CONNECT to it and sk_lookup
    // gives every connection to it to the agent. To port 15008 with the agent's mark: its
    // client side. The mark alone is not enough: with tcp_fwmark_accept an app's socket
    // accepted from the agent's (marked) connection carries the mark too, and a reply to
    // a transparent socket has that socket's port as destination, not 15008.
    let sport: u16 = ctx.load(l4)?;
    let dport: u16 = ctx.load(l4 + 2)?;
    // SAFETY: `skb` is the program's context; reading `mark` is allowed in tc programs.
    let mark = unsafe { (*ctx.skb.skb).mark };
    if u16::from_be(sport) == HBONE_PORT
        || (u16::from_be(dport) == HBONE_PORT && mark == AGENT_MARK)
    {
        return Ok(TC_ACT_OK);
    }
    // The tuple as the receiving socket would see this packet arrive: source = remote.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    tuple.__bindgen_anon_1.ipv4 = SockTupleV4 {
        saddr: ctx.load(ETH_HLEN + 12)?,
        daddr: ctx.load(ETH_HLEN + 16)?,
        sport,
        dport,
    };
    // SAFETY: `tuple` is a stack buffer of the size passed; the result is released below.
    let sk = unsafe {
        bpf_skc_lookup_tcp(
            ctx.as_ptr(),
            &mut tuple,
            core::mem::size_of::<SockTupleV4>() as u32,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    if sk.is_null() {
        return Ok(TC_ACT_OK);
    }
    // SAFETY: `sk` is a referenced socket from skc_lookup; fullsock may return null for
    // request and timewait sockets, which carry no mark.
    let mark = unsafe {
        let full = bpf_sk_fullsock(sk);
        let mark = if full.is_null() { 0 } else { (*full).mark };
        bpf_sk_release(sk.cast());
        mark
    };
    if mark != AGENT_MARK {
        return Ok(TC_ACT_OK);
    }
    // lo's hardware address is all zeros; anything else makes the packet PACKET_OTHERHOST.
    ctx.store(0, &[0u8; 6], 0)?;
    ctx.set_mark(REPLY_MARK);
    // SAFETY: bpf_redirect takes plain integers.
    Ok(unsafe { bpf_redirect(LOOPBACK_IFINDEX, u64::from(BPF_F_INGRESS)) } as i32)
}

/// tc egress on an enrolled pod's lo: the agent's own packets (SO_MARK AGENT_MARK) are
/// re-injected at lo ingress. A connection to the pod's own address is routed "from" the
/// pod's interface (the local route's device), so sk_lookup would steer the agent's
/// connection to the app back to the agent; after this re-injection the kernel routes it
/// as input on lo, sk_lookup sees lo as its ingress interface and leaves it alone.
#[classifier]
pub fn ambit_tc_agent_lo(ctx: TcContext) -> i32 {
    // SAFETY: `skb` is the program's context; reading `mark` is allowed in tc programs.
    let mark = unsafe { (*ctx.skb.skb).mark };
    if mark != AGENT_MARK {
        return TC_ACT_OK;
    }
    // SAFETY: bpf_redirect takes plain integers.
    unsafe { bpf_redirect(LOOPBACK_IFINDEX, u64::from(BPF_F_INGRESS)) as i32 }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
