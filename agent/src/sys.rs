//! The agent's syscall edge: every `unsafe` block of the agent lives here, each wrapping one
//! libc call whose contract is simple to state. Everything above this module is safe Rust.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::Path;

/// `SO_NETNS_COOKIE` (Linux 5.14+); not yet exported by every libc version.
const SO_NETNS_COOKIE: libc::c_int = 71;
/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Moves the calling thread into the network namespace referred to by `netns`.
/// Only the calling thread changes namespace; callers use dedicated threads.
pub fn setns_net(netns: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: setns takes a plain fd and a flag; it does not touch our memory.
    cvt(unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) }).map(drop)
}

/// The kernel's cookie for the network namespace a socket lives in; the same value eBPF
/// programs see through `bpf_get_netns_cookie`.
pub fn netns_cookie(socket: impl AsFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for writes of the sizes passed.
    cvt(unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    })?;
    Ok(cookie)
}

/// Sets SO_MARK on a socket (needs CAP_NET_ADMIN).
pub fn set_mark(socket: impl AsFd, mark: u32) -> io::Result<()> {
    set_int_opt(socket, libc::SOL_SOCKET, libc::SO_MARK, mark as libc::c_int)
}

/// Sets IP_TRANSPARENT so a socket may bind a non-local (client) address.
pub fn set_ip_transparent(socket: impl AsFd) -> io::Result<()> {
    set_int_opt(socket, libc::SOL_IP, libc::IP_TRANSPARENT, 1)
}

/// Sets IP_BIND_ADDRESS_NO_PORT: a bind to port 0 leaves the port to connect(), which picks
/// one free for the whole 4-tuple (and may reuse TIME_WAIT ports under tcp_tw_reuse).
/// Without it bind() must find a port unused by any socket on that address, scanning the
/// whole ephemeral range under a lock once it fills: with tens of thousands of upstream
/// connections in TIME_WAIT each bind took milliseconds and starved the runtime.
pub fn set_bind_address_no_port(socket: impl AsFd) -> io::Result<()> {
    set_int_opt(socket, libc::SOL_IP, libc::IP_BIND_ADDRESS_NO_PORT, 1)
}

