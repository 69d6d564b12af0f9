//! ambit's kernel side: capture hooks for the TCP traffic of enrolled pods.
//!
//! Each program entry point is thin and wraps a `try_*` function. Map layouts come from
//! `ambit-common` so that the agent and these programs cannot disagree.
#![no_std]
#![no_main]

use ambit_common::{
    AGENT_MARK, ENROLL_OUTBOUND, EnrolledPod, FAMILY_V4, FlowKey, OUTBOUND_CAPTURE_PORT, OrigDst,
};
use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_SOCK_OPS_TCP_CONNECT_CB, bpf_sock},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, map, sock_ops},
    maps::{HashMap, LruHashMap},
    programs::{SockAddrContext, SockOpsContext},
};

const SOCK_STREAM: u32 = 1;
const AF_INET: u32 = 2;
/// 127.0.0.1 in network byte order as the kernel stores it in `user_ip4`.
const LOOPBACK_V4_BE: u32 = u32::from_ne_bytes([127, 0, 0, 1]);

/// Verdicts of cgroup sock_addr programs.
const ALLOW: i32 = 1;

#[map(name = "ENROLLED")]
static ENROLLED: HashMap<u64, EnrolledPod> = HashMap::with_max_entries(16_384, 0);

#[map(name = "PENDING")]
static PENDING: LruHashMap<u64, OrigDst> = LruHashMap::with_max_entries(65_536, 0);

#[map(name = "ORIG_DST")]
static ORIG_DST: LruHashMap<FlowKey, OrigDst> = LruHashMap::with_max_entries(65_536, 0);

#[map(name = "EXCLUDED_PORTS")]
static EXCLUDED_PORTS: HashMap<u32, u32> = HashMap::with_max_entries(64, 0);

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
    if sa.type_ != SOCK_STREAM || sa.user_family != AF_INET {
        return Ok(());
    }
    // SAFETY: bpf_get_netns_cookie accepts the program's context pointer.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup; the value is copied out immediately.
    let enrolled = unsafe { ENROLLED.get(netns_cookie) }.copied();
    let Some(pod) = enrolled else {
        return Ok(());
    };
    if pod.flags & ENROLL_OUTBOUND == 0 {
        return Ok(());
    }
    // SAFETY: `sk` is always set for connect hooks; reading `mark` of a bpf_sock is allowed.
    let sk: *mut bpf_sock = unsafe { sa.__bindgen_anon_1.sk };
    if sk.is_null() || unsafe { (*sk).mark } == AGENT_MARK {
        return Ok(());
    }
    let dst_ip = sa.user_ip4;
    // The first octet sits in the lowest byte of the network-order word on a little-endian
    // target; all of 127.0.0.0/8 stays local.
    if dst_ip.to_ne_bytes()[0] == 127 {
        return Ok(());
    }
    let dst_port = u16::from_be(sa.user_port as u16);
    // SAFETY: read-only lookup.
    if unsafe { EXCLUDED_PORTS.get(u32::from(dst_port)) }.is_some() {
        return Ok(());
    }
    let orig = OrigDst {
        addr: [dst_ip, 0, 0, 0],
        port: u32::from(dst_port),
        family: FAMILY_V4,
    };
    // SAFETY: bpf_get_socket_cookie accepts the program's context pointer.
    let socket_cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    PENDING.insert(socket_cookie, orig, 0)?;
    // SAFETY: the context fields user_ip4/user_port are writable in connect4 programs.
    unsafe {
        (*ctx.sock_addr).user_ip4 = LOOPBACK_V4_BE;
        (*ctx.sock_addr).user_port = u32::from(OUTBOUND_CAPTURE_PORT.to_be());
    }
    Ok(())
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
    if ctx.op() != BPF_SOCK_OPS_TCP_CONNECT_CB {
        return Ok(());
    }
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
    ORIG_DST.insert(key, orig, 0)?;
    PENDING.remove(socket_cookie)?;
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