fn set_int_opt(
    socket: impl AsFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `value` is a valid c_int for the duration of the call.
    cvt(unsafe {
        libc::setsockopt(
            socket.as_fd().as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// True when `path` is on a bpf filesystem.
pub fn is_bpffs(path: &Path) -> io::Result<bool> {
    let c_path = path_to_cstring(path)?;
    // SAFETY: statfs is plain data; zeroed is a valid bit pattern for it.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c_path` is NUL-terminated and `stat` is valid for writes.
    cvt(unsafe { libc::statfs(c_path.as_ptr(), &mut stat) })?;
    Ok(stat.f_type as i64 == BPF_FS_MAGIC)
}

/// Mounts a bpf filesystem at `path` (which must exist).
pub fn mount_bpffs(path: &Path) -> io::Result<()> {
    let target = path_to_cstring(path)?;
    let fstype = c"bpf";
    // SAFETY: all pointers are NUL-terminated strings that outlive the call; data is null.
    cvt(unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    })
    .map(drop)
}

fn path_to_cstring(path: &Path) -> io::Result<CString> {
    use std::os::unix::ffi::OsStrExt as _;
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// Issues one bpf(2) command whose result is 0 or a new file descriptor.
fn sys_bpf(
    cmd: aya_obj::generated::bpf_cmd,
    attr: &mut aya_obj::generated::bpf_attr,
) -> io::Result<i64> {
    // SAFETY: `attr` is a valid, fully initialised bpf_attr of the size passed; the kernel
    // reads (and for some commands writes) only within it. Pointers inside it are set by
    // the callers below to buffers that outlive the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            std::ptr::from_mut(attr),
            std::mem::size_of::<aya_obj::generated::bpf_attr>(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn zeroed_bpf_attr() -> aya_obj::generated::bpf_attr {
    // SAFETY: bpf_attr is a C union of plain integers; all zeroes is its documented
    // "no options" value and what the kernel requires of unused bytes.
    unsafe { std::mem::zeroed() }
}

/// Takes ownership of the fd the kernel just returned.
fn owned_fd(ret: i64) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    let fd = std::os::fd::RawFd::try_from(ret)
        .map_err(|_| io::Error::other(format!("bpf(2) returned {ret}, not an fd")))?;
    // SAFETY: a successful BPF_OBJ_GET / BPF_PROG_GET_FD_BY_ID returns a new fd that
    // nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Opens the bpf object pinned at `path` (BPF_OBJ_GET).
pub fn bpf_obj_get(path: &Path) -> io::Result<std::os::fd::OwnedFd> {
    let c_path = path_to_cstring(path)?;
    let mut attr = zeroed_bpf_attr();
    attr.__bindgen_anon_4.pathname = c_path.as_ptr() as u64;
    owned_fd(sys_bpf(
        aya_obj::generated::bpf_cmd::BPF_OBJ_GET,
        &mut attr,
    )?)
}

/// Opens the loaded program with this id (BPF_PROG_GET_FD_BY_ID).
pub fn bpf_prog_get_fd_by_id(id: u32) -> io::Result<std::os::fd::OwnedFd> {
    let mut attr = zeroed_bpf_attr();
    attr.__bindgen_anon_6.__bindgen_anon_1.prog_id = id;
    owned_fd(sys_bpf(
        aya_obj::generated::bpf_cmd::BPF_PROG_GET_FD_BY_ID,
        &mut attr,
    )?)
}

/// Atomically swaps the program behind a bpf_link (BPF_LINK_UPDATE with BPF_F_REPLACE):
/// the attach point never goes without a program, and the swap only happens if the link
/// still runs `old_prog` (EPERM otherwise), so what the caller logs as replaced is exact.
///
/// Hand-written because aya 0.14 offers link updates only for XDP and tc programs
/// (`attach_to_link`); cgroup sock_addr / sock_ops and netns (sk_lookup) links have none
/// (aya added `CgroupSockAddr::attach_to_link` later, in a release this toolchain cannot
/// build).
pub fn bpf_link_update(
    link: BorrowedFd<'_>,
    new_prog: BorrowedFd<'_>,
    old_prog: BorrowedFd<'_>,
) -> io::Result<()> {
    let mut attr = zeroed_bpf_attr();
    attr.link_update.link_fd = link.as_raw_fd() as u32;
    attr.link_update.__bindgen_anon_1.new_prog_fd = new_prog.as_raw_fd() as u32;
    attr.link_update.__bindgen_anon_2.old_prog_fd = old_prog.as_raw_fd() as u32;
    attr.link_update.flags = aya_obj::generated::BPF_F_REPLACE;
    sys_bpf(aya_obj::generated::bpf_cmd::BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// Detaches a bpf_link from its hook now (BPF_LINK_DETACH, Linux 5.9+), however many fds
/// still refer to it: dropping our fd detaches only if it was the last one, and another
/// process (an old agent during a rolling update, bpftool, a child between fork and exec)
/// may hold a copy. The link object stays valid, defunct, until its last fd closes.
///
/// Hand-written because aya 0.14's `FdLink` detaches only by closing its fd.
pub fn bpf_link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = zeroed_bpf_attr();
    attr.link_detach.link_fd = link.as_raw_fd() as u32;
    sys_bpf(aya_obj::generated::bpf_cmd::BPF_LINK_DETACH, &mut attr).map(drop)
}

/// Reads and removes one entry of a hash map in one call (BPF_MAP_LOOKUP_AND_DELETE_ELEM,
/// hash maps since Linux 5.14): `None` if the key is absent. The data path's lookup of a
/// captured connection's original destination uses it: one syscall instead of a lookup and
/// a delete, and no `&mut` (aya's `remove`), so no lock around the map.
///
/// Hand-written because aya 0.14 offers lookup-and-delete only for queues and stacks.
pub fn bpf_map_lookup_and_delete<K: aya::Pod, V: aya::Pod>(
    map: &aya::maps::HashMap<aya::maps::MapData, K, V>,
    key: &K,
) -> io::Result<Option<V>> {
    use aya::maps::IterableMap as _;
    let mut value = std::mem::MaybeUninit::<V>::zeroed();
    let mut attr = zeroed_bpf_attr();
    // SAFETY: writing plain integers into the map-element member of a zeroed bpf_attr
    // union; nothing is read from it.
    let elem = unsafe { &mut attr.__bindgen_anon_2 };
    elem.map_fd = map.map().fd().as_fd().as_raw_fd() as u32;
    elem.key = std::ptr::from_ref(key) as u64;
    elem.__bindgen_anon_1.value = std::ptr::from_mut(&mut value) as u64;
    match sys_bpf(
        aya_obj::generated::bpf_cmd::BPF_MAP_LOOKUP_AND_DELETE_ELEM,
        &mut attr,
    ) {
        // SAFETY: aya's HashMap (0.14: `TryFrom<Map>` runs `check_kv_size` against the
        // kernel's map info; re-check on an aya upgrade) guarantees the map's key and value
        // sizes are those of K and V, so on success the kernel filled exactly `value`; V is
        // Pod, so any bytes are a valid V.
        Ok(_) => Ok(Some(unsafe { value.assume_init() })),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The memory page size (for the ring buffer sizes the loader rounds up to).
pub fn page_size() -> u32 {
    // SAFETY: sysconf only reads a system constant.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u32::try_from(size).unwrap_or(4096)
}

/// Registers an owned fd-backed object with tokio's reactor for readability.
///
/// `T` must own its fd for its whole life and always report the same one (true of the
/// aya map handles and mio listeners this is used for: the fd is an `OwnedFd` inside them).
pub fn async_readable<T: std::os::fd::AsRawFd>(
    inner: T,
) -> io::Result<tokio::io::unix::AsyncFd<T>> {
    // SAFETY: per the contract above, the fd stays open and unchanged while the AsyncFd
    // owns `inner`, which is what register_with_interest requires.
    unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(inner, tokio::io::Interest::READABLE)
    }
    .map_err(|e| io::Error::other(e.to_string()))
}

/// Raises RLIMIT_NOFILE's soft limit to the hard limit and returns it. A proxy holds two
/// descriptors per connection, so the usual soft limit of 1024 would cap an agent at a few
/// hundred connections.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid rlimit for the kernel to write into.
    cvt(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) })?;
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: `limit` is a valid rlimit, read by the kernel during the call.
        cvt(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) })?;
    }
    Ok(limit.rlim_cur)
}

/// Fixes glibc malloc's mmap and trim thresholds (the agent calls it first thing, before
/// any thread exists). Left alone, glibc raises both whenever a large block it had mmapped
/// is freed (up to 32 and 64 MiB), and from then on memory freed in an arena stays resident;
/// such blocks come and go with the eBPF object load at start (aya's loader parses the
/// kernel's BTF, ~20 MB of heap). With fixed thresholds freed memory goes back to the
/// kernel, all but the last 2 MiB of each arena's top and what lies below a block still in
/// use: [`release_free_heap`] returns those after each object load (and after a load of
/// connections has gone). Both thresholds stay above the largest buffer the data path
/// allocates (the copy loop's 256 KiB reads, h2's frames up to 1 MiB), so those are reused
/// from the heap instead of being mmapped, faulted in and unmapped each time.
#[cfg(target_env = "gnu")]
pub fn tune_malloc() -> io::Result<()> {
    const THRESHOLD: libc::c_int = 2 << 20;
    for (param, name) in [
        (libc::M_MMAP_THRESHOLD, "M_MMAP_THRESHOLD"),
        (libc::M_TRIM_THRESHOLD, "M_TRIM_THRESHOLD"),
    ] {
        // SAFETY: mallopt takes two integers and changes allocator settings only; glibc
        // serialises it against concurrent allocation itself.
        if unsafe { libc::mallopt(param, THRESHOLD) } != 1 {
            return Err(io::Error::other(format!("mallopt({name}) refused")));
        }
    }
    Ok(())
}

/// Other C libraries keep their own allocator policy.
#[cfg(not(target_env = "gnu"))]
pub fn tune_malloc() -> io::Result<()> {
    Ok(())
}

/// Returns every free page of the heap to the kernel now (glibc's `malloc_trim(0)`): the
/// trim threshold of [`tune_malloc`] keeps up to 2 MiB free at each arena's top, and freed
/// blocks below one still in use never shrink the heap. Called after an eBPF object load and
/// once proxied connections have fallen after a load (`app::heap`), never per connection:
/// it walks each arena under that arena's lock.
#[cfg(target_env = "gnu")]
pub fn release_free_heap() {
    // SAFETY: malloc_trim takes an integer and only hands free pages back to the kernel;
    // glibc locks each arena while it walks it.
    unsafe { libc::malloc_trim(0) };
}

/// Other C libraries keep their own allocator policy.
#[cfg(not(target_env = "gnu"))]
pub fn release_free_heap() {}

/// Sets RLIMIT_NOFILE's soft limit (tests that need descriptors to run out).
#[cfg(test)]
pub fn set_nofile_soft_limit(soft: u64) -> io::Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid rlimit for the kernel to write into.
    cvt(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) })?;
    limit.rlim_cur = soft.min(limit.rlim_max);
    // SAFETY: `limit` is a valid rlimit, read by the kernel during the call.
    cvt(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }).map(drop)
}

#[cfg(test)]
mod bind_tests {
    use std::net::{Ipv4Addr, SocketAddr, TcpListener};

    #[test]
    fn bind_address_no_port_leaves_the_port_to_connect() -> std::io::Result<()> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        super::set_bind_address_no_port(&socket)?;
        socket.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())?;
        let bound = socket.local_addr()?.as_socket().map(|a| a.port());
        assert_eq!(bound, Some(0), "no port taken at bind");
        socket.connect(&listener.local_addr()?.into())?;
        let connected = socket.local_addr()?.as_socket().map(|a| a.port());
        assert!(connected.is_some_and(|p| p != 0), "port chosen at connect");
        Ok(())
    }
}
